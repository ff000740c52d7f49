"""Secret build args: named by the caller, valued only on the worker that builds.

A request carries secret *names* (``secrets=["PIP_TOKEN"]``); the docker pool looks
each value up where it builds (``BUILDQ_SECRET_<NAME>``, else ``<BUILDQ_SECRETS_DIR>/<NAME>``)
and the kaniko pool has the Job read it from a Kubernetes Secret. Values never travel
through the broker, the records or the logs.

With BuildKit the value reaches RUN steps as a secret mount (``RUN
--mount=type=secret,id=NAME``) and never becomes a build arg, so it is in no layer,
config or history (see :mod:`workers.builders.buildkit`). The legacy builder, used only
where BuildKit is not available, can pass a value only as a build arg, and writes
``|1 NAME=value /bin/sh -c ...`` into the image's history and ``container_config``.
:func:`scrub_saved_image` rewrites a ``docker save`` stream so the image config no
longer holds the value; the layers pass through untouched, one block at a time, so an
image of any size costs a few MiB of memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import socket
import tarfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

from config.errors import BuildError, BuildqError, InputError
from config.settings import SECRET_ENV_PREFIX, Settings

#: What a secret value is replaced with wherever it would be shown.
MASK = "***"
#: A secret name: a build arg, an environment variable and a file name all at once.
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
#: Members of a saved image up to this size are read whole to see whether they are JSON
#: metadata (configs, manifests); anything bigger is a layer and streams through.
MAX_METADATA = 4 << 20
#: Largest secret file read; a build arg is a token, not a payload.
MAX_SECRET_FILE = 64 << 10
_BLOCK = tarfile.BLOCKSIZE
_HEX64 = re.compile(r"[0-9a-f]{64}")


class MissingSecretError(BuildqError):
    """A secret build arg has no value on the worker that builds."""

    kind = "secret"


class SecretUsageError(BuildqError):
    """The Dockerfile reads a secret in a way the builder will not supply it."""

    kind = "secret"


def check_names(names: Iterable[str] | None,
                build_args: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The request's secret names, validated, sorted and without repeats."""
    if names is None:
        return ()
    if isinstance(names, str):
        # A bare string would otherwise be taken letter by letter.
        names = [names]
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str) or not NAME_RE.match(name):
            # NAME=value is a value given where only a name belongs: never repeat the value.
            shown = f"{name.partition('=')[0]}=..." if isinstance(name, str) and "=" in name \
                else repr(name)[:80]
            raise InputError(
                f"secret name {shown} is not valid.",
                "A secret is named like a build arg or environment variable: letters, digits "
                "and '_', not starting with a digit (e.g. --secret PIP_TOKEN); pass its name, "
                "never its value.")
        if build_args and name in build_args:
            raise InputError(f"{name} is given both as a build arg and as a secret.",
                             f"Drop --build-arg {name}=...: a secret's value comes from the "
                             "worker, never from the request.")
        seen.add(name)
    return tuple(sorted(seen))


def lookup(names: Iterable[str], settings: Settings, pool: str) -> dict[str, str]:
    """Each secret's value on this worker: ``BUILDQ_SECRET_<NAME>``, else the secrets dir."""
    values: dict[str, str] = {}
    for name in names:
        value = settings.build_secrets.get(name)
        if value is None and settings.secrets_dir is not None:
            value = _read_file(settings.secrets_dir / name, name)
        if not value:
            where = (f"and {settings.secrets_dir}/{name} does not exist"
                     if settings.secrets_dir is not None else "and BUILDQ_SECRETS_DIR is not set")
            raise MissingSecretError(
                f"secret build arg {name} has no value on {pool}-pool worker "
                f"{socket.gethostname()}: {SECRET_ENV_PREFIX}{name} is not set {where}"
                f"{' (or the value is empty)' if value == '' else ''}.",
                f"On every {pool}-pool worker set {SECRET_ENV_PREFIX}{name}, or mount the "
                f"secret as a file {name} in the directory named by BUILDQ_SECRETS_DIR (how a "
                "Kubernetes Secret volume is mounted), then build again.")
        values[name] = value
    return values


def _read_file(path: Path, name: str) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MissingSecretError(f"cannot read the secret file for {name}: {exc.strerror}.",
                                 "Check the file's permissions on the worker.") from None
    if len(data) > MAX_SECRET_FILE:
        raise MissingSecretError(f"the secret file for {name} is larger than "
                                 f"{MAX_SECRET_FILE} bytes.", "A build arg holds a token, "
                                 "not a payload; use a smaller value.")
    # Files written by `echo` or an editor end with a newline the value does not have.
    return data.decode("utf-8", errors="replace").removesuffix("\n").removesuffix("\r")


# --------------------------------------------------------------------------- masking


class Masker:
    """Replaces secret values, as written raw, JSON-escaped or URL-encoded, with ``***``."""

    def __init__(self, values: Iterable[str]) -> None:
        forms: set[str] = set()
        for value in values:
            if not value:
                continue
            escaped = json.dumps(value)[1:-1]
            forms.update({value, escaped, quote(value, safe=""), quote_plus(value),
                          quote(escaped, safe=""), quote_plus(escaped)})
            # A log is handled line by line: each line of a multi-line value is masked too.
            forms.update(line for line in value.splitlines() if len(line) >= 4)
        # Longest first, so a value containing another is masked whole.
        self.forms = sorted(forms, key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self.forms)

    def mask(self, text: str) -> str:
        for form in self.forms:
            if form in text:
                text = text.replace(form, MASK)
        return text

    def found_in(self, text: str) -> bool:
        return any(form in text for form in self.forms)

    def error(self, exc: BuildqError) -> BuildqError:
        """The same error with every value masked in its message and hint."""
        masked = self.mask(exc.message)
        hint = self.mask(exc.hint) if exc.hint else exc.hint
        if masked == exc.message and hint == exc.hint:
            return exc
        clean = type(exc).__new__(type(exc))
        BuildqError.__init__(clean, masked, hint)
        return clean

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """While open, HTTP client debug logs of this process mask the values.

        urllib3 logs each request line at DEBUG, and the build request's query string
        carries the build args: a worker started with ``--loglevel DEBUG`` would log them.
        """
        with _active_lock:
            _active.append(self)
        try:
            yield
        finally:
            with _active_lock:
                _active.remove(self)


_active: list[Masker] = []
_active_lock = threading.Lock()


class _LogScrubber(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        with _active_lock:
            maskers = list(_active)
        if not maskers:
            return True
        try:
            text = record.getMessage()
        except Exception:
            return True
        masked = text
        for masker in maskers:
            masked = masker.mask(masked)
        if masked != text:
            record.msg, record.args = masked, None
        return True


for _logger in ("urllib3.connectionpool", "docker", "docker.api.build"):
    logging.getLogger(_logger).addFilter(_LogScrubber())


# --------------------------------------------------------------------------- images


class _ChunkReader(io.RawIOBase):
    """A file object over an iterator of byte chunks (the engine's ``docker save`` stream)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                self._pending = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def _header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _padding(size: int) -> bytes:
    return b"\0" * (-size % _BLOCK)


def _scrub_json(value: Any, masker: Masker) -> Any:
    if isinstance(value, str):
        return masker.mask(value)
    if isinstance(value, list):
        return [_scrub_json(v, masker) for v in value]
    if isinstance(value, dict):
        return {masker.mask(k): _scrub_json(v, masker) for k, v in value.items()}
    return value


def _as_json(data: bytes) -> Any:
    if data.lstrip()[:1] not in (b"{", b"["):
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


class ScrubReport:
    """What :func:`scrub_saved_image` changed; filled in as the stream is consumed."""

    def __init__(self) -> None:
        self.config_changed = False
        self.files_changed = 0
        self.error: BaseException | None = None


def scrub_saved_image(chunks: Iterable[bytes], masker: Masker, tag: str,
                      report: ScrubReport | None = None) -> Iterator[bytes]:
    """A ``docker save`` tar stream with every secret value masked in its JSON metadata.

    The image config is re-serialized only when it held a value; its file is renamed to
    its new sha256 (the image id) and ``manifest.json`` points at it, tagged ``tag``.
    Layers stream through unchanged. ``docker load`` extracts everything before reading
    ``manifest.json``, so the metadata can come last.
    """
    report = report or ScrubReport()
    try:
        yield from _scrub(chunks, masker, tag, report)
    except BaseException as exc:
        # The generator is the body of an HTTP upload: whoever sends it may swallow or wrap
        # the exception, so it is kept where the caller looks after the upload.
        report.error = exc
        raise


def _scrub(chunks: Iterable[bytes], masker: Masker, tag: str,
           report: ScrubReport) -> Iterator[bytes]:
    held: dict[str, tuple[tarfile.TarInfo, bytes]] = {}
    with tarfile.open(fileobj=_ChunkReader(chunks), mode="r|") as src:
        for member in src:
            if not member.isfile():
                yield _header(member)
                continue
            stream = src.extractfile(member)
            assert stream is not None
            if member.size <= MAX_METADATA:
                data = stream.read()
                if _as_json(data) is not None:
                    held[member.name] = (member, data)
                    continue
                yield _header(member) + data + _padding(len(data))
                continue
            yield _header(member)
            while block := stream.read(1 << 20):
                yield block
            yield _padding(member.size)

    if "manifest.json" not in held:
        raise BuildError("the saved image has no manifest.json, so its config cannot be "
                         "cleaned of secret build args.",
                         "This Docker Engine's image format is not supported for secret build "
                         "args; use the kaniko builder or a Docker Engine 20.10 to 24.")
    out: dict[str, bytes] = {}
    for name, (_, data) in held.items():
        parsed = _as_json(data)
        clean = _scrub_json(parsed, masker)
        if clean != parsed:
            report.files_changed += 1
            data = json.dumps(clean, separators=(",", ":")).encode()
        out[name] = data
    manifest = json.loads(out["manifest.json"])
    if not isinstance(manifest, list) or not manifest:
        raise BuildError("the saved image's manifest.json lists no image.",
                         "Build again; the engine may have removed the image meanwhile.")
    renamed = False
    for entry in manifest:
        config_name = entry.get("Config", "")
        if config_name not in out:
            raise BuildError(f"the saved image's config {config_name!r} is missing.",
                             "Build again; the engine may have removed the image meanwhile.")
        data = out[config_name]
        old = _HEX64.search(config_name.rpartition("/")[2])
        if data != held[config_name][1]:
            # The config's name is its digest (the image id): a changed config is renamed.
            report.config_changed = True
            if old is None:
                raise BuildError(f"the saved image's config {config_name!r} is not named by "
                                 "its digest.", "This engine's image format is not supported "
                                 "for secret build args; use the kaniko builder.")
            digest = hashlib.sha256(data).hexdigest()
            head, _, base = config_name.rpartition("/")
            new_name = (head + "/" if head else "") + base.replace(old.group(0), digest)
            del out[config_name]
            out[new_name] = data
            entry["Config"] = new_name
            renamed = True
        entry["RepoTags"] = [tag]
    out["manifest.json"] = json.dumps(manifest, separators=(",", ":")).encode()
    if renamed:
        # An OCI index would still name the old config; load reads manifest.json without it.
        out.pop("index.json", None)
    for name, data in out.items():
        original = held.get(name, (None, b""))[0]
        info = tarfile.TarInfo(name)
        info.mode = original.mode if original is not None else 0o644
        info.mtime = original.mtime if original is not None else 0
        info.size = len(data)
        yield _header(info) + data + _padding(len(data))
    yield b"\0" * (2 * _BLOCK)
