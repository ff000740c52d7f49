"""``buildq worker`` with the tree index's Python stamp check instead of the C one.

Run as ``python bench/python_stamps_worker.py worker POOL ...`` (the same arguments as
``buildq``): the chain benchmark measures the native module's gain through the whole
chain by timing cache hits with such a control worker in place of the normal ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import workers.context

workers.context.NATIVE_STAMPS = None

from tasks.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
