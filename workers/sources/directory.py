"""A directory on this host: read in place, never copied and never deleted."""

from __future__ import annotations

from pathlib import Path

from config.errors import SourceError
from workers.sources.base import FetchedSource, SourceSpec


def fetch_directory(spec: SourceSpec) -> FetchedSource:
    """The user's own directory as the context root.

    Symlinks that leave it are refused by the context walk, which is the only place
    that knows which files survive ``.dockerignore``.
    """
    root = Path(spec.location)
    if not root.is_dir():
        raise SourceError(f"source directory {spec.location!r} does not exist on this host.",
                          "Directory sources are read where the worker runs; use an archive "
                          "or git source for remote workers.")
    return FetchedSource(root=root.resolve(), owned=False, commit=None)
