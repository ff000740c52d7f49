from importlib.metadata import version

import six

print(f"pdm-sayer {version('pdm-sayer')} (six {six.__version__})")
