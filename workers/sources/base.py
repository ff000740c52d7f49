"""What a source is, how a user's string becomes one, and what fetching one yields.

Everything a user types is checked here before any process sees it: a git URL or ref
that git could read as an option, or a remote-helper URL (``ext::sh -c ...``), would
run commands on a build host.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args
from urllib.parse import urlsplit, urlunsplit

from config.errors import SourceError
from config.settings import Settings

SourceKind = Literal["directory", "archive", "git", "image"]

#: Suffixes that make a path or URL an archive source.
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")

#: URL schemes an archive can be fetched from through a context store.
ARCHIVE_SCHEMES = frozenset({"s3", "gs", "file", "https"})

#: URL schemes git is allowed to speak.
GIT_SCHEMES = frozenset({"https", "http", "ssh", "git", "file"})

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# git's remote-helper syntax ``<transport>::<address>``; ``ext::`` runs a command.
_TRANSPORT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9+.\-]*::")
_SCP_LIKE = re.compile(
    r"^(?P<user>[A-Za-z0-9._~+\-]+)@(?P<host>[A-Za-z0-9.\-]+):(?P<path>[^/].*|/.+)$"
)
_HEX_COMMIT = re.compile(r"^[0-9a-f]{7,40}$")
# What ``git check-ref-format`` forbids anywhere in a ref name.
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")

_REF_HINT = "Give a branch, tag or commit SHA such as main, v1.2.0 or 3f2c1ab."
_GIT_URL_HINT = "Give an https://, ssh:// or git:// URL, or user@host:path."
_SOURCE_HINT = ("Give a directory, a .tar/.tar.gz/.tgz archive (path or s3://, gs://, https://, "
                "file:// URL), a git URL or image:<reference>.")


def redact_credentials(url: str) -> str:
    """``url`` with any password or http(s) user (often a token) replaced by ``***``.

    Used for every message and record that repeats a source, so a token pasted into a
    URL is refused without being written to logs, records or Redis.
    """
    if "://" not in url or "@" not in url:
        return url
    try:
        parts = urlsplit(url)
        secret = parts.password is not None or (
            bool(parts.username) and parts.scheme in ("http", "https"))
    except ValueError:
        secret = True  # unparsable: cut everything up to the last '@' before the path
    if not secret:
        return url
    scheme, _, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    host = authority.rpartition("@")[2]
    return urlunsplit((scheme, f"***@{host}", "", "", "")) + slash + path


def _is_archive_name(path: str) -> bool:
    return path.lower().endswith(ARCHIVE_SUFFIXES)


@dataclass(frozen=True)
class SourceSpec:
    """Where the code of a build comes from; plain data, safe to send through a queue."""

    kind: SourceKind
    location: str
    ref: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {"kind": self.kind, "location": self.location, "ref": self.ref}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SourceSpec:
        """Rebuild a spec sent by another process, checking it again: a queue is input too."""
        kind = data.get("kind")
        location = data.get("location")
        ref = data.get("ref")
        if kind not in get_args(SourceKind):
            raise SourceError(f"unknown source kind {kind!r}.",
                              "Expected one of: directory, archive, git, image.")
        if not isinstance(location, str) or not location:
            raise SourceError("the source has no location.", _SOURCE_HINT)
        if ref is not None and not isinstance(ref, str):
            raise SourceError(f"the source ref {ref!r} is not a string.", _REF_HINT)
        spec = cls(cast(SourceKind, kind), location, ref)
        check_spec(spec)
        return spec


@dataclass
class FetchedSource:
    """A source on local disk, ready to be hashed and packed."""

    root: Path
    owned: bool
    commit: str | None = None

    def cleanup(self) -> None:
        """Delete the checkout if we made it. Never raises: it runs in ``finally`` blocks."""
        if self.owned:
            remove_tree(self.root)


#: Scratch dirs are ``buildq-<kind>-<host>.<pid>.<parent pid>-<random>``: the processes
#: that made one (a pool process and its worker) are in its name, so a sweeper on the
#: same host can tell when a killed worker left it behind (see :func:`scratch_orphaned`).
_SCRATCH_NAME = re.compile(r"^buildq-[a-z]+-(?P<host>[A-Za-z0-9_]+)\.(?P<pid>\d+)\.(?P<ppid>\d+)-")


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"


def scratch_dir(workdir: Path, kind: str) -> Path:
    """A new temp dir under ``workdir`` for one fetched source, named after its makers."""
    owner = f"{_host_tag()}.{os.getpid()}.{os.getppid()}"
    return Path(tempfile.mkdtemp(prefix=f"buildq-{kind}-{owner}-", dir=workdir)).resolve()


def in_scratch(path: str | Path, workdir: Path) -> bool:
    """Whether ``path`` lies inside ``workdir``: the only trees a worker deletes, or takes
    as already fetched, when a task's state names them (a state is input like any other)."""
    real, root = os.path.realpath(path), os.path.realpath(workdir)
    return real != root and real.startswith(root + os.sep)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # A zombie has exited; only its exit status waits to be collected.
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def scratch_orphaned(path: Path) -> bool:
    """True when ``path`` is a scratch dir made on this host by processes that all exited.

    Its makers clean up after themselves whenever they can; this finds what a SIGKILL
    (or an OOM kill) of the whole worker left. Any doubt (another host, a live pid, a
    name we did not make) keeps the dir.
    """
    match = _SCRATCH_NAME.match(path.name)
    if match is None or match["host"] != _host_tag():
        return False
    pids = {int(match["pid"]), int(match["ppid"])}
    return not any(pid <= 1 or _process_alive(pid) for pid in pids)


def sweep_workdir(settings: Settings) -> None:
    """Remove scratch dirs whose makers were killed, or older than any build may run."""
    root = settings.workdir
    if not root.is_dir():
        return
    horizon = time.time() - settings.build_timeout * 2
    for entry in root.iterdir():
        try:
            if entry.is_dir() and (entry.stat().st_mtime < horizon or scratch_orphaned(entry)):
                shutil.rmtree(entry, ignore_errors=True)
        except FileNotFoundError:
            continue


def remove_tree(path: Path) -> None:
    """Best-effort recursive delete that also copes with read-only directories."""

    def _make_writable_and_retry(func: Any, failed: str, _exc: Any) -> None:
        with contextlib.suppress(OSError):
            Path(failed).parent.chmod(0o700)
            func(failed)

    with contextlib.suppress(OSError):
        shutil.rmtree(path, onerror=_make_writable_and_retry)


def check_ref(ref: str) -> None:
    """Refuse a ref git could misread; the rules of ``git check-ref-format`` plus no options."""
    if _HEX_COMMIT.match(ref):
        return
    shown = ref
    problem: str | None = None
    if not ref:
        problem = "is empty"
    elif ref.startswith("-"):
        problem = "begins with '-', which git would read as an option"
    elif _REF_FORBIDDEN.search(ref):
        problem = "contains a space, a control character or one of ~ ^ : ? * [ \\"
    elif ".." in ref:
        problem = "contains '..'"
    elif "@{" in ref or ref == "@":
        problem = "contains '@{' or is '@'"
    elif ref.startswith("/") or ref.endswith(("/", ".")) or "//" in ref:
        problem = "has an empty path component or ends with '/' or '.'"
    elif any(part.startswith(".") or part.endswith(".lock") for part in ref.split("/")):
        problem = "has a component that begins with '.' or ends with '.lock'"
    elif len(ref) > 255:
        problem = "is longer than 255 characters"
    if problem:
        raise SourceError(f"git ref {shown!r} {problem}.", _REF_HINT)


def check_git_url(url: str) -> None:
    """Refuse URLs that would make git run a command or read an option."""
    shown = redact_credentials(url)
    if _CONTROL.search(url) or " " in url.split("://", 1)[0]:
        raise SourceError(f"git URL {shown!r} contains control characters or spaces.",
                          _GIT_URL_HINT)
    if url.startswith("-"):
        raise SourceError(f"git URL {shown!r} begins with '-', which git would read as an option.",
                          "Give an https://, ssh:// or git:// URL.")
    if _TRANSPORT.match(url):
        raise SourceError(f"git URL {shown!r} uses a remote-helper transport ('<name>::').",
                          "Only https://, http://, ssh://, git://, file:// and user@host:path "
                          "URLs are accepted.")
    scp = _SCP_LIKE.match(url)
    if scp and "://" not in url:
        if scp["path"].startswith("-"):
            raise SourceError(f"git URL {shown!r} has a path that begins with '-'.",
                              "git would read it as an option; " + _GIT_URL_HINT)
        return
    parts = urlsplit(url)
    if parts.scheme not in GIT_SCHEMES:
        scheme = parts.scheme or "none"
        raise SourceError(f"git URL {shown!r} has an unsupported scheme {scheme!r}.",
                          "Use https://, http://, ssh://, git://, file:// or user@host:path.")
    if (parts.hostname or "").startswith("-") or (parts.username or "").startswith("-"):
        # ssh would read "-oProxyCommand=..." as an option.
        raise SourceError(f"git URL {shown!r} has a host or user that begins with '-'.",
                          "ssh would read it as an option; " + _GIT_URL_HINT)
    if parts.password is not None or (parts.username and parts.scheme in ("http", "https")):
        # A token in the URL ends up in process listings, logs and build records.
        raise SourceError(f"git URL {shown!r} carries credentials.",
                          "Remove them from the URL and configure a git credential helper "
                          "or an ssh key on the build hosts.")
    if parts.scheme == "file" and not parts.path.startswith("/"):
        raise SourceError(f"git URL {shown!r} needs an absolute path.",
                          "Write it as file:///path/to/repo.")
    if parts.scheme != "file" and not parts.hostname:
        raise SourceError(f"git URL {shown!r} names no host.", _GIT_URL_HINT)


def check_spec(spec: SourceSpec) -> None:
    """The syntactic checks that hold wherever the spec is used (no filesystem access)."""
    shown = redact_credentials(spec.location)
    if _CONTROL.search(spec.location):
        raise SourceError(f"source {shown!r} contains control characters.", _SOURCE_HINT)
    if spec.location.startswith("-"):
        raise SourceError(f"source {shown!r} begins with '-'.",
                          "Give an absolute path, a URL or image:<reference>.")
    if spec.ref is not None and spec.kind != "git":
        raise SourceError(f"a ref ({spec.ref!r}) only applies to git sources, not to {spec.kind}.",
                          "Drop --ref: it picks a branch, tag or commit of a git repository.")
    if spec.kind == "git":
        check_git_url(spec.location)
        if spec.ref is not None:
            check_ref(spec.ref)
    elif spec.kind == "directory":
        if not spec.location.startswith("/"):
            raise SourceError(f"directory source {shown!r} is not an absolute path.",
                              "Paths sent to workers must be absolute.")
    elif spec.kind == "archive":
        if _TRANSPORT.match(spec.location):
            raise SourceError(f"archive source {shown!r} uses a '<name>::' transport.",
                              _SOURCE_HINT)
        scheme = urlsplit(spec.location).scheme if "://" in spec.location else ""
        if scheme and scheme not in ARCHIVE_SCHEMES:
            raise SourceError(f"archive source {shown!r} has an unsupported scheme.",
                              "Use s3://, gs://, https:// or file:// (or a local path).")
        if not scheme and not spec.location.startswith("/"):
            raise SourceError(f"archive source {shown!r} is not an absolute path.",
                              "Paths sent to workers must be absolute.")
        if not _is_archive_name(urlsplit(spec.location).path if scheme else spec.location):
            raise SourceError(f"archive source {shown!r} does not end with "
                              ".tar, .tar.gz or .tgz.", "Pack the context with tar -czf "
                              "context.tar.gz -C DIR . and name the file so.")
    elif spec.kind == "image" and (not spec.location or any(c.isspace() for c in spec.location)):
        raise SourceError(f"image reference {shown!r} is empty or contains spaces.",
                          "Write image:<registry>/<repository>:<tag>.")


def names_local_path(source: str) -> bool:
    """Whether :func:`parse_source` takes ``source`` for a path on this host."""
    return not (source.startswith(("image:", "git+")) or "://" in source
                or _SCP_LIKE.match(source) or _TRANSPORT.match(source))


def parse_source(source: str, ref: str | None = None, look: bool = True) -> SourceSpec:
    """Turn what a user typed into a checked ``SourceSpec``.

    Local paths are resolved here, on the host that enqueues; URLs are only parsed.
    ``look=False``: a local path is a path on another host (a worker's), taken as
    written (absolute, its kind told by its name) without looking at this host's files.
    """
    if ref is not None:
        check_ref(ref)
    shown = redact_credentials(source)
    if _CONTROL.search(source):
        raise SourceError(f"source {shown!r} contains control characters.", _SOURCE_HINT)
    if not source.strip():
        raise SourceError("the source is empty.", "Give a directory, an archive, a git URL or "
                          "image:<reference>.")
    if source.startswith("-"):
        raise SourceError(f"source {shown!r} begins with '-'.",
                          "Give an absolute path, a URL or image:<reference>; "
                          "write ./-name for a local path that begins with '-'.")
    if _TRANSPORT.match(source):
        raise SourceError(f"source {shown!r} uses a git remote-helper transport ('<name>::').",
                          "Only https://, http://, ssh://, git://, file:// and user@host:path "
                          "URLs are accepted.")

    if source.startswith("image:"):
        spec = SourceSpec("image", source.removeprefix("image:"), ref)
    elif source.startswith("git+"):
        spec = SourceSpec("git", source.removeprefix("git+"), ref)
    elif "://" in source:
        spec = _parse_url(source, ref)
    elif not names_local_path(source):
        spec = SourceSpec("git", source, ref)  # user@host:path
    elif not look:
        spec = SourceSpec("archive" if _is_archive_name(source) else "directory", source, ref)
    else:
        spec = _parse_local(source, ref)
    check_spec(spec)
    return spec


def _parse_url(source: str, ref: str | None) -> SourceSpec:
    parts = urlsplit(source)
    scheme = parts.scheme.lower()
    if _is_archive_name(parts.path):
        if scheme not in ARCHIVE_SCHEMES:
            raise SourceError(f"archive URL {redact_credentials(source)!r} has an unsupported "
                              f"scheme {scheme!r}.",
                              "Archives are read from s3://, gs://, https:// or file:// stores.")
        return SourceSpec("archive", source, ref)
    if scheme in GIT_SCHEMES:
        return SourceSpec("git", source, ref)
    if scheme in ARCHIVE_SCHEMES:
        raise SourceError(f"{redact_credentials(source)!r} does not name a .tar, .tar.gz or "
                          ".tgz archive.",
                          f"A {scheme}:// source must be an archive of the build context.")
    raise SourceError(f"source {redact_credentials(source)!r} has an unsupported scheme "
                      f"{scheme!r}.",
                      "Use a local path, an archive URL (s3://, gs://, https://, file://), "
                      "a git URL or image:<reference>.")


def _parse_local(source: str, ref: str | None) -> SourceSpec:
    path = Path(source).expanduser()
    try:
        resolved = path.resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        raise SourceError(f"source path {str(path)!r} does not exist.",
                          "Check the path, or give a URL or image:<reference>.") from None
    except OSError as exc:
        raise SourceError(f"source path {str(path)!r} cannot be read: {exc.strerror}.",
                          "Make it readable by the user running buildq.") from None
    if resolved.is_dir():
        return SourceSpec("directory", str(resolved), ref)
    if resolved.is_file() and _is_archive_name(resolved.name):
        return SourceSpec("archive", str(resolved), ref)
    raise SourceError(f"source path {str(path)!r} is neither a directory nor a "
                      ".tar, .tar.gz or .tgz archive.", _SOURCE_HINT)
