"""``python -m tasks.cli``: the same command as the installed ``buildq`` script."""

from tasks.cli import main

main()
