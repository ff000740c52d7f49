"""Which local files a worker may read for somebody else's request.

A worker that takes requests from the broker runs them for whoever can write to it, so
a local path or a ``file://`` URL in a request is read only under the directories the
operator names in ``BUILDQ_SOURCE_ROOTS``, plus buildq's own upload area: where
``buildq build ./dir`` ships a directory for remote workers (``sources/`` in the
context store). Paths are resolved (symlinks, ``..``) before the check, and nothing
under them is opened when it fails. The embedded mode (no broker) reads the caller's
own files, as the caller.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

from config.errors import ForbiddenError
from config.names import classify_store_url
from config.settings import Settings
from workers.sources.base import SourceSpec, names_local_path, redact_credentials

#: Folder of the context store that sources shipped by ``buildq build DIR`` land in.
UPLOAD_DIR = "sources"
#: Name prefix of those shipped sources; such an archive is deleted after its build.
UPLOAD_PREFIX = "buildq-upload-"


def new_upload_key() -> str:
    """The store key of a source shipped for remote workers."""
    return f"{UPLOAD_DIR}/{UPLOAD_PREFIX}{uuid.uuid4().hex}.tar.gz"


def is_shipped_source(location: str, settings: Settings) -> bool:
    """Whether an archive URL names a source ``buildq build DIR`` shipped, which is deleted
    after its build: a ``sources/buildq-upload-*.tar.gz`` object, and in a directory store
    only one inside this host's upload area, whatever the name says."""
    parts = urlsplit(location)
    if not parts.scheme:
        return False
    folder, _, name = unquote(parts.path).rstrip("/").rpartition("/")
    if not (folder.rpartition("/")[2] == UPLOAD_DIR and name.startswith(UPLOAD_PREFIX)
            and name.endswith(".tar.gz")):
        return False
    if parts.scheme.lower() != "file":
        return True
    area = upload_area(settings)
    return area is not None and os.path.realpath(folder) == os.path.realpath(area)


def upload_area(settings: Settings) -> Path | None:
    """The local directory shipped sources land in, when the context store is a directory."""
    kind, problem = classify_store_url(settings.context_store)
    if kind != "file" or problem:
        return None
    return Path(unquote(urlsplit(settings.context_store).path)) / UPLOAD_DIR


#: How long a resolution of the roots is used: a request's source is checked against them
#: up to four times (the request, then fetch and hash on the worker), and resolving each
#: root (realpath, an lstat per component) was most of each check. A root's symlink pointed
#: elsewhere by the operator counts from this long after.
ROOTS_FRESH_SECONDS = 5.0
_resolved: dict[tuple[tuple[Path, ...], str], tuple[float, tuple[Path, ...]]] = {}


def allowed_roots(settings: Settings) -> tuple[Path, ...]:
    """The configured roots and the upload area, each resolved as the sources will be."""
    key = (settings.source_roots, settings.context_store)
    now = time.monotonic()
    known = _resolved.get(key)
    if known is not None and now - known[0] < ROOTS_FRESH_SECONDS:
        return known[1]
    roots = list(settings.source_roots)
    area = upload_area(settings)
    if area is not None:
        roots.append(area)
    resolved = tuple(Path(os.path.realpath(root)) for root in roots)
    if len(_resolved) > 64:
        _resolved.clear()
    _resolved[key] = (now, resolved)
    return resolved


def local_path(spec: SourceSpec) -> str | None:
    """The path on this host a source would be read from; None for remote sources."""
    location = spec.location
    if spec.kind == "image":
        return None
    if "://" not in location:
        return location if spec.kind in ("directory", "archive") else None
    parts = urlsplit(location)
    if parts.scheme.lower() == "file":
        return unquote(parts.path)
    return None


def check_local_read(location: str, settings: Settings, shown: str | None = None,
                     what: str = "source") -> None:
    """Refuse to read ``location`` (a path on this host) outside the allowed roots.

    Nothing is opened or listed: the path is only resolved (``realpath``). Does nothing in
    the embedded mode, where the caller's own process reads the caller's own files.
    """
    if settings.embedded:
        return
    resolved = Path(os.path.realpath(os.path.expanduser(location)))
    roots = allowed_roots(settings)
    if any(resolved == root or resolved.is_relative_to(root) for root in roots):
        return
    configured = (os.pathsep.join(str(r) for r in settings.source_roots)
                  if settings.source_roots else "unset, so only buildq's upload area")
    raise ForbiddenError(
        f"{what} {shown or location!r} is outside BUILDQ_SOURCE_ROOTS ({configured}): "
        "workers read local paths for a request only under those directories.",
        "Ship it with `buildq build ./dir`, use a git or archive URL, or have the operator "
        "add its directory to BUILDQ_SOURCE_ROOTS where workers run and requests are made.")


def check_source_text(source: str, settings: Settings) -> None:
    """:func:`check_local_read` for a source as typed, before it is parsed: parsing a local
    path looks at it (does it exist, is it a directory), which is already a read."""
    if source.strip() and not source.startswith("-") and names_local_path(source):
        check_local_read(source, settings)


def check_roots(spec: SourceSpec, settings: Settings) -> None:
    """:func:`check_local_read` for a source spec; remote sources pass."""
    path = local_path(spec)
    if path is not None:
        check_local_read(path, settings, redact_credentials(spec.location))
