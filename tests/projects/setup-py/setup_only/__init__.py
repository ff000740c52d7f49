import sys
from importlib.metadata import version

import six


def main() -> None:
    if sys.argv[1:] == ["--version"]:
        print(f"setup-only {version('setup-only')} (six {six.__version__})")
    else:
        print("setup-only says hello")
