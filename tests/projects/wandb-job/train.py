import sys
from importlib.metadata import version

import attrs
import six


@attrs.define
class Config:
    epochs: int


args = sys.argv[1:]
config = Config(int(args[args.index("--epochs") + 1]))
print(f"python {sys.version_info[0]}.{sys.version_info[1]}; epochs {config.epochs}; "
      f"attrs {version('attrs')}; six {six.__version__}")
