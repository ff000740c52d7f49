"""Sources of build contexts: a local directory, a tar archive, a git repository, or an image."""

from __future__ import annotations

from pathlib import Path

from config.errors import SourceError
from config.settings import Settings
from workers.sources.base import FetchedSource, SourceSpec, check_spec, parse_source


def fetch_source(spec: SourceSpec, workdir: Path, settings: Settings | None = None) -> FetchedSource:
    """Put the source on local disk; temp dirs are created under ``workdir``.

    The spec is checked again because it may have come through a queue. ``settings``
    carries the archive limits of this host; without it the defaults apply.
    """
    check_spec(spec)
    if spec.kind == "directory":
        from workers.sources.directory import fetch_directory

        return fetch_directory(spec)
    if spec.kind == "archive":
        from workers.sources.archive import fetch_archive

        if settings is None:
            return fetch_archive(spec, workdir)
        return fetch_archive(spec, workdir, max_bytes=settings.max_archive_bytes,
                             max_members=settings.max_archive_members)
    if spec.kind == "git":
        from workers.sources.git import fetch_git

        return fetch_git(spec, workdir)
    raise SourceError(f"image source {spec.location!r} has no files to fetch.",
                      "Image jobs run the image as it is; no build is needed.")


__all__ = ["FetchedSource", "SourceSpec", "fetch_source", "parse_source"]
