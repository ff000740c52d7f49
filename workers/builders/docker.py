"""Builds with a local Docker Engine: BuildKit where the host has it, else the legacy builder.

BuildKit builds run through a docker CLI that has it (:mod:`workers.builders.buildkit`);
the docker SDK, which speaks only to the legacy builder, does everything else: ping,
inspect, push, and legacy builds where no CLI with BuildKit is installed, the engine
predates BuildKit, or its daemon configuration turns BuildKit off.

On the legacy path the context is streamed from the store to the engine as it is read.
A wall-clock deadline covers the upload and the build; when it passes, the connection to
the engine is shut, which makes the engine cancel the build and remove its intermediate
container.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tarfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import docker
import requests
import urllib3
from docker.errors import APIError, DockerException, NotFound

from config.errors import (
    BuildCancelledError,
    BuildError,
    BuildqError,
    RegistryError,
    ServiceError,
    TransientRegistryError,
)
from workers.builders.base import Builder, BuildRequest, EngineUnavailableError, LogFn
from workers.builders.buildkit import BuildKitDriver, find_cli
from workers.secrets import Masker, ScrubReport, scrub_saved_image

#: Output lines kept to quote in the error when a step fails.
TAIL_LINES = 8

#: Lines of that tail quoted in a failing RUN step's error.
QUOTED_LINES = 5

#: Extra seconds of HTTP read timeout past the build deadline: silence within a build is
#: normal (a long RUN with no output), and the deadline watchdog is what ends it.
READ_SLACK = 60.0

#: Where the limit a user hits on timeouts comes from.
TIMEOUT_SETTING = "BUILDQ_BUILD_TIMEOUT"

#: The first Engine API version with BuildKit (Docker 18.09).
BUILDKIT_API = (1, 39)

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_STEP = re.compile(r"^Step (\d+/\d+) : (\S+)\s*(.*)$")
_EXIT_CODE = re.compile(r"returned a non-zero code: (\d+)")

_AUTH_WORDS = ("denied", "unauthorized", "authentication required", "forbidden",
               "no basic auth credentials", "insufficient_scope")
_TRANSIENT_WORDS = ("connection refused", "connection reset", "no such host", "i/o timeout",
                    "timeout", "timed out", "eof", "toomanyrequests", "too many requests",
                    "500 internal", "502 bad", "503 service", "504 gateway",
                    "unexpected http status: 5", "server misbehaving", "broken pipe",
                    "use of closed network connection")

_PUSH_HINT = ("Set BUILDQ_REGISTRY_USERNAME and BUILDQ_REGISTRY_PASSWORD, or put credentials for "
              "{host} in docker's config.json (DOCKER_CONFIG), and check they may push to it.")


class _DeadlineExceeded(Exception):
    """Raised out of the context stream so the upload stops at the deadline."""


class _DeadlineReader:
    """A read-only stream that refuses to go on once the build's deadline has passed.

    It has no ``fileno``/``tell`` on purpose: requests then sends it chunked, reading
    it block by block, instead of measuring (or buffering) the whole context.
    """

    def __init__(self, stream: BinaryIO, deadline: float) -> None:
        self._stream = stream
        self._deadline = deadline

    def read(self, size: int = -1) -> bytes:
        if time.monotonic() > self._deadline:
            raise _DeadlineExceeded
        return self._stream.read(size)

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(1 << 16):
            yield chunk


class _Watchdog:
    """Shuts the engine connection when the deadline passes or the build is cancelled, even
    while a read blocks."""

    def __init__(self, seconds: float, cancel: threading.Event | None = None) -> None:
        self.expired = False
        self.cancelled = False
        self._response: requests.Response | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(seconds, 0.0), self._expire)
        self._timer.daemon = True
        self._cancel = cancel
        self._over = threading.Event()

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        if self._cancel is not None:
            threading.Thread(target=self._watch_cancel, daemon=True,
                             name="buildq-build-cancel").start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        self._over.set()

    @property
    def stopped(self) -> bool:
        return self.expired or self.cancelled

    def hook(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        with self._lock:
            self._response = response
            late = self.stopped
        if late:
            _shut(response)

    def _watch_cancel(self) -> None:
        assert self._cancel is not None
        while not self._over.is_set():
            if self._cancel.wait(0.2):
                with self._lock:
                    if self._over.is_set():
                        return
                    self.cancelled = True
                    response = self._response
                if response is not None:
                    _shut(response)
                return

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            response = self._response
        if response is not None:
            _shut(response)


def _shut(response: requests.Response) -> None:
    # shutdown() rather than close(): it wakes the thread blocked in recv() with EOF
    # without freeing a descriptor that thread still holds.
    sock = getattr(getattr(response.raw, "connection", None), "sock", None)
    if isinstance(sock, socket.socket):
        try:
            sock.shutdown(socket.SHUT_RDWR)
            return
        except OSError:
            pass
    response.close()


def split_image(image: str) -> tuple[str, str]:
    """``host/repo:tag`` → (``host/repo``, ``tag``); a colon before the last slash is a port."""
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, "latest"
    return name, tag


def _registry_host(repository: str) -> str:
    first = repository.split("/", 1)[0]
    if "/" in repository and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


class _BuildLog:
    """Turns the engine's stream items into whole lines, remembering the step and the tail."""

    def __init__(self, log: LogFn) -> None:
        self._log = log
        self._partial = ""
        self.step = ""
        self.instruction = ""
        self.argument = ""
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)

    def feed(self, text: str) -> None:
        self._partial += _ANSI.sub("", text)
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            self._line(line.rstrip("\r"))

    def flush(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = ""

    def _line(self, line: str) -> None:
        if not line.strip():
            return
        self._log(line)
        step = _STEP.match(line)
        if step:
            self.step, self.instruction, self.argument = step.group(1), step.group(2).upper(), \
                step.group(3)
            self.tail.clear()
        elif not (line.startswith(" ---> ") or line.startswith("Removing intermediate")):
            self.tail.append(line)


class DockerBuilder(Builder):
    name = "docker"

    def __init__(self, base_url: str | None = None,
                 endpoints: Mapping[str, str] | None = None, *,
                 cli_path: str | None = None, docker_config: Path | None = None,
                 frontend_image: str | None = None) -> None:
        """``cli_path`` is where to look for a docker CLI (default ``$PATH``);
        ``docker_config`` the worker's docker config directory (default as docker's own);
        ``frontend_image`` the Dockerfile frontend BuildKit builds with
        (``Settings.dockerfile_frontend``; default the engine's built-in one)."""
        #: Registry host → where it is really reached (Settings.registry_endpoints).
        self._endpoints = dict(endpoints or {})
        self._where = base_url or "DOCKER_HOST or the default socket /var/run/docker.sock"
        try:
            if base_url is None:
                self._client = docker.from_env()
                self._client_kwargs: dict[str, Any] = docker.utils.kwargs_from_env()
            else:
                self._client = docker.DockerClient(base_url=base_url)
                self._client_kwargs = {"base_url": base_url}
            ping = self._client.api._get(self._client.api._url("/_ping"))
            ping.raise_for_status()
        except (DockerException, requests.RequestException) as exc:
            raise ServiceError(
                f"no Docker Engine answers at {self._where}: {_short(exc)}.",
                "Start dockerd (or set DOCKER_HOST to a running engine) on this build host, "
                "or set builder.type: kaniko or noop in the launch config.",
            ) from None
        if docker_config is None:
            docker_config = Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker")
        self._buildkit: BuildKitDriver | None = None
        #: Why the legacy builder builds here (empty with BuildKit).
        self.legacy_reason = _engine_without_buildkit(ping.headers)
        if not self.legacy_reason:
            cli, self.legacy_reason = find_cli(cli_path, docker_config)
            if cli is not None:
                # The CLI must reach the engine this builder pings, however it was named.
                engine_env = {"DOCKER_HOST": base_url} if base_url is not None else {
                    k: v for k, v in os.environ.items()
                    if k in ("DOCKER_HOST", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH",
                             "DOCKER_CONTEXT")}
                self._buildkit = BuildKitDriver(cli, engine_env, docker_config, self._endpoints,
                                                frontend_image)
        self.frontend = "buildkit" if self._buildkit is not None else "legacy"

    # -- build ---------------------------------------------------------------------------

    def build(self, request: BuildRequest, log: LogFn) -> str:
        if self._buildkit is not None:
            return self._build_with_buildkit(self._buildkit, request, log)
        log(f"buildq: building {request.image} with the legacy builder ({self.legacy_reason})")
        if not request.secrets:
            return self._build(request, log)
        masker = Masker(request.secrets.values())
        with masker.active():
            try:
                image_id = self._build(request, lambda line: log(masker.mask(line)))
                return self._scrub(request, image_id, masker, log)
            except BuildqError as exc:
                # Error messages quote the engine and the step's output: either may echo a value.
                raise masker.error(exc) from None
            except Exception as exc:
                raise BuildError(
                    f"the build of {request.image} failed unexpectedly: {type(exc).__name__}: "
                    f"{masker.mask(str(exc))}.",
                    "The worker's log has the details; please report it.") from None

    def _build_with_buildkit(self, driver: BuildKitDriver, request: BuildRequest,
                             log: LogFn) -> str:
        # Secrets are mounted, never build args; a RUN step may still print one.
        masker = Masker(request.secrets.values())
        self.dockerfile_frontend = None
        try:
            image_id, self.dockerfile_frontend = driver.build(
                request, (lambda line: log(masker.mask(line))) if masker else log)
        except BuildqError as exc:
            raise masker.error(exc) from None
        return image_id

    def _scrub(self, request: BuildRequest, image_id: str, masker: Masker, log: LogFn) -> str:
        """Re-load the built image with its config cleaned of the secret build-arg values.

        The legacy builder records ``|1 NAME=value`` in every RUN step's history entry and
        container config; ``docker save`` → rewrite → ``docker load`` re-tags ``request.image``
        with a config that has ``***`` instead. Layers stream through, never held in memory.
        """
        api = docker.APIClient(version=self._client.api.api_version,
                               timeout=int(request.timeout + READ_SLACK), **self._client_kwargs)
        loader = docker.APIClient(version=self._client.api.api_version,
                                  timeout=int(request.timeout + READ_SLACK), **self._client_kwargs)
        report = ScrubReport()
        try:
            saved = api.get_image(image_id, chunk_size=1 << 20)
            body = scrub_saved_image(saved, masker, request.image, report)
            for item in loader.load_image(body):
                error = item.get("errorDetail") or ({"message": item["error"]} if "error" in item
                                                    else None)
                if error:
                    raise BuildError(
                        f"the Docker Engine refused the cleaned image of {request.image}: "
                        f"{error.get('message') or item.get('error')}.",
                        "Build again; if it persists, the engine cannot load its own saved images.")
        except (APIError, requests.RequestException, urllib3.exceptions.HTTPError,
                DockerException, OSError, tarfile.TarError) as exc:
            if isinstance(report.error, BuildqError):
                raise report.error from None
            raise BuildError(
                f"cleaning the secret build args out of {request.image} failed: {_short(exc)}.",
                "Check that dockerd is running on the build host; build again.") from None
        finally:
            api.close()
            loader.close()
        if isinstance(report.error, BaseException):
            raise report.error
        try:
            info = self._client.api.inspect_image(request.image)
            history = self._client.api.history(request.image)
        except (APIError, requests.RequestException, DockerException) as exc:
            raise self._engine_lost(exc) from None
        # The loaded image is what gets pushed: refuse to go on if a value is still in it.
        if masker.found_in(json.dumps(info)) or masker.found_in(json.dumps(history)):
            raise BuildError(f"a secret build arg's value is still in the config of "
                             f"{request.image} after cleaning; it will not be pushed.",
                             "Do not copy the secret into ENV, LABEL or other instructions "
                             "that store it in the image config.")
        if report.config_changed:
            log(f"secret build args masked in the image config of {request.image}")
        return str(info["Id"])

    def _build(self, request: BuildRequest, log: LogFn) -> str:
        deadline = time.monotonic() + request.timeout
        # A client of its own per build: the watchdog's response hook must see only this
        # build's connection, and a concurrent build on the shared client must not be shut.
        api = docker.APIClient(version=self._client.api.api_version, **self._client_kwargs)
        watchdog = _Watchdog(request.timeout, request.cancel)
        api.hooks["response"].append(watchdog.hook)
        lines = _BuildLog(log)
        try:
            with watchdog, request.open_context() as context:
                stream = api.build(
                    fileobj=_DeadlineReader(context, deadline),
                    custom_context=True,
                    encoding="gzip",
                    decode=True,
                    rm=True,
                    forcerm=True,
                    tag=request.image,
                    dockerfile=request.dockerfile,
                    # Secret values can only reach the legacy builder as build args; _scrub
                    # takes them back out of the image config.
                    buildargs={**request.build_args, **request.secrets},
                    target=request.target,
                    platform=request.platform,
                    labels=dict(request.labels) or None,
                    network_mode=request.network_mode,
                    nocache=request.no_cache,
                    timeout=request.timeout + READ_SLACK,
                )
                image_id = self._follow_build(stream, lines, request)
        except _DeadlineExceeded:
            raise self._timeout_error(request) from None
        except BuildError:
            # A stream cut by the watchdog can end like a build that produced nothing.
            if watchdog.stopped:
                raise self._stopped_error(watchdog, request) from None
            raise
        except APIError as exc:
            if watchdog.stopped:
                raise self._stopped_error(watchdog, request) from None
            raise self._refused_error(exc, request) from None
        except (requests.RequestException, urllib3.exceptions.HTTPError, DockerException,
                OSError) as exc:
            if watchdog.stopped:
                raise self._stopped_error(watchdog, request) from None
            raise self._engine_lost(exc) from None
        finally:
            api.close()
        if watchdog.stopped:
            raise self._stopped_error(watchdog, request)
        return image_id

    def _stopped_error(self, watchdog: _Watchdog, request: BuildRequest) -> BuildqError:
        if watchdog.cancelled:
            return BuildCancelledError(f"the build of {request.image} was stopped: its request "
                                       "was cancelled.")
        return self._timeout_error(request)

    def _follow_build(
        self, stream: Iterable[dict[str, Any]], lines: _BuildLog, request: BuildRequest
    ) -> str:
        image_id = ""
        for item in stream:
            if "stream" in item:
                lines.feed(str(item["stream"]))
            elif item.get("status") and not item.get("progressDetail"):
                # Base-image pulls report per-layer progress; only the plain statuses read well.
                lines.feed(f"{item.get('id', '')} {item['status']}".strip() + "\n")
            aux = item.get("aux")
            if isinstance(aux, dict) and aux.get("ID"):
                image_id = str(aux["ID"])
            error = item.get("errorDetail") or ({"message": item["error"]} if "error" in item
                                                else None)
            if error:
                lines.flush()
                raise self._step_error(str(error.get("message") or item.get("error")), lines,
                                       request)
        lines.flush()
        if not image_id:
            # Older engines print only "Successfully built"; the tag is authoritative.
            try:
                image_id = str(self._client.api.inspect_image(request.image)["Id"])
            except NotFound:
                raise BuildError(
                    f"the build of {request.image} ended without producing an image.",
                    "The connection to the Docker Engine may have dropped; retry the build.",
                ) from None
        return image_id

    def _step_error(self, message: str, lines: _BuildLog, request: BuildRequest) -> BuildError:
        message = message.strip().rstrip(".")
        step = f"step {lines.step}" if lines.step else "a step"
        if lines.instruction == "FROM":
            base = _from_image(lines.argument)
            return BuildError(
                f"the base image {base} ({step} of {request.dockerfile}) cannot be pulled: it "
                f"is not on this build host and its registry does not have it or cannot be "
                f"reached ({message}).",
                "Check the name and tag in the FROM line, push the base image to a registry "
                "this host can reach (with credentials if it is private), or load it onto the "
                "build host.",
            )
        code = _EXIT_CODE.search(message)
        if code and lines.instruction == "RUN":
            quoted = list(lines.tail)[-QUOTED_LINES:]
            output = (" Last output: " + " | ".join(quoted) + ".") if quoted else \
                " It printed nothing."
            return BuildError(
                f"{step} of {request.dockerfile} (RUN {_clip(lines.argument)}) failed with exit "
                f"code {code.group(1)} while building {request.image}.{output}",
                "Fix the command, or reproduce it with the same base image to see why it fails.",
            )
        what = f"{lines.instruction} {_clip(lines.argument)}".strip()
        if "requires buildkit" in message.lower():
            return self._needs_buildkit(message, f"{step} of {request.dockerfile} ({what})",
                                        request)
        return BuildError(
            f"{step} of {request.dockerfile} ({what}) failed while building {request.image}: "
            f"{message}.",
            "Fix that step of the Dockerfile or the build context it reads.",
        )

    def _needs_buildkit(self, text: str, where: str, request: BuildRequest) -> BuildError:
        return BuildError(
            f"{where} needs BuildKit, but this build host builds with the legacy builder "
            f"({self.legacy_reason}): {text}.",
            "Install a docker CLI with BuildKit on the docker-pool hosts (the buildx plugin, "
            "or a docker CLI 18.09 to 22.x, e.g. Debian's docker.io) and let the engine use "
            "it (no \"features\": {\"buildkit\": false} in daemon.json), or build with "
            "builder.type: kaniko.",
        )

    def _refused_error(self, exc: APIError, request: BuildRequest) -> BuildError:
        text = _explain(exc)
        if "requires buildkit" in text.lower():
            return self._needs_buildkit(
                text, f"{request.dockerfile} (the Dockerfile of {request.image})", request)
        if "parse error" in text.lower():
            return BuildError(
                f"{request.dockerfile} (the Dockerfile of {request.image}) is invalid: {text}.",
                "Fix the Dockerfile at the line named; see the Dockerfile reference for the "
                "instruction's syntax.",
            )
        return BuildError(
            f"the Docker Engine refused to build {request.image}: {text}.",
            "Check the Dockerfile path, the target stage and the build options.",
        )

    def _timeout_error(self, request: BuildRequest) -> BuildError:
        return BuildError(
            f"the build of {request.image} exceeded its time limit of {request.timeout:g} s and "
            "was cancelled.",
            f"Raise the limit with the environment variable {TIMEOUT_SETTING} (seconds) on the "
            "workers, or make the build faster.",
        )

    def _engine_lost(self, exc: BaseException) -> EngineUnavailableError:
        return EngineUnavailableError(
            f"the Docker Engine at {self._where} stopped answering: {_short(exc)}.",
            "Check that dockerd is running on the build host; buildq retries.",
        )

    # -- push ----------------------------------------------------------------------------

    def push(self, image: str, auth: Mapping[str, str] | None, log: LogFn) -> str:
        repository, tag = split_image(image)
        host = _registry_host(repository)
        endpoint = self._endpoints.get(host)
        if endpoint:
            # The engine pushes to the host an image is named after, so a mapped registry
            # gets a temporary alias named after its endpoint; the image keeps its name.
            alias = endpoint + repository[len(host):]
            try:
                self._client.api.tag(image, alias, tag)
                return self._push(image, alias, tag, host, auth, log)
            except NotFound:
                raise BuildError(f"cannot push {image}: no such image on the build host.",
                                 "Build it first; it may have been removed meanwhile.") from None
            finally:
                self.remove_image(f"{alias}:{tag}")
        return self._push(image, repository, tag, host, auth, log)

    def _push(self, image: str, repository: str, tag: str, host: str,
              auth: Mapping[str, str] | None, log: LogFn) -> str:
        digest = ""
        try:
            stream = self._client.api.push(
                repository, tag=tag, auth_config=dict(auth) if auth else None,
                stream=True, decode=True,
            )
            for item in stream:
                error = item.get("errorDetail") or ({"message": item["error"]} if "error" in item
                                                    else None)
                if error:
                    raise _push_error(str(error.get("message") or item.get("error")), image, host)
                aux = item.get("aux")
                if isinstance(aux, dict) and aux.get("Digest"):
                    digest = str(aux["Digest"])
                status = item.get("status")
                if status and not item.get("progressDetail"):
                    log(f"{item.get('id', '')} {status}".strip())
        except APIError as exc:
            if isinstance(exc, NotFound):
                raise BuildError(f"cannot push {image}: no such image on the build host.",
                                 "Build it first; it may have been removed meanwhile.") from None
            raise _push_error(_explain(exc), image, host) from None
        except (requests.RequestException, urllib3.exceptions.HTTPError, DockerException,
                OSError) as exc:
            raise self._engine_lost(exc) from None
        if not digest:
            raise TransientRegistryError(
                f"the push of {image} to {host} ended without a digest.",
                "The push may have been interrupted; buildq retries.",
            )
        return digest

    # -- local images --------------------------------------------------------------------

    def has_image(self, image: str) -> bool:
        try:
            self._client.api.inspect_image(image)
            return True
        except NotFound:
            return False
        except (requests.RequestException, DockerException) as exc:
            raise self._engine_lost(exc) from None

    def remove_image(self, image: str) -> None:
        with contextlib.suppress(requests.RequestException, DockerException):
            self._client.api.remove_image(image)


def _engine_without_buildkit(headers: Mapping[str, str]) -> str:
    """Why this engine, by its ``/_ping`` answer, cannot or will not build with BuildKit ("" if it can)."""
    version = headers.get("Api-Version", "")
    try:
        api = tuple(int(part) for part in version.split("."))
    except ValueError:
        api = ()
    if api and api < BUILDKIT_API:
        return f"the Docker Engine's API {version} predates BuildKit"
    if (headers.get("Ostype") or "linux").lower() != "linux":
        return f"the Docker Engine runs {headers.get('Ostype')} containers, which BuildKit does not build"
    # Builder-Version 1 is the daemon's "features": {"buildkit": false}: the docker CLI honours it.
    if headers.get("Builder-Version") == "1":
        return "the Docker Engine's configuration turns BuildKit off (features.buildkit: false)"
    return ""


def _push_error(message: str, image: str, host: str) -> BuildqError:
    message = message.strip().rstrip(".")
    lower = message.lower()
    if "does not exist locally" in lower or "no such image" in lower:
        return BuildError(f"cannot push {image}: {message}.",
                          "Build it first; it may have been removed meanwhile.")
    if any(word in lower for word in _AUTH_WORDS):
        return RegistryError(f"registry {host} refused the push of {image}: {message}.",
                             _PUSH_HINT.format(host=host))
    if "server gave http response to https client" in lower:
        return RegistryError(
            f"registry {host} speaks plain HTTP but the Docker Engine used HTTPS: {message}.",
            f"Add {host} to insecure-registries in the engine's daemon.json, or serve it over "
            "TLS.",
        )
    if any(word in lower for word in _TRANSIENT_WORDS):
        return TransientRegistryError(f"the push of {image} to {host} failed: {message}.",
                                      "buildq retries with backoff.")
    return RegistryError(f"the push of {image} to {host} failed: {message}.",
                         "Check the destination repository and the registry's logs.")


def _from_image(argument: str) -> str:
    # "FROM [--platform=...] image [AS name]"
    words = [w for w in argument.split() if not w.startswith("--")]
    return words[0] if words else "(unnamed)"


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _explain(exc: APIError) -> str:
    text = exc.explanation if isinstance(exc.explanation, str) and exc.explanation else str(exc)
    return text.strip().rstrip(".")


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    match = re.search(r"\[Errno -?\d+\] ([^')\]]+)", text)
    return match.group(1).strip() if match else _clip(text, 200)
