"""Process entry points, one layer above the rest of :mod:`tasks`: the ``buildq`` command,
the worker pools, Flower and the doctor. Nothing below this package imports it.

``buildq = "tasks.cli:main"`` is the installed script; ``python -m tasks.cli`` runs the same.
"""

from __future__ import annotations

from tasks.cli.commands import cli, main

__all__ = ["cli", "main"]
