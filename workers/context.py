"""The build context: which files the build sees, their hash, and their tarball.

One walker decides what is in the context (``.dockerignore`` applied, the Dockerfile
and ignore file always in, symlinks leaving the root refused); the source hash and
the tarball both consume it, so the tag always names exactly what was sent.

A generated Dockerfile (``BuildInputs.dockerfile_text``) is virtual: it is hashed and
packed under ``BuildInputs.dockerfile`` like a real one, but never written into the
user's directory, and a file of that name in the tree is left out in its favour.

File modes are reduced to "executable or not" (0755/0644, directories 0755) in the
hash *and* in the tarball: the umask of a checkout must not change the tag, and the
image must not differ from what the tag promises.
"""

from __future__ import annotations

import collections
import io
import itertools
import operator
import os
import queue
import re
import stat
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, BinaryIO

from blake3 import blake3

from config.errors import InputError, SourceError
from workers.path_limits import MAX_PATH_DEPTH

if TYPE_CHECKING:
    from gzip import GzipFile

    from docker.utils.build import PatternMatcher

#: Version of the hash layout; bump it when the encoding changes so old tags never match.
HASH_VERSION = b"buildq-source-hash/1\n"
#: Length of the image tag taken from the source hash.
TAG_LENGTH = 24
#: Files at least this big are hashed with BLAKE3's own threads.
BIG_FILE = 8 << 20
#: Read size for file contents; per hashing thread, so memory stays flat.
READ_CHUNK = 1 << 20
#: Files up to this size are read in one call.
SMALL_FILE = 256 << 10
#: A batch of entries (hashed together, fed to the source hash as one slab) ends at this
#: many entries or file bytes.
BATCH_FILES = 256
BATCH_BYTES = 32 << 20
#: Threads that hash, the walking one included: it reads the small files, the others the
#: large ones (see _hashed_batches). One per core, up to four.
DEFAULT_THREADS = max(1, min(4, os.cpu_count() or 1))
#: Batches queued ahead of the one being recorded; bounds memory in huge trees.
BATCHES_IN_FLIGHT = 8
#: With more than one hashing thread, files at least this big go to the helper threads and
#: smaller ones are read by the walking thread (see _hashed_batches). In the bench's tree
#: (most files a few KiB, a few of several MiB) the helper gets a tenth of the files and
#: two thirds of the bytes; 32 KiB measured about as fast, 16 KiB slower (more hand-offs).
OFFLOAD_FILE = 64 << 10
#: A Dockerfile larger than this is not a Dockerfile.
MAX_DOCKERFILE = 4 << 20
#: gzip level of the context tarball: most of level 9's ratio at a fraction of its cost.
GZIP_LEVEL = 6
#: What a generated build leaves out when the project has no ``.dockerignore`` of its own:
#: version control, virtualenvs, caches, build output and ``.env`` files (secrets). Applied
#: to the hash and the context alike, so none of them changes the tag or ships in the image.
DEFAULT_DOCKERIGNORE = (
    "**/.git", ".hg", ".svn", "**/.venv", "venv",
    "**/__pycache__", "**/*.pyc", "**/*.pyo", "**/.env*",
    ".coverage", ".coverage.*", "htmlcov", "**/.pytest_cache", "**/.mypy_cache", "**/.ruff_cache",
    ".tox", ".nox", "**/.ipynb_checkpoints", "**/node_modules",
    "dist", "build", "**/*.egg-info",
)

_MODE_EXEC = 0o755
_MODE_PLAIN = 0o644
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class BuildInputs:
    """Everything besides the files that changes the image."""

    dockerfile: str = "Dockerfile"
    build_args: tuple[tuple[str, str], ...] = ()
    target: str | None = None
    platform: str | None = None
    #: The text of a Dockerfile buildq generated for this build (not a file of the tree).
    dockerfile_text: str | None = None
    #: Names of secret build args (sorted); their values are never hashed, nor known here.
    secrets: tuple[str, ...] = ()
    #: Base images as written with the digest each resolved to, (image, digest) in order.
    bases: tuple[tuple[str, str], ...] = ()
    #: The directory inside the source that is the context (a W&B job's build_context).
    context_dir: str | None = None
    #: Ignore patterns used when the context has no ``.dockerignore`` (generated builds).
    default_ignore: tuple[str, ...] = ()

    @classmethod
    def create(
        cls,
        dockerfile: str | None,
        build_args: Mapping[str, str] | None,
        target: str | None,
        platform: str | None,
        dockerfile_text: str | None = None,
        secrets: Iterable[str] | None = None,
        *,
        context_dir: str | None = None,
        default_ignore: Iterable[str] = (),
    ) -> BuildInputs:
        from workers.secrets import check_names

        path = _clean_relative(dockerfile or "Dockerfile")
        args = tuple(sorted((str(k), str(v)) for k, v in (build_args or {}).items()))
        for key, _ in args:
            if not key or "=" in key or any(c.isspace() for c in key):
                raise InputError(f"build arg name {key!r} is not valid.",
                                 "Names are non-empty and contain no '=' or spaces.")
        return cls(path, args, target or None, (platform or "").strip() or None, dockerfile_text,
                   check_names(secrets, build_args),
                   context_dir=_clean_relative(context_dir) if context_dir else None,
                   default_ignore=tuple(default_ignore))


def _clean_relative(path: str) -> str:
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if path.startswith("/") or ".." in parts or not parts:
        raise SourceError(f"Dockerfile path {path!r} is not inside the build context.",
                          "Give it relative to the context root, e.g. docker/Dockerfile.")
    return "/".join(parts)


# Not frozen: a frozen dataclass's __init__ costs several times more, once per file.
@dataclass(slots=True)
class _Entry:
    """One thing in the context, in walk order."""

    rel: str  # '/'-separated, relative to the root
    path: str  # absolute, for reading
    kind: str  # "f" file, "d" directory, "l" symlink
    mode: int  # normalised permission bits
    size: int
    target: str  # symlink target, "" otherwise
    stamp: Stamp | None = None  # files: see _stamp


#: What the walk remembers of an entry: (mode, inode, device, size, mtime ns, ctime ns).
Stamp = tuple[int, int, int, int, int, int]
#: The stamp of an ``os.stat_result``, in C (an attribute getter): the tree index compares
#: one per entry on every cache hit.
_stamp: operator.attrgetter[Stamp] = operator.attrgetter(
    "st_mode", "st_ino", "st_dev", "st_size", "st_mtime_ns", "st_ctime_ns")
#: Positions of the two times in a stamp.
_MTIME, _CTIME = 4, 5


class _Walker:
    """Walks a context root directory by directory, in sorted order, applying ``.dockerignore``."""

    def __init__(self, root: Path, inputs: BuildInputs) -> None:
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise SourceError(f"context root {str(root)!r} is not a directory.")
        ignore_rel, patterns = _ignore_patterns(self.root, inputs.dockerfile, inputs.default_ignore)
        #: Everything that decides what the walk yields besides the tree itself.
        self.key = (self.root, inputs.dockerfile, inputs.dockerfile_text is not None,
                    ignore_rel, tuple(patterns))
        #: Paths and stamps of every directory listed and every entry yielded, in walk order
        #: (for the tree index): a listing is known unchanged while its directory's stamp is.
        self.paths: list[str] = []
        self.stamps: list[Stamp] = []
        #: Symlinks yielded, (path, rel): whether they stay inside depends on more than them.
        self.links: list[tuple[str, str]] = []
        # A generated Dockerfile replaces anything of its name: the build must see one file.
        self.virtual = inputs.dockerfile if inputs.dockerfile_text is not None else None
        # Docker sends these even when ignored: the builder needs them.
        self.forced = {inputs.dockerfile, ignore_rel}
        self.forced_dirs = {
            "/".join(f.split("/")[:i]) for f in self.forced for i in range(1, f.count("/") + 1)
        }
        self.matcher: PatternMatcher | None = None
        self.exceptions: list[str] = []
        self.wild_exceptions = False
        if patterns:
            from docker.utils.build import PatternMatcher

            self.matcher = PatternMatcher(patterns)
            for pattern in self.matcher.patterns:
                if pattern.exclusion:
                    self.exceptions.append(pattern.cleaned_pattern)
                    self.wild_exceptions |= any(c in pattern.cleaned_pattern for c in "*?[\\")

    def __iter__(self) -> Iterator[_Entry]:
        # Stamped before it is listed: an entry added during the listing moves the stamp.
        self.paths.append(self.root)
        self.stamps.append(_stamp(os.lstat(self.root)))
        return self._walk(self.root, "", [])

    def _excluded(self, rel: str) -> bool:
        if self.virtual is not None and (rel == self.virtual or rel.startswith(self.virtual + "/")):
            return True
        if self.matcher is None or rel in self.forced:
            return False
        return bool(self.matcher.matches(rel))

    def _may_hold_included(self, rel: str) -> bool:
        """Whether an excluded directory can still contain something the build sees."""
        if rel in self.forced_dirs or self.wild_exceptions:
            return True
        prefix = rel + "/"
        return any((pattern + "/").startswith(prefix) for pattern in self.exceptions)

    def _walk(self, directory: str, rel_dir: str, pending: list[_Entry]) -> Iterator[_Entry]:
        try:
            with os.scandir(directory) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            raise SourceError(f"cannot list {rel_dir or '.'!r} in the context: "
                              f"{exc.strerror}.") from None
        # Per entry work is most of a warm hash: the common case (no .dockerignore, a clean
        # name) takes no extra call.
        unfiltered = self.matcher is None and self.virtual is None
        unsafe = _UNSAFE_NAME.search
        paths, stamps = self.paths, self.stamps
        for child in children:
            rel = f"{rel_dir}/{child.name}" if rel_dir else child.name
            try:
                st = child.stat(follow_symlinks=False)
            except OSError as exc:
                raise SourceError(f"cannot read {rel!r} in the context: {exc.strerror}.") from None
            excluded = False if unfiltered else self._excluded(rel)
            if not excluded and unsafe(rel):
                _check_name(rel)
            if stat.S_ISDIR(st.st_mode):
                if rel.count("/") + 1 > MAX_PATH_DEPTH:
                    # The walk recurses per directory: deeper would overflow Python's stack.
                    raise SourceError(f"{_shown(rel)} in the context is nested more than "
                                      f"{MAX_PATH_DEPTH} directories deep.",
                                      "Flatten that tree or add it to .dockerignore.")
                entry = _Entry(rel, child.path, "d", _MODE_EXEC, 0, "")
                if not excluded:
                    if pending:
                        yield from pending
                        pending.clear()
                    # Stamped (by the stat above) before it is listed, as the root is.
                    paths.append(child.path)
                    stamps.append(_stamp(st))
                    yield entry
                    yield from self._walk(child.path, rel, pending)
                elif self._may_hold_included(rel) and rel != self.virtual:
                    paths.append(child.path)
                    stamps.append(_stamp(st))
                    # Announced only if something inside turns out to be included.
                    pending.append(entry)
                    yield from self._walk(child.path, rel, pending)
                    if pending and pending[-1] is entry:
                        pending.pop()
                continue
            if excluded:
                continue
            stamp = _stamp(st)
            if stat.S_ISREG(st.st_mode):
                mode = _MODE_EXEC if st.st_mode & stat.S_IXUSR else _MODE_PLAIN
                entry = _Entry(rel, child.path, "f", mode, st.st_size, "", stamp)
            elif stat.S_ISLNK(st.st_mode):
                entry = _Entry(rel, child.path, "l", 0o777, 0, self._link_target(child.path, rel))
                self.links.append((child.path, rel))
            elif stat.S_ISSOCK(st.st_mode):
                continue  # docker skips sockets too; they are runtime leftovers
            else:
                raise SourceError(f"{rel!r} in the context is a device or FIFO.",
                                  "Remove it or add it to .dockerignore.")
            if pending:
                yield from pending
                pending.clear()
            paths.append(child.path)
            stamps.append(stamp)
            yield entry

    def _link_target(self, path: str, rel: str) -> str:
        target = os.readlink(path)
        resolved = os.path.realpath(path)
        if resolved != self.root and not resolved.startswith(self.root + os.sep):
            raise SourceError(f"symlink {rel!r} -> {target!r} points outside the build context.",
                              "Replace it with the file itself or add it to .dockerignore.")
        return target


_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


def _shown(rel: str, limit: int = 120) -> str:
    """A path as a message can hold it: escaped, its middle cut when it is long."""
    if len(rel) > limit:
        rel = f"{rel[:limit // 2]}...{rel[-limit // 2:]}"
    # os.scandir hands undecodable bytes over as lone surrogates: show the bytes (\xe9).
    return re.sub(r"\\udc([89a-f][0-9a-f])", r"\\x\1", repr(rel))


def _check_name(rel: str) -> None:
    """Refuse names the build could not show or log faithfully.

    The same rule holds for archives, and ``buildq build DIR`` with remote workers ships
    the directory as one: a name must fail the same way in both modes, and early.
    """
    if _UNSAFE_NAME.search(rel):
        raise SourceError(f"{_shown(rel)} in the context has a control character (such as a "
                          "newline) or bytes that are not UTF-8 in its name.",
                          "Rename it or add it to .dockerignore.")


def _ignore_patterns(root: str, dockerfile: str, defaults: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """The ignore file that applies and its patterns (``defaults`` when there is none).

    BuildKit prefers ``<Dockerfile>.dockerignore`` beside the Dockerfile over the root one.
    """
    candidates = [f"{dockerfile}.dockerignore", ".dockerignore"]
    for rel in candidates:
        path = os.path.join(root, rel)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8", errors="surrogateescape") as f:
                    lines = [line.strip() for line in f.read(MAX_DOCKERFILE).splitlines()]
            except OSError as exc:
                raise SourceError(f"cannot read {rel!r}: {exc.strerror}.") from None
            patterns = [line.removeprefix("/") for line in lines if line and line[0] != "#"]
            return rel, patterns
    return ".dockerignore", list(defaults)


def has_ignore_file(root: Path, dockerfile: str = "Dockerfile") -> bool:
    """Whether the context brings its own ignore file (then no default applies)."""
    return any(os.path.isfile(os.path.join(root, rel))
               for rel in (f"{dockerfile}.dockerignore", ".dockerignore"))


def context_root(root: Path, inputs: BuildInputs) -> Path:
    """The directory the build's context is: ``root``, or the job's build_context inside it."""
    if inputs.context_dir is None:
        return root
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(real_root, inputs.context_dir))
    if not path.startswith(real_root + os.sep) or not os.path.isdir(path):
        raise SourceError(f"the build context {inputs.context_dir!r} is not a directory inside "
                          "the source.", "Fix the job's source.build_context.")
    return Path(path)


def context_files(root: Path, inputs: BuildInputs) -> Iterator[str]:
    """Relative paths of the regular files the build sees, in walk order."""
    for entry in _Walker(context_root(root, inputs), inputs):
        if entry.kind == "f":
            yield entry.rel


def _dockerfile_bytes(root: Path, inputs: BuildInputs) -> bytes:
    root = context_root(root, inputs)
    if inputs.dockerfile_text is not None:
        data = _encode(inputs.dockerfile_text)
        if len(data) > MAX_DOCKERFILE:
            raise SourceError(f"the generated Dockerfile is larger than {MAX_DOCKERFILE} bytes.")
        return data
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(real_root, inputs.dockerfile))
    if not path.startswith(real_root + os.sep):
        raise SourceError(f"Dockerfile {inputs.dockerfile!r} resolves outside the build context.",
                          "Keep the Dockerfile inside the context directory.")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_DOCKERFILE + 1)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise SourceError(f"no Dockerfile at {inputs.dockerfile!r} in the build context.",
                          "Add one, or name it with --dockerfile.") from None
    except OSError as exc:
        raise SourceError(f"cannot read {inputs.dockerfile!r}: {exc.strerror}.") from None
    if len(data) > MAX_DOCKERFILE:
        raise SourceError(f"{inputs.dockerfile!r} is larger than {MAX_DOCKERFILE} bytes.",
                          "Is --dockerfile pointing at the right file?")
    return data


def read_dockerfile(root: Path, inputs: BuildInputs) -> str:
    """The Dockerfile's text; SourceError if it is missing or outside the context."""
    return _dockerfile_bytes(root, inputs).decode("utf-8", errors="replace")


# --- hashing -----------------------------------------------------------------------------

_buffers = threading.local()

# What a process remembers between hashes: a file's digest and a whole tree's walk, each
# trusted only while the stamps it was made from are unchanged. A stamp is (mode, inode,
# device, size, mtime, ctime): any write moves mtime and ctime, a chmod or a rename moves
# ctime, a replaced file has another inode, and an entry added to or removed from a
# directory moves that directory's mtime. ctime cannot be set back from user space.
#
# The "racy" case (git's name): timestamps have a granularity (the kernel's clock tick,
# 1-10 ms, on nanosecond filesystems; a second or two on others), so a file written twice
# within one tick may keep its stamp across the second write. A stamp newer than RACY_NS
# before the hash began is therefore never trusted: such a file's digest is not
# remembered, and a tree holding such an entry (or directory) is not remembered either,
# so the next hash reads it again. Once older, any later change moves ctime past it.

#: Digests of files seen before in this process, keyed by path; valid while the stamp is.
_stat_cache: dict[str, tuple[Stamp, bytes]] = {}
_stat_cache_lock = threading.Lock()
#: Entries kept before the cache is dropped wholesale (about 200 bytes each).
STAT_CACHE_LIMIT = 200_000
#: How recent a stamp may be and still be trusted later: a second or two of timestamp
#: granularity (FAT, some network filesystems) and a little clock skew, with room to spare.
RACY_NS = 2_000_000_000


@dataclass(slots=True)
class _Walked:
    """What the tree index keeps of one walk: every stamp it depended on, and the hash of
    its entries (the source hash's state after the entry list, before the inputs)."""

    paths: list[str]
    stamps: list[Stamp]
    links: list[tuple[str, str]]
    entries_hasher: blake3
    #: The paths and stamps as the native check reads them (see _pack_stamps), or None.
    packed: tuple[bytes, bytes] | None = None


try:
    import workers._stamps as _native_stamps
except ImportError:  # built by the project's install; without a compiler, the Python check
    _native_stamps = None  # type: ignore[assignment]

#: The tree index's stamp check in C (workers/_stamps.c), or None for the Python one. The
#: one switch for it: tests and benchmarks set it to None to measure or test the Python check.
NATIVE_STAMPS: ModuleType | None = _native_stamps
#: A remembered tree of at least this many paths is checked on NATIVE_STAMP_THREADS threads
#: (each lstat is a syscall of a couple of microseconds; a thread costs tens of them).
#: Three on two cores: a hit usually follows an idle moment, and a thread woken onto an idle
#: virtual CPU may start milliseconds late. The threads share the paths as they go (see
#: _stamps.c), so a late one costs nothing: with a third, the check of 5,107 paths after an
#: idle moment took 5.6 ms where two took 9.8 (bench/stamps_bench.py; 5.4 ms without one).
NATIVE_SPLIT_AT = 512
NATIVE_STAMP_THREADS = 3
#: One path's record for the native check: where its path starts in the NUL-separated
#: paths, then its stamp (mode, inode, device, size, mtime ns, ctime ns); see _stamps.c.
_STAMP_RECORD = struct.Struct("=qQQQqqq")


def _pack_stamps(paths: list[str], stamps: list[Stamp]) -> tuple[bytes, bytes] | None:
    """The paths and their stamps as _stamps.unchanged reads them; None if one does not fit."""
    encoded = [os.fsencode(path) + b"\0" for path in paths]
    offsets = itertools.accumulate(map(len, encoded), initial=0)
    try:
        records = b"".join(map(_STAMP_RECORD.pack, offsets, *zip(*stamps, strict=True)))
    except struct.error:  # a time past 2262 or a negative inode: the Python check copes
        return None
    return b"".join(encoded), records


class TreeIndex:
    """The walks of the last few context roots, so a tree hashed before costs one ``lstat``
    per entry instead of a walk (compared in C without the GIL, see NATIVE_STAMPS).

    A remembered walk is used only when every directory it listed and every entry it
    yielded has its stamp still; symlinks are checked again for leaving the root (that
    can depend on the tree's surroundings). Anything else — an error, a changed stamp —
    and the tree is walked as if never seen.
    """

    #: Roots remembered; the least recently used goes first.
    MAX_TREES = 16
    #: Entries remembered over all trees (a path and a stamp, and their packed form for
    #: the native check: about 470 bytes each).
    MAX_ENTRIES = 200_000

    def __init__(self) -> None:
        self._walks: collections.OrderedDict[tuple[object, ...], _Walked] = collections.OrderedDict()
        self._lock = threading.Lock()
        #: Hashes answered from a remembered walk / by walking (tests and benchmarks read them).
        self.hits = 0
        self.misses = 0

    def lookup(self, walker: _Walker) -> blake3 | None:
        """A copy of the entries' hasher of the tree ``walker`` would walk, if unchanged."""
        with self._lock:
            walked = self._walks.get(walker.key)
            if walked is not None:
                self._walks.move_to_end(walker.key)
        if walked is not None and self._unchanged(walked, walker):
            self.hits += 1
            return walked.entries_hasher.copy()
        self.misses += 1
        return None

    @staticmethod
    def _unchanged(walked: _Walked, walker: _Walker) -> bool:
        try:
            native = NATIVE_STAMPS
            if native is not None and walked.packed is not None:
                threads = NATIVE_STAMP_THREADS if len(walked.paths) >= NATIVE_SPLIT_AT else 1
                if not native.unchanged(*walked.packed, threads):
                    return False
            elif list(map(_stamp, map(os.lstat, walked.paths))) != walked.stamps:
                return False
            for path, rel in walked.links:
                walker._link_target(path, rel)
        except (OSError, SourceError):
            return False
        return True

    def remember(self, walker: _Walker, entries_hasher: blake3, started_ns: int) -> None:
        """Keep the walk ``walker`` just made, unless an entry is too recent to trust."""
        stamps = walker.stamps
        if not stamps or len(stamps) > self.MAX_ENTRIES:
            return
        newest = max(max(s[_MTIME], s[_CTIME]) for s in stamps)
        if newest > started_ns - RACY_NS:
            return
        packed = _pack_stamps(walker.paths, stamps) if NATIVE_STAMPS is not None else None
        walked = _Walked(walker.paths, stamps, walker.links, entries_hasher.copy(), packed)
        with self._lock:
            self._walks[walker.key] = walked
            self._walks.move_to_end(walker.key)
            total = sum(len(w.paths) for w in self._walks.values())
            while len(self._walks) > self.MAX_TREES or total > self.MAX_ENTRIES:
                _, dropped = self._walks.popitem(last=False)
                total -= len(dropped.paths)

    def clear(self) -> None:
        with self._lock:
            self._walks.clear()
            self.hits = self.misses = 0


#: This process's tree index (a control worker keeps it between requests).
TREE_INDEX = TreeIndex()


def clear_stat_cache() -> None:
    """Forget every remembered digest and walk (tests and benchmarks want a cold start)."""
    with _stat_cache_lock:
        _stat_cache.clear()
    TREE_INDEX.clear()


def _open_entry(entry: _Entry) -> int:
    """A descriptor for a walked file; refuses one swapped for a symlink since the walk."""
    try:
        return os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SourceError(f"cannot read {entry.rel!r} in the context: {exc.strerror}.") from None


def _digest_file(entry: _Entry) -> bytes:
    """BLAKE3 of a file's first ``size`` bytes (what the tarball will carry).

    A small file is read whole in one call; a larger one in fixed chunks into a per-thread
    buffer, so big files cost no memory.
    """
    if entry.size <= SMALL_FILE:
        return _digest_small_file(entry)
    hasher = blake3(max_threads=blake3.AUTO) if entry.size >= BIG_FILE else blake3()
    buf: bytearray | None = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = bytearray(READ_CHUNK)
    view = memoryview(buf)
    left = entry.size
    fd = _open_entry(entry)
    try:
        with open(fd, "rb", buffering=0, closefd=False) as f:
            # Stops at the walked size: a file that grew since is hashed as tar packs it.
            while left > 0 and (n := f.readinto(view[: min(left, READ_CHUNK)])):
                hasher.update(view[:n])
                left -= n
    except OSError as exc:
        raise SourceError(f"cannot read {entry.rel!r} in the context: {exc.strerror}.") from None
    finally:
        os.close(fd)
    if left:
        raise SourceError(f"{entry.rel!r} shrank while it was being hashed.",
                          "Do not modify the source while a build is being prepared.")
    return hasher.digest()


def _digest_small_file(entry: _Entry) -> bytes:
    # Most files of a source tree: open, one read, close — no file object, no buffer.
    fd = _open_entry(entry)
    try:
        data = os.read(fd, entry.size)
        while len(data) < entry.size and (more := os.read(fd, entry.size - len(data))):
            data += more
    except OSError as exc:
        raise SourceError(f"cannot read {entry.rel!r} in the context: {exc.strerror}.") from None
    finally:
        os.close(fd)
    if len(data) < entry.size:
        raise SourceError(f"{entry.rel!r} shrank while it was being hashed.",
                          "Do not modify the source while a build is being prepared.")
    return blake3(data).digest()


_ENTRY_HEAD = struct.Struct(">cHQ")
_KIND_BYTES = {"f": b"f", "d": b"d", "l": b"l"}
_SIZE = struct.Struct(">Q")


def _field(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data


def _encode(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogateescape")


def _file_digests(files: list[_Entry]) -> list[bytes]:
    """The content digests of ``files``, taken from ``_stat_cache`` while a stamp holds.

    New digests are remembered once per call (a lock per file cost more than the lookup).
    """
    cached = _stat_cache.get
    # Taken before any file is read, so never later than the time each is read: a stamp
    # older than this minus RACY_NS is old enough to remember (see RACY_NS).
    trusted_before = time.time_ns() - RACY_NS
    digests: list[bytes] = []
    remembered: list[tuple[str, tuple[Stamp, bytes]]] = []
    for entry in files:
        stamp = entry.stamp
        hit = cached(entry.path) if stamp is not None else None
        if hit is not None and hit[0] == stamp:
            digests.append(hit[1])
            continue
        digest = _digest_file(entry)
        digests.append(digest)
        if stamp is not None and max(stamp[_MTIME], stamp[_CTIME]) < trusted_before:
            remembered.append((entry.path, (stamp, digest)))
    if remembered:
        with _stat_cache_lock:
            if len(_stat_cache) + len(remembered) > STAT_CACHE_LIMIT:
                _stat_cache.clear()
            _stat_cache.update(remembered)
    return digests


def _large_files(batch: list[_Entry]) -> list[_Entry]:
    return [entry for entry in batch if entry.kind == "f" and entry.size >= OFFLOAD_FILE]


def _entries_input(batch: list[_Entry], large_digests: list[bytes] | None) -> bytes:
    """What a batch of entries adds to the source hash, in walk order.

    Per entry: kind, mode, then the length-prefixed path; a file adds its size and content
    digest, a symlink its length-prefixed target. Gathered into one slab: one hasher
    update per entry costs more than the hashing on a tree of small files.

    ``large_digests`` are those of ``_large_files(batch)``, hashed by a helper thread;
    without them every file is read here.
    """
    if large_digests is None:
        small = large = iter(_file_digests([entry for entry in batch if entry.kind == "f"]))
    else:
        small = iter(_file_digests(
            [entry for entry in batch if entry.kind == "f" and entry.size < OFFLOAD_FILE]))
        large = iter(large_digests)
    parts: list[bytes] = []
    append = parts.append
    head = _ENTRY_HEAD.pack
    size_of = _SIZE.pack
    for entry in batch:
        rel = _encode(entry.rel)
        kind = entry.kind
        append(head(_KIND_BYTES[kind], entry.mode, len(rel)))
        append(rel)
        if kind == "f":
            append(size_of(entry.size))
            append(next(large) if entry.size >= OFFLOAD_FILE else next(small))
        elif kind == "l":
            append(_field(_encode(entry.target)))
    return b"".join(parts)


def _hashed_batches(entries: Iterator[_Entry], threads: int) -> Iterator[tuple[int, bytes]]:
    """(entries in the batch, their ``_entries_input``) for the entries in walk order.

    With more than one thread, the walking thread hashes the small files itself and
    ``threads - 1`` helpers hash the large ones, a batch at a time. Reads and BLAKE3
    release the GIL, but while another thread wants it each release is a hand-off (a
    futex wake and a context switch): with every file split between two pool threads
    beside the walk, a cold hash burnt ~1.1 s of CPU for ~0.6 s of work. A small file
    costs four releases (open, read, close, BLAKE3), a large one a few per megabyte, so
    the helpers get most of the bytes and few of the files.
    """
    if threads <= 1:
        for batch in _batches(entries):
            yield len(batch), _entries_input(batch, None)
        return
    window: collections.deque[tuple[list[_Entry], _Reply]] = collections.deque()
    helpers = _Helpers(threads - 1)
    try:
        for batch in _batches(entries):
            window.append((batch, helpers.submit(_large_files(batch))))
            # The helpers stay a few batches ahead, so the walking thread never waits.
            if len(window) > BATCHES_IN_FLIGHT:
                done, reply = window.popleft()
                yield len(done), _entries_input(done, _Helpers.result(reply))
        while window:
            done, reply = window.popleft()
            yield len(done), _entries_input(done, _Helpers.result(reply))
    finally:
        helpers.close()


#: Where a helper hands back one batch's digests, or the error that stopped it.
_Reply = queue.SimpleQueue[tuple[list[bytes], BaseException | None]]


class _Helpers:
    """Threads that hash the large files of batches; each batch gets its own reply.

    Not a ThreadPoolExecutor: importing concurrent.futures (and logging with it) took
    ~7 ms, a tenth of a cold process's start-up.
    """

    def __init__(self, count: int) -> None:
        self._jobs: queue.SimpleQueue[tuple[list[_Entry], _Reply] | None] = queue.SimpleQueue()
        self._stopping = False
        self._threads = [threading.Thread(target=self._run, name="buildq-hash", daemon=True)
                         for _ in range(count)]
        for thread in self._threads:
            thread.start()

    def submit(self, files: list[_Entry]) -> _Reply:
        reply: _Reply = queue.SimpleQueue()
        self._jobs.put((files, reply))
        return reply

    @staticmethod
    def result(reply: _Reply) -> list[bytes]:
        digests, error = reply.get()
        if error is not None:
            raise error
        return digests

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            files, reply = job
            if self._stopping:  # the hash failed or was abandoned: skip what is queued
                continue
            try:
                reply.put((_file_digests(files), None))
            except BaseException as exc:  # handed to the walking thread, which raises it
                reply.put(([], exc))

    def close(self) -> None:
        """Stop the threads once they finish the file in hand; queued batches are dropped."""
        self._stopping = True
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()


def _batches(entries: Iterator[_Entry]) -> Iterator[list[_Entry]]:
    batch: list[_Entry] = []
    size = 0
    for entry in entries:
        batch.append(entry)
        size += entry.size
        if len(batch) >= BATCH_FILES or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def source_hash(root: Path, inputs: BuildInputs, threads: int | None = None) -> str:
    """A 64-hex content hash of the context the build sees and of the build inputs.

    Independent of mtimes, owners, listing order and where the tree lives on disk.
    """
    dockerfile = _dockerfile_bytes(root, inputs)
    walker = _Walker(context_root(root, inputs), inputs)
    hasher = TREE_INDEX.lookup(walker)
    if hasher is None:
        started_ns = time.time_ns()
        hasher = _hash_entries(walker, threads if threads is not None else DEFAULT_THREADS)
        TREE_INDEX.remember(walker, hasher, started_ns)
    return _hash_inputs(hasher, inputs, dockerfile)


def _hash_entries(walker: _Walker, workers: int) -> blake3:
    """The source hash's state after the entry list: the part a tree index can keep."""
    hasher = blake3(HASH_VERSION)
    count = 0
    for batch_count, data in _hashed_batches(iter(walker), workers):
        count += batch_count
        hasher.update(data)
    # The entry count closes the file list so no input field can pose as an entry.
    hasher.update(b"\x00end" + struct.pack(">Q", count))
    return hasher


def _hash_inputs(hasher: blake3, inputs: BuildInputs, dockerfile: bytes) -> str:
    """The source hash: the entries' state, then the Dockerfile and the other inputs."""
    hasher.update(_field(_encode(inputs.dockerfile)) + _field(dockerfile))
    hasher.update(struct.pack(">Q", len(inputs.build_args)))
    for key, value in inputs.build_args:
        hasher.update(_field(_encode(key)) + _field(_encode(value)))
    for optional in (inputs.target, inputs.platform):
        hasher.update(b"\x00" if optional is None else b"\x01" + _field(_encode(optional)))
    if inputs.secrets:
        # Names only (a rotated value keeps the tag). Appended only when present, so the
        # tags of builds without secrets stay what they were; the fields above are
        # self-delimiting, so no input without secrets can end the way this does.
        hasher.update(b"\x00secrets" + struct.pack(">Q", len(inputs.secrets)))
        for name in inputs.secrets:
            hasher.update(_field(_encode(name)))
    if inputs.bases:
        # Resolved base images: a moved base tag must give a new hash. Appended only when
        # present, for the same reason as the secrets above.
        hasher.update(b"\x00bases" + struct.pack(">Q", len(inputs.bases)))
        for image, base_digest in inputs.bases:
            hasher.update(_field(_encode(image)) + _field(_encode(base_digest)))
    return hasher.hexdigest()


def image_tag(source_hash: str) -> str:
    """The image tag for a source hash: its first 24 hex characters (96 bits)."""
    if not _HEX64.match(source_hash):
        raise ValueError(f"not a source hash: {source_hash!r}")
    return source_hash[:TAG_LENGTH]


# --- the tarball -------------------------------------------------------------------------


class _CountingWriter:
    """Counts the compressed bytes on their way to ``out``."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.written = 0

    def write(self, data: bytes) -> int:
        self.out.write(data)
        self.written += len(data)
        return len(data)

    def flush(self) -> None:
        self.out.flush()


def write_context(root: Path, inputs: BuildInputs, out: BinaryIO, *,
                  require_dockerfile: bool = True) -> int:
    """Stream a deterministic ``.tar.gz`` of the context into ``out``; returns bytes written.

    Same walk as ``source_hash``; times, owners and the gzip header are fixed, so the
    same context always gives the same bytes. A generated Dockerfile goes in last.
    ``require_dockerfile=False`` packs a source that may still get a generated one
    where it is built.
    """
    # Imported here (and gzip in _gzip_writer), not at the top: a process that only
    # hashes should not pay for them.
    import tarfile

    dockerfile: bytes | None = None
    if require_dockerfile or inputs.dockerfile_text is not None:
        dockerfile = _dockerfile_bytes(root, inputs)  # fail before writing anything if missing
    root = context_root(root, inputs)
    counter = _CountingWriter(out)
    with _gzip_writer(counter) as gz, tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for entry in _Walker(root, inputs):
            info = tarfile.TarInfo(entry.rel)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = entry.mode
            if entry.kind == "d":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif entry.kind == "l":
                info.type = tarfile.SYMTYPE
                info.linkname = entry.target
                tar.addfile(info)
            else:
                info.size = entry.size
                fd = _open_entry(entry)
                try:
                    with open(fd, "rb") as f:
                        tar.addfile(info, f)
                except OSError as exc:
                    raise SourceError(f"cannot pack {entry.rel!r}: {exc}.") from None
        if inputs.dockerfile_text is not None and dockerfile is not None:
            info = tarfile.TarInfo(inputs.dockerfile)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = _MODE_PLAIN
            info.size = len(dockerfile)
            tar.addfile(info, io.BytesIO(dockerfile))
    return counter.written


def _gzip_writer(out: _CountingWriter) -> GzipFile:
    """A gzip stream into ``out`` whose header carries no timestamp and no file name."""
    try:
        # isal's igzip writes the same gzip format ~10x faster than zlib on incompressible
        # data (~370 vs ~33 MB/s), which makes compression keep up with an upload. Its levels
        # run 0-3; 2 (its default) compresses about like zlib's 6.
        from isal.igzip import GzipFile as IsalGzipFile
    except ImportError:  # pragma: no cover - isal is a dependency; zlib remains a fallback
        from gzip import GzipFile as ZlibGzipFile

        return ZlibGzipFile(filename="", mode="wb", fileobj=out, compresslevel=GZIP_LEVEL, mtime=0)
    return IsalGzipFile(filename="", mode="wb", fileobj=out, compresslevel=2, mtime=0)
