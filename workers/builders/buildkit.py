"""Builds with BuildKit through the docker CLI, the way the ecosystem drives it.

The docker SDK speaks only to the legacy builder, so a BuildKit build runs
``docker buildx build`` when a buildx plugin is installed, else ``DOCKER_BUILDKIT=1
docker build`` with a CLI that has BuildKit built in (Debian's docker.io 20.10 has; the
static 28.x client without buildx has not). Which CLI is found once per process.

One build gets a private temporary directory (0700): its own ``DOCKER_CONFIG`` with the
registry logins the build needs (never an argument), one file per secret for
``--secret id=NAME,src=FILE``, and the image id file. The context streams from the store
into the CLI's stdin; ``--progress=plain`` lines go to the build log as they come; a
failing step is reported like the legacy builder's (step, instruction, last lines).

Which Dockerfile frontend parses the file: a ``# syntax=`` line's image; else the image
``BUILDQ_DOCKERFILE_FRONTEND`` names (passed as ``BUILDKIT_SYNTAX``, which also stands in
for an official ``docker/dockerfile:1`` line that cannot be pulled); else the engine's
built-in one. Engine 20.10's built-in frontend (BuildKit v0.8) knows no ``COPY --link``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import posixpath
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

from config.errors import BuildCancelledError, BuildError, BuildqError
from workers.builders.base import BuildRequest, EngineUnavailableError, LogFn
from workers.secrets import SecretUsageError

#: Output lines kept per step, to quote the failing one's.
TAIL_LINES = 8
#: Lines of that tail quoted in a failing RUN step's error.
QUOTED_LINES = 5
#: Seconds a probe of a docker CLI may take.
PROBE_TIMEOUT = 20.0
#: Context bytes held in memory while looking for the Dockerfile; beyond, they spill to disk.
SPOOL_MEMORY = 8 << 20
#: Largest Dockerfile read ahead of the build (workers.context refuses larger ones anyway).
MAX_DOCKERFILE = 4 << 20
#: How long a frontend image that could not be pulled is not asked for again.
FRONTEND_RETRY_SECONDS = 600.0
#: Network modes BuildKit knows; the legacy builder's default network is its "default".
NETWORKS = {"default": "default", "bridge": "default", "none": "none", "host": "host"}
#: Where the limit a user hits on timeouts comes from.
TIMEOUT_SETTING = "BUILDQ_BUILD_TIMEOUT"

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_VERTEX = re.compile(r"^#(\d+) (.*)$")
_OUTPUT = re.compile(r"^\d+\.\d+ (.*)$")
_STEP = re.compile(r"^\[(?:(?P<stage>[^\]\s]+) )?(?P<step>\d+/\d+)\] (?P<instr>\S+)\s*(?P<arg>.*)$")
_EXIT_CODE = re.compile(r"exit code: (\d+)")
_CACHE_IMPORT = "importing cache manifest from "
_LOAD_METADATA = "[internal] load metadata for "
_RESOLVE_FRONTEND = "resolve image config for "
_DIRECTIVE = re.compile(r"^#\s*([A-Za-z][A-Za-z0-9]*)\s*=\s*(.*?)\s*$")
_OFFICIAL_FRONTEND = re.compile(
    r"^(?:docker\.io/)?docker/dockerfile:1(?:\.\d+){0,2}(?:@sha256:[0-9a-f]{64})?$")
_ENGINE_GONE = ("cannot connect to the docker daemon", "error during connect",
                "is the docker daemon running")
#: The setting naming the Dockerfile frontend image the docker pool builds with.
FRONTEND_SETTING = "BUILDQ_DOCKERFILE_FRONTEND"
#: What the record says when the engine's own Dockerfile frontend built the image.
BUILT_IN = "built-in"
#: An instruction flag the engine's built-in Dockerfile frontend does not know yet.
_NEWER_FRONTEND_HINT = (
    "The flag is newer than this Docker Engine's built-in Dockerfile frontend (COPY --link, "
    f"for one, needs Dockerfile syntax 1.4): set {FRONTEND_SETTING} on the docker-pool "
    "workers to a Dockerfile frontend image their engine can pull (see the README), start "
    "the Dockerfile with '# syntax=docker/dockerfile:1' on build hosts that can pull that "
    "image, or upgrade the build hosts' Docker Engine (23.0 or newer); otherwise drop the flag.")
#: How a frontend image that was found but could not run shows in BuildKit's error.
_NOT_STARTED = ("network bridge not found", "failed to create shim", "oci runtime")
_PREFIXES = ("failed to solve with frontend dockerfile.v0: ", "failed to solve: ",
             "rpc error: code = Unknown desc = ", "failed to create LLB definition: ")


# --------------------------------------------------------------------------- the CLI


@dataclass(frozen=True)
class Cli:
    """A docker CLI that drives BuildKit, and how."""

    path: str
    buildx: bool

    @property
    def command(self) -> list[str]:
        return [self.path, "buildx", "build"] if self.buildx else [self.path, "build"]

    def describe(self) -> str:
        return f"{self.path} buildx build" if self.buildx else \
            f"DOCKER_BUILDKIT=1 {self.path} build"


_found: dict[tuple[str, str], tuple[Cli | None, str]] = {}
_found_lock = threading.Lock()


def find_cli(search_path: str | None = None,
             docker_config: Path | None = None) -> tuple[Cli | None, str]:
    """The docker CLI to build with on ``search_path`` (default ``$PATH``), or why there is none.

    Every ``docker`` on the path is asked: the first with a buildx plugin (looked for in
    ``docker_config``'s ``cli-plugins`` too) wins; else the first whose ``build`` has
    BuildKit built in. Probed once per process, path and config directory.
    """
    search = os.environ.get("PATH", "") if search_path is None else search_path
    key = (search, str(docker_config or ""))
    with _found_lock:
        if key not in _found:
            _found[key] = _probe(search, docker_config)
        return _found[key]


def _candidates(search: str) -> list[str]:
    seen: set[str] = set()
    found = []
    for directory in search.split(os.pathsep):
        path = os.path.join(directory or ".", "docker")
        if os.path.isfile(path) and os.access(path, os.X_OK):
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                found.append(path)
    return found


def _probe(search: str, docker_config: Path | None) -> tuple[Cli | None, str]:
    candidates = _candidates(search)
    if not candidates:
        return None, "no docker CLI on PATH"
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_BUILDKIT"}
    if docker_config is not None:
        env["DOCKER_CONFIG"] = str(docker_config)
    classic: Cli | None = None
    for path in candidates:
        if _answers([path, "buildx", "version"], env):
            return Cli(path, buildx=True), ""
        if classic is None and "--secret" in _output([path, "build", "--help"],
                                                     {**env, "DOCKER_BUILDKIT": "1"}):
            classic = Cli(path, buildx=False)
    if classic is not None:
        return classic, ""
    return None, (f"no docker CLI on PATH has BuildKit ({', '.join(candidates)}: no buildx "
                  "plugin, no built-in BuildKit)")


def _answers(argv: list[str], env: Mapping[str, str]) -> bool:
    try:
        return subprocess.run(argv, env=dict(env), capture_output=True, timeout=PROBE_TIMEOUT,
                              stdin=subprocess.DEVNULL).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _output(argv: list[str], env: Mapping[str, str]) -> str:
    try:
        done = subprocess.run(argv, env=dict(env), capture_output=True, timeout=PROBE_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (done.stdout + done.stderr).decode("utf-8", "replace") if done.returncode == 0 else ""


# --------------------------------------------------------------------------- the Dockerfile


def syntax_directive(text: str) -> tuple[str, int] | None:
    """The ``# syntax=`` frontend image and its line index, if the Dockerfile names one.

    Parser directives are the comment lines at the very top; the first other line
    (blank, comment or instruction) ends them.
    """
    for index, line in enumerate(text.lstrip("\ufeff").splitlines()):
        match = _DIRECTIVE.match(line)
        if not match:
            return None
        if match.group(1).lower() == "syntax" and match.group(2):
            return match.group(2), index
    return None


def is_official_frontend(ref: str) -> bool:
    """``docker/dockerfile:1``, ``:1.N`` or ``:1.N.M``: the stable syntax the engine also has built in."""
    return bool(_OFFICIAL_FRONTEND.match(ref))


def without_syntax(text: str, index: int, ref: str) -> str:
    """The Dockerfile with its ``# syntax=`` line turned into a plain comment (same line count)."""
    lines = text.splitlines(keepends=True)
    ending = "\n" if lines[index].endswith("\n") else ""
    # No '=' in the replacement: it must not read as a directive.
    lines[index] = (f"# buildq: {ref} could not be pulled, the engine's built-in frontend "
                    f"builds this file{ending}")
    return "".join(lines)


def instructions(text: str) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each instruction, continuation lines joined."""
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            # Comment lines are dropped, inside a continued instruction too.
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.strip().partition(" ")
        if word:
            yield word.upper(), rest.strip()
        current = ""
    if current.strip():
        word, _, rest = current.strip().partition(" ")
        yield word.upper(), rest.strip()


def declared_args(text: str) -> set[str]:
    """Names declared with ``ARG``."""
    names: set[str] = set()
    for instruction, rest in instructions(text):
        if instruction == "ARG":
            names.update(word.partition("=")[0] for word in rest.split())
    return names


def secret_mounts(text: str) -> set[str]:
    """Ids of the ``RUN --mount=type=secret`` mounts (an id defaults to the target's file name)."""
    ids: set[str] = set()
    for instruction, rest in instructions(text):
        if instruction != "RUN":
            continue
        for spec in re.findall(r"--mount=(\S+)", rest):
            options = dict(part.partition("=")[::2] for part in spec.strip("'\"").split(","))
            if options.get("type") != "secret":
                continue
            target = options.get("target") or options.get("dst") or options.get("destination")
            ident = options.get("id") or (posixpath.basename(target) if target else "")
            if ident:
                ids.add(ident)
    return ids


def check_secret_use(text: str, names: Iterable[str], dockerfile: str, log: LogFn) -> None:
    """Refuse a secret the Dockerfile only reads as a build arg: with BuildKit it would be empty."""
    declared, mounted = declared_args(text), secret_mounts(text)
    as_args = sorted(n for n in names if n in declared and n not in mounted)
    if as_args:
        name = as_args[0]
        raise SecretUsageError(
            f"{dockerfile} declares ARG {name}, but with BuildKit buildq hands secret "
            f"{name} to RUN steps as a secret mount, never as a build arg, so that ARG "
            "would be empty.",
            f"Read it in the step that needs it: RUN --mount=type=secret,id={name} "
            f"{name}=$(cat /run/secrets/{name}) <command>, and drop ARG {name}.")
    for name in sorted(n for n in names if n in declared):
        log(f"warning: ARG {name} in {dockerfile} stays empty; secret {name} is only "
            f"readable through RUN --mount=type=secret,id={name}")


# --------------------------------------------------------------------------- the context


class _Recorder:
    """Reads a stream and keeps a copy of every byte read, for the CLI to get them all."""

    def __init__(self, stream: BinaryIO, copy: IO[bytes]) -> None:
        self._stream = stream
        self._copy = copy

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._copy.write(data)
        return data


def peek_dockerfile(stream: BinaryIO, path: str, copy: IO[bytes]) -> str | None:
    """The Dockerfile's text, read from the start of a ``.tar.gz`` context stream.

    Every byte read is written to ``copy``, so the caller sends ``copy`` and then the
    rest of ``stream``: the context is read once. None if it cannot be found.
    """
    wanted = posixpath.normpath(path)
    try:
        with tarfile.open(fileobj=_Recorder(stream, copy), mode="r|gz") as tar:  # type: ignore[call-overload]
            for member in tar:
                if posixpath.normpath(member.name) != wanted:
                    continue
                if not member.isfile() or member.size > MAX_DOCKERFILE:
                    return None
                data = tar.extractfile(member)
                return data.read().decode("utf-8", "replace") if data else None
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        # The CLI gets the same bytes and says what is wrong with them.
        return None
    return None


def _chunks(*streams: IO[bytes]) -> Iterator[bytes]:
    for stream in streams:
        while chunk := stream.read(1 << 16):
            yield chunk


def replace_dockerfile(stream: BinaryIO, path: str, text: str) -> Iterator[bytes]:
    """The ``.tar.gz`` context as a plain tar, with the Dockerfile's content replaced."""
    wanted = posixpath.normpath(path)
    data = text.encode()
    with tarfile.open(fileobj=stream, mode="r|gz") as tar:
        for member in tar:
            if member.isfile() and posixpath.normpath(member.name) == wanted:
                member.size = len(data)
                yield _header(member) + data + _padding(len(data))
                continue
            yield _header(member)
            if member.isfile():
                body = tar.extractfile(member)
                assert body is not None
                while block := body.read(1 << 20):
                    yield block
                yield _padding(member.size)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)


def _header(member: tarfile.TarInfo) -> bytes:
    return member.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _padding(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


# --------------------------------------------------------------------------- DOCKER_CONFIG


def registry_key(host: str) -> str:
    """The ``auths`` key the docker CLI looks a registry up by."""
    if host in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        return "https://index.docker.io/v1/"
    return host


def write_docker_config(directory: Path, source: Path | None,
                        logins: Mapping[str, Mapping[str, str]]) -> None:
    """A ``DOCKER_CONFIG`` directory: the worker's own config with ``logins`` added.

    A login buildq has for a host wins over a credential helper: an empty
    ``credHelpers`` entry sends the CLI to the file's ``auths`` for that host.
    """
    directory.mkdir(mode=0o700)
    config: dict[str, Any] = {}
    if source is not None:
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads((source / "config.json").read_text())
            if isinstance(loaded, dict):
                config = loaded
    auths = dict(config.get("auths") or {})
    helpers = dict(config.get("credHelpers") or {})
    for host, login in logins.items():
        key = registry_key(host)
        token = base64.b64encode(f"{login['username']}:{login['password']}".encode()).decode()
        auths[key] = {"auth": token}
        if config.get("credsStore") or key in helpers:
            helpers[key] = ""
    if auths:
        config["auths"] = auths
    if helpers:
        config["credHelpers"] = helpers
    fd = os.open(directory / "config.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "w") as f:
        json.dump(config, f)
    # The buildx plugin may live in the worker's own config directory.
    if source is not None and (source / "cli-plugins").is_dir():
        (directory / "cli-plugins").symlink_to(source / "cli-plugins")


def write_secrets(directory: Path, secrets: Mapping[str, str]) -> list[str]:
    """One 0600 file per secret; the ``--secret`` arguments that name them (never a value)."""
    directory.mkdir(mode=0o700)
    args = []
    for name, value in sorted(secrets.items()):
        path = directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "w") as f:
            f.write(value)
        args += ["--secret", f"id={name},src={path}"]
    return args


# --------------------------------------------------------------------------- progress


@dataclass
class _Vertex:
    name: str
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    error: str | None = None
    cached: bool = False


class Progress:
    """Reads ``--progress=plain`` lines: logs them, and remembers each step for the error."""

    def __init__(self, log: LogFn) -> None:
        self._log = log
        self.vertices: dict[int, _Vertex] = {}
        #: Lines outside any step: the summary BuildKit prints after a failure.
        self.trailer: list[str] = []

    def feed(self, raw: str) -> None:
        line = _ANSI.sub("", raw).rstrip("\r\n")
        if not line.strip():
            return
        match = _VERTEX.match(line)
        if not match:
            self.trailer.append(line)
            self._log(line)
            return
        number, rest = int(match.group(1)), match.group(2)
        if rest.startswith("sha256:"):
            return  # each step's digest: noise in a log
        vertex = self.vertices.get(number)
        if vertex is None:
            self.vertices[number] = _Vertex(rest)
            self._log(line)
            return
        self._log(line)
        if rest == vertex.name:
            return
        if rest.startswith("ERROR: "):
            vertex.error = rest[len("ERROR: "):]
            if vertex.name.startswith(_CACHE_IMPORT):
                ref = vertex.name[len(_CACHE_IMPORT):]
                self._log(f"warning: the layer cache of {ref} could not be imported "
                          f"({_clip(vertex.error, 200)}); building without it")
        elif rest == "CACHED":
            vertex.cached = True
        else:
            output = _OUTPUT.match(rest)
            if output:
                vertex.tail.append(output.group(1))

    def cached_steps(self) -> list[str]:
        return [v.name for v in self.vertices.values() if v.cached and _STEP.match(v.name)]

    def failed(self) -> _Vertex | None:
        """The vertex that failed the build (cache imports only warn)."""
        failed = [v for v in self.vertices.values()
                  if v.error is not None and not v.name.startswith(_CACHE_IMPORT)]
        steps = [v for v in failed if _STEP.match(v.name)]
        return (steps or failed)[0] if failed else None

    def final_message(self) -> str:
        """BuildKit's closing error line, without its layers of prefixes."""
        text = ""
        for line in self.trailer:
            if line.startswith("ERROR: "):
                text = line[len("ERROR: "):]
        if not text:
            lines = [line for line in self.trailer
                     if line.strip() != "------" and not line.startswith(" > ")]
            text = lines[-1] if lines else ""
        return clean_message(text)


def clean_message(text: str) -> str:
    text = text.strip()
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if text.startswith(prefix):
                text = text[len(prefix):]
                changed = True
    return text.rstrip(".")


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _shown_ref(ref: str) -> str:
    # BuildKit names Docker Hub images in full; the Dockerfile had the short name.
    ref = ref.removeprefix("docker.io/")
    return ref.removeprefix("library/")


# --------------------------------------------------------------------------- the build


class FrontendUnavailableError(BuildError):
    """A Dockerfile frontend image could not be pulled or started."""

    def __init__(self, ref: str, reason: str, named_by: str) -> None:
        super().__init__(
            f"the Dockerfile frontend {ref} named by {named_by} cannot be used on this build "
            f"host: {reason}.",
            _frontend_hint(ref) + (" Or remove the '# syntax=' line to build with the "
                                   "engine's built-in Dockerfile frontend."
                                   if "# syntax=" in named_by else ""))
        self.ref = ref


def _frontend_hint(ref: str) -> str:
    return (f"Let the build host's Docker Engine pull {ref} (network access to its registry or "
            "a registry mirror, and a network its containers can use), or load it there "
            "(docker pull where there is network, docker save, then docker load on the build "
            "host).")


@dataclass(frozen=True)
class Frontend:
    """The Dockerfile frontend one attempt at a build asks the engine for."""

    #: The frontend image; None for the engine's built-in Dockerfile frontend.
    ref: str | None
    #: Where the image was named: the '# syntax=' line, or the setting.
    named_by: str = ""
    #: Named by the setting: handed to the engine as ``BUILDKIT_SYNTAX``, which BuildKit's
    #: Dockerfile frontend (the built-in one of Engine 20.10 too) runs in its stead, even
    #: over the file's own '# syntax=' line.
    as_build_arg: bool = False

    @property
    def shown(self) -> str:
        """What the build log and the record call it."""
        return self.ref or BUILT_IN


#: Frontend images that could not be pulled, and until when they are not tried again.
_unpullable: dict[str, float] = {}


def _newer_flag_hint(frontend: Frontend) -> str:
    """What to do about an instruction flag the frontend that parsed the file does not know."""
    if frontend.ref is None:
        return _NEWER_FRONTEND_HINT
    return (f"The flag is newer than the Dockerfile frontend {frontend.ref} (named by "
            f"{frontend.named_by}): name a newer frontend image there, or drop the flag.")


def _may_pull(frontend: Frontend) -> bool:
    return frontend.ref is None or _unpullable.get(frontend.ref, 0.0) <= time.monotonic()


def _described(frontend: Frontend) -> str:
    if frontend.ref is None:
        return "the engine's built-in Dockerfile frontend"
    return f"{frontend.ref} ({frontend.named_by})"


@dataclass
class BuildKitDriver:
    """Runs one build at a time through a BuildKit-capable docker CLI."""

    cli: Cli
    #: Environment variables that point the CLI at the builder's engine (DOCKER_HOST, TLS).
    engine_env: Mapping[str, str] = field(default_factory=dict)
    #: The worker's own docker config directory (logins, credential helpers, plugins).
    docker_config: Path | None = None
    #: Registry host → where it is really reached (Settings.registry_endpoints).
    endpoints: Mapping[str, str] = field(default_factory=dict)
    #: The Dockerfile frontend image for a Dockerfile without a '# syntax=' line, and for
    #: an official one that cannot be pulled (Settings.dockerfile_frontend); None: the
    #: engine's built-in frontend.
    frontend_image: str | None = None

    def build(self, request: BuildRequest, log: LogFn) -> tuple[str, str]:
        """Build ``request.image``: its image id, and which frontend built it (an image
        reference, or ``built-in``)."""
        deadline = time.monotonic() + request.timeout
        network = self._network(request)
        log(f"buildq: building {request.image} with BuildKit ({self.cli.describe()})")
        with tempfile.TemporaryDirectory(prefix="buildq-build-") as scratch:
            root = Path(scratch)
            write_docker_config(root / "config", self.docker_config, self._logins(request))
            secret_args = write_secrets(root / "secrets", request.secrets)

            def run(chunks: Iterator[bytes], frontend: Frontend) -> str:
                return self._run(request, root, network, secret_args, log, deadline, chunks,
                                 frontend)

            with request.open_context() as context, \
                    tempfile.SpooledTemporaryFile(SPOOL_MEMORY, dir=scratch) as spool:
                text = request.dockerfile_text
                if text is None:
                    text = peek_dockerfile(context, request.dockerfile, spool)
                    spool.seek(0)
                if text is not None and request.secrets:
                    check_secret_use(text, request.secrets, request.dockerfile, log)
                syntax = syntax_directive(text) if text is not None else None
                candidates = self._frontends(request, syntax)
                first = candidates[0]
                if len(candidates) == 1:
                    return run(_chunks(spool, context), first), first.shown
                # A frontend that just failed to come is not waited for on every build.
                if _may_pull(first):
                    try:
                        return run(_chunks(spool, context), first), first.shown
                    except FrontendUnavailableError as exc:
                        _unpullable[exc.ref] = time.monotonic() + FRONTEND_RETRY_SECONDS
            tried = [first]
            for frontend in candidates[1:]:
                log(f"warning: the frontend image {tried[-1].ref} cannot be pulled; building "
                    f"with {_described(frontend)} instead")
                if frontend.ref is None:
                    return self._with_built_in_frontend(request, text, syntax, tried, run), \
                        BUILT_IN
                if _may_pull(frontend):
                    try:
                        with request.open_context() as context:
                            return run(_chunks(context), frontend), frontend.shown
                    except FrontendUnavailableError as exc:
                        _unpullable[exc.ref] = time.monotonic() + FRONTEND_RETRY_SECONDS
                tried.append(frontend)
            raise AssertionError("the built-in frontend is always the last candidate")

    def _frontends(self, request: BuildRequest,
                   syntax: tuple[str, int] | None) -> list[Frontend]:
        """The frontends to try, in order; each after the one before could not be pulled."""
        line = f"the '# syntax=' line of {request.dockerfile}"
        if syntax is not None and not is_official_frontend(syntax[0]):
            # Another frontend is never replaced: what it parses may be no Dockerfile syntax.
            return [Frontend(syntax[0], line)]
        found = [Frontend(syntax[0], line)] if syntax is not None else []
        if self.frontend_image:
            found.append(Frontend(self.frontend_image, FRONTEND_SETTING, as_build_arg=True))
        return [*found, Frontend(None)]

    def _with_built_in_frontend(self, request: BuildRequest, text: str | None,
                                syntax: tuple[str, int] | None, tried: Sequence[Frontend],
                                run: Callable[[Iterator[bytes], Frontend], str]) -> str:
        """Build with the engine's own frontend (a '# syntax=' line made a comment)."""
        with request.open_context() as context:
            if syntax is not None:
                assert text is not None
                ref, index = syntax
                chunks = replace_dockerfile(context, request.dockerfile,
                                            without_syntax(text, index, ref))
            else:
                chunks = _chunks(context)
            try:
                return run(chunks, Frontend(None))
            except BuildError as exc:
                # A flag the built-in frontend lacks is what the named frontend was for.
                hint = _frontend_hint(str(tried[-1].ref)) \
                    if "unknown flag" in exc.message.lower() else exc.hint
                because = " and ".join(f"{f.ref} of {f.named_by}" for f in tried)
                raise BuildError(
                    f"{exc.message.rstrip('.')} (built with the engine's built-in Dockerfile "
                    f"frontend, because {because} could not be pulled).", hint) from None

    def _logins(self, request: BuildRequest) -> dict[str, Mapping[str, str]]:
        logins = dict(request.registry_logins)
        for host, login in request.registry_logins.items():
            if host in self.endpoints:
                # The engine reaches a mapped registry at its endpoint, and asks for that.
                logins[self.endpoints[host].split("/")[0]] = login
        return logins

    def _network(self, request: BuildRequest) -> str | None:
        if not request.network_mode:
            return None
        network = NETWORKS.get(request.network_mode)
        if network is None:
            raise BuildError(
                f"BuildKit builds run on the default, none or host network, not "
                f"{request.network_mode!r} (BUILDQ_NETWORK_MODE).",
                "Set BUILDQ_NETWORK_MODE to none, host or default on the docker-pool workers.")
        return network

    def _argv(self, request: BuildRequest, root: Path, network: str | None,
              secret_args: Sequence[str], frontend: Frontend) -> list[str]:
        argv = [*self.cli.command, "--progress=plain", "--file", request.dockerfile,
                "--tag", request.image, "--iidfile", str(root / "image-id")]
        if network:
            argv += ["--network", network]
        if frontend.as_build_arg and frontend.ref:
            argv += ["--build-arg", f"BUILDKIT_SYNTAX={self._reachable(frontend.ref)}"]
        for key, value in request.build_args.items():
            argv += ["--build-arg", f"{key}={value}"]
        for key, value in request.labels.items():
            argv += ["--label", f"{key}={value}"]
        if request.target:
            argv += ["--target", request.target]
        if request.platform:
            argv += ["--platform", request.platform]
        if request.no_cache:
            argv += ["--no-cache"]
        for ref in () if request.no_cache else request.cache_from:
            argv += ["--cache-from", self._reachable(ref)]
        # The inline cache rides in the pushed image's config, for other hosts' --cache-from.
        argv += ["--cache-to", "type=inline"] if self.cli.buildx else \
            ["--build-arg", "BUILDKIT_INLINE_CACHE=1"]
        return [*argv, *secret_args, "-"]

    def _reachable(self, ref: str) -> str:
        host, slash, rest = ref.partition("/")
        endpoint = self.endpoints.get(host)
        return f"{endpoint}/{rest}" if endpoint and slash else ref

    def _env(self, root: Path) -> dict[str, str]:
        # The CLI needs none of buildq's settings, and some of those are secrets.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("BUILDQ_", "DOCKER_", "BUILDX_", "BUILDKIT_"))}
        env.update(self.engine_env)
        env["DOCKER_CONFIG"] = str(root / "config")
        if not self.cli.buildx:
            env["DOCKER_BUILDKIT"] = "1"
        return env

    def _run(self, request: BuildRequest, root: Path, network: str | None,
             secret_args: Sequence[str], log: LogFn, deadline: float,
             chunks: Iterator[bytes], frontend: Frontend) -> str:
        iidfile = root / "image-id"
        with contextlib.suppress(FileNotFoundError):
            iidfile.unlink()
        if frontend.as_build_arg:
            log(f"buildq: Dockerfile frontend {frontend.ref} ({frontend.named_by})")
        progress = Progress(log)
        argv = self._argv(request, root, network, secret_args, frontend)
        reaper = shutil.which("setpriv")
        if reaper:
            # A worker killed mid-build takes the CLI with it, and the engine then cancels
            # the build (a buildx plugin process would outlive the CLI, though).
            argv = [reaper, "--pdeathsig", "KILL", "--", *argv]
        try:
            proc = subprocess.Popen(
                argv, env=self._env(root),
                cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            raise BuildError(f"the docker CLI {self.cli.path} cannot be started: "
                             f"{exc.strerror or exc}.",
                             "Check the docker CLI on the build host.") from None
        feeder = _Feeder(proc, chunks)
        timer = threading.Timer(max(deadline - time.monotonic(), 0.0), feeder.expire)
        timer.daemon = True
        timer.start()
        ended = threading.Event()
        if request.cancel is not None:
            threading.Thread(target=feeder.stop_on, args=(request.cancel, ended), daemon=True,
                             name="buildq-build-cancel").start()
        try:
            feeder.start()
            assert proc.stdout is not None
            for raw in proc.stdout:
                progress.feed(raw.decode("utf-8", "replace"))
            code = proc.wait()
        finally:
            ended.set()
            timer.cancel()
            if proc.poll() is None:
                feeder.kill()
                proc.wait()
            feeder.join(5.0)
        if feeder.cancelled:
            raise BuildCancelledError(f"the build of {request.image} was stopped: its request "
                                      "was cancelled.")
        if feeder.expired:
            raise BuildError(
                f"the build of {request.image} exceeded its time limit of "
                f"{request.timeout:g} s and was cancelled.",
                f"Raise the limit with the environment variable {TIMEOUT_SETTING} (seconds) on "
                "the workers, or make the build faster.")
        if isinstance(feeder.error, BuildqError):
            # The store failed mid-stream: the CLI only saw a truncated context.
            raise feeder.error
        if code != 0:
            raise self._failure(progress, request, frontend)
        try:
            image_id = iidfile.read_text().strip()
        except OSError:
            image_id = ""
        if not image_id:
            raise BuildError(f"the build of {request.image} ended without producing an image.",
                             "The connection to the Docker Engine may have dropped; retry the "
                             "build.")
        return image_id

    def _failure(self, progress: Progress, request: BuildRequest,
                 frontend: Frontend) -> BuildqError:
        final = progress.final_message()
        lower = " ".join(progress.trailer).lower()
        if any(words in lower for words in _ENGINE_GONE):
            return EngineUnavailableError(
                f"the Docker Engine stopped answering the docker CLI: {_clip(final, 200)}.",
                "Check that dockerd is running on the build host; buildq retries.")
        vertex = progress.failed()
        if frontend.ref is not None:
            ref, named_by = frontend.ref, frontend.named_by
            if vertex is not None and vertex.name.startswith(_RESOLVE_FRONTEND):
                return FrontendUnavailableError(ref, f"it cannot be pulled ({vertex.error})",
                                                named_by)
            if vertex is None and "frontend gateway.v0" in final and \
                    any(words in final.lower() for words in _NOT_STARTED):
                return FrontendUnavailableError(ref, f"it cannot be started ({final})",
                                                named_by)
        if vertex is None:
            return self._refused(final, request, frontend)
        error = clean_message(vertex.error or final)
        if vertex.name.startswith(_LOAD_METADATA):
            return _base_error(_shown_ref(vertex.name[len(_LOAD_METADATA):]), "a FROM line",
                               error, request)
        step = _STEP.match(vertex.name)
        if step is None:
            return BuildError(
                f"building {request.image} failed at '{_clip(vertex.name)}': {error}.",
                "Check the Dockerfile and the build options; the build log has the details.")
        instruction, argument = step.group("instr").upper(), step.group("arg")
        where = f"step {step.group('step')} of {request.dockerfile}"
        if step.group("stage") and len(progress_stages(progress)) > 1:
            where = f"step {step.group('step')} of stage {step.group('stage')} in {request.dockerfile}"
        if instruction == "FROM":
            return _base_error(_shown_ref(argument.split("@")[0]), where, error, request)
        code = _EXIT_CODE.search(error)
        if code and instruction == "RUN":
            quoted = list(vertex.tail)[-QUOTED_LINES:]
            output = (" Last output: " + " | ".join(quoted) + ".") if quoted else \
                " It printed nothing."
            return BuildError(
                f"{where} (RUN {_clip(argument)}) failed with exit code {code.group(1)} while "
                f"building {request.image}.{output}",
                "Fix the command, or reproduce it with the same base image to see why it fails.")
        hint = "Fix that step of the Dockerfile or the build context it reads."
        if "unknown flag" in error.lower():
            hint = _newer_flag_hint(frontend)
        elif re.search(r"network \S+ not found", error):
            hint = ("RUN steps use the engine's default network, which this engine does not "
                    "have: set BUILDQ_NETWORK_MODE to none (or host) on the docker-pool "
                    "workers, or give the engine that network.")
        if instruction in ("COPY", "ADD") and "not found" in error:
            hint = ("Add the file to the source, or check the path: buildq's context leaves out "
                    "what .dockerignore excludes, and paths are relative to the context root.")
        return BuildError(
            f"{where} ({instruction} {_clip(argument)}) failed while building {request.image}: "
            f"{error}.", hint)

    def _refused(self, final: str, request: BuildRequest, frontend: Frontend) -> BuildError:
        if final == "file with no instructions":
            final = "failed to parse Dockerfile: file with no instructions"
        if "parse error" in final.lower():
            hint = ("Fix the Dockerfile at the line named; see the Dockerfile reference for the "
                    "instruction's syntax.")
            if "unknown flag" in final.lower():
                hint = _newer_flag_hint(frontend)
            return BuildError(
                f"{request.dockerfile} (the Dockerfile of {request.image}) is invalid: {final}.",
                hint)
        return BuildError(
            f"the Docker Engine refused to build {request.image}: {final or 'no reason given'}.",
            "Check the Dockerfile path, the target stage and the build options.")


def progress_stages(progress: Progress) -> set[str]:
    """The stage names seen in step headers (a single unnamed stage shows none)."""
    stages = set()
    for vertex in progress.vertices.values():
        step = _STEP.match(vertex.name)
        if step:
            stages.add(step.group("stage") or "")
    return stages


def _base_error(base: str, where: str, error: str, request: BuildRequest) -> BuildError:
    return BuildError(
        f"the base image {base} ({where} of {request.dockerfile}) cannot be pulled: it is "
        f"not on this build host and its registry does not have it or cannot be reached "
        f"({error}).",
        "Check the name and tag in the FROM line, push the base image to a registry this "
        "host can reach (with credentials if it is private), or load it onto the build host.")


class _Feeder(threading.Thread):
    """Writes the context into the CLI's stdin; stops the CLI at the deadline."""

    def __init__(self, proc: subprocess.Popen[bytes], chunks: Iterator[bytes]) -> None:
        super().__init__(daemon=True, name="buildq-context-feeder")
        self._proc = proc
        self._chunks = chunks
        self.error: BaseException | None = None
        self.expired = False
        self.cancelled = False

    def run(self) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            for chunk in self._chunks:
                stdin.write(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the CLI stopped reading: its own output says why
        except BaseException as exc:
            self.error = exc
            self.kill()
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    def expire(self) -> None:
        self.expired = True
        self.kill()

    def stop_on(self, cancel: threading.Event, ended: threading.Event) -> None:
        """Kill the build once ``cancel`` is set, unless it ``ended`` first."""
        while not ended.is_set():
            if cancel.wait(0.2):
                if not ended.is_set():
                    self.cancelled = True
                    self.kill()
                return

    def kill(self) -> None:
        # The whole group: buildx runs as a plugin process under the CLI. The engine cancels
        # the build (and its RUN step's processes) when the CLI's session goes away.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)


__all__ = ["BuildKitDriver", "Cli", "FrontendUnavailableError", "Progress", "find_cli"]
