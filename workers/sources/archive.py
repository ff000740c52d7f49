"""A tar archive (local or in a context store), unpacked into a temp dir that we own.

An archive is hostile until proven otherwise: every member is checked before it touches
the disk, and ``tarfile``'s ``data`` filter runs as a second line of defence.
"""

from __future__ import annotations

import contextlib
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from config.errors import ConfigError, SourceError
from config.settings import DEFAULT_MAX_ARCHIVE_BYTES, DEFAULT_MAX_ARCHIVE_MEMBERS
from workers.path_limits import MAX_COMPONENT_BYTES, MAX_PATH_BYTES, MAX_PATH_DEPTH
from workers.sources.base import (
    FetchedSource,
    SourceSpec,
    remove_tree,
    scratch_dir,
)

#: Default cap on the total uncompressed size of an archive's files (BUILDQ_MAX_ARCHIVE_BYTES).
MAX_BYTES = DEFAULT_MAX_ARCHIVE_BYTES
#: Default cap on the number of members (BUILDQ_MAX_ARCHIVE_MEMBERS): millions of empty
#: files exhaust inodes, not bytes.
MAX_MEMBERS = DEFAULT_MAX_ARCHIVE_MEMBERS

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class _Refused(Exception):
    """A member failed a check; carries the reason for the user."""


def fetch_archive(
    spec: SourceSpec, workdir: Path, max_bytes: int = MAX_BYTES, max_members: int = MAX_MEMBERS
) -> FetchedSource:
    """Unpack the archive into a new temp dir under ``workdir``; nothing is left on failure."""
    dest = scratch_dir(workdir, "archive")
    try:
        with _open_archive(spec.location) as stream:
            _extract(stream, dest, spec.location, max_bytes, max_members)
    except BaseException:
        remove_tree(dest)
        raise
    return FetchedSource(root=dest, owned=True, commit=None)


@contextlib.contextmanager
def _open_archive(location: str) -> Iterator[BinaryIO]:
    if "://" not in location:
        try:
            stream = open(location, "rb")  # noqa: SIM115
        except OSError as exc:
            raise SourceError(f"archive {location!r} cannot be read: {exc.strerror}.") from None
        with stream:
            yield stream
        return
    from workers.stores import split_store_url, store_for_url

    try:
        base, key = split_store_url(location)
        store = store_for_url(base)
    except ConfigError as exc:
        # The store's own words, but as a source problem: the user chose this URL.
        raise SourceError(f"archive {location!r} cannot be fetched: {exc.message}",
                          exc.hint) from None
    with store.reader(key) as remote:
        yield remote


def _extract(stream: BinaryIO, dest: Path, location: str, max_bytes: int, max_members: int) -> None:
    total = 0
    count = 0
    try:
        # Stream mode: the archive is read once, front to back, never held whole.
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            tar.errorlevel = 2
            for member in tar:
                count += 1
                if count > max_members:
                    raise SourceError(f"archive {location!r} has more than {max_members} members.",
                                      "Pack only the build context, or raise "
                                      "BUILDQ_MAX_ARCHIVE_MEMBERS on the build hosts.")
                shown = _shown(member.name)
                try:
                    name = _check_member(member, dest)
                except _Refused as why:
                    raise SourceError(f"archive {location!r}: member {shown} {why}.",
                                      "The archive was not unpacked.") from None
                if name is None:
                    continue
                if member.isreg():
                    total += member.size
                    if total > max_bytes:
                        raise SourceError(
                            f"archive {location!r}: member {shown} takes the unpacked size "
                            f"over the limit of {max_bytes} bytes.",
                            "Pack only the build context, or raise BUILDQ_MAX_ARCHIVE_BYTES "
                            "on the build hosts.")
                member.name = name
                try:
                    tar.extract(member, dest, filter="data")
                except tarfile.FilterError as exc:
                    raise SourceError(f"archive {location!r}: member {shown} refused: {exc}.",
                                      "The archive was not unpacked.") from None
    except SourceError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise SourceError(f"archive {location!r} is not a readable tar archive: {exc}.",
                          "Create it with tar -czf context.tar.gz -C DIR .") from None


def _shown(name: str, limit: int = 120) -> str:
    """The name as a message can hold it: escaped, and its middle cut when it is long."""
    if len(name) > limit:
        name = f"{name[:limit // 2]}...{name[-limit // 2:]}"
    # repr() escapes newlines and control characters; undecodable bytes, which tarfile
    # hands over as lone surrogates, are shown as the bytes the user wrote (\xe9).
    return re.sub(r"\\udc([89a-f][0-9a-f])", r"\\x\1", repr(name))


def _check_member(member: tarfile.TarInfo, dest: Path) -> str | None:
    """The member's safe relative name, None to skip it, or ``_Refused``."""
    raw = member.name
    if _CONTROL.search(raw) or _CONTROL.search(member.linkname or ""):
        raise _Refused("has a control character (such as a newline) in its name or link")
    if _SURROGATE.search(raw) or _SURROGATE.search(member.linkname or ""):
        # tarfile decodes undecodable bytes to lone surrogates; such a name cannot be
        # shown, logged or put in a record faithfully.
        raise _Refused("has a name that is not valid UTF-8")
    if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw):
        raise _Refused("has an absolute path")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _Refused("has a '..' component that leaves the archive")
    # Checked before anything is created: deeper trees overflow Python's recursion in
    # makedirs, and longer names fail with ENAMETOOLONG halfway through the unpacking.
    if len(parts) > MAX_PATH_DEPTH:
        raise _Refused(f"is nested {len(parts)} directories deep, more than {MAX_PATH_DEPTH}")
    if any(len(p.encode()) > MAX_COMPONENT_BYTES for p in parts):
        raise _Refused(f"has a path component longer than {MAX_COMPONENT_BYTES} bytes")
    if len(raw.encode()) > MAX_PATH_BYTES:
        raise _Refused(f"has a path longer than {MAX_PATH_BYTES} bytes")
    if not parts:
        return None  # "./" itself: the destination exists already
    name = "/".join(parts)
    if member.ischr() or member.isblk() or member.isfifo():
        raise _Refused("is a device or FIFO, which a build context cannot contain")
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        raise _Refused(f"has an unsupported type {member.type!r}")

    # A parent that an earlier member made a symlink could redirect this write.
    parent = os.path.realpath(dest / os.path.dirname(name))
    if not _inside(parent, dest):
        raise _Refused("would be written through a symlink that leaves the archive")
    if member.issym() or member.islnk():
        link = member.linkname
        if not link or link.startswith("/"):
            raise _Refused(f"links to an absolute path {link!r}")
        # Symlinks are relative to their directory, hard links to the archive root.
        base = parent if member.issym() else str(dest)
        if not _inside(os.path.realpath(os.path.join(base, link)), dest):
            raise _Refused(f"links to {link!r}, outside the archive")
        if member.islnk():
            target_parts = [p for p in link.split("/") if p not in ("", ".")]
            if ".." in target_parts:
                raise _Refused(f"hard-links to {link!r}, outside the archive")
            member.linkname = "/".join(target_parts)
    return name


def _inside(path: str, root: Path) -> bool:
    root_s = str(root)
    return path == root_s or path.startswith(root_s + os.sep)
