import sys
from importlib.metadata import version

import attrs


@attrs.define
class Greeting:
    who: str


def main() -> None:
    if sys.argv[1:] == ["--version"]:
        print(f"poetry-one {version('poetry-one')} (attrs {version('attrs')})")
        return
    print(f"hello, {Greeting('world').who}")
