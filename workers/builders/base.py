"""The builder interface: turn a packed build context into a pushed image."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import BinaryIO

from config.errors import ServiceError, TransientError

#: Seconds a liveness ping of the engine may take before it counts as absent.
PING_TIMEOUT = 3.0

#: Called with each line of build or push output, as it arrives.
LogFn = Callable[[str], None]


class EngineUnavailableError(TransientError, ServiceError):
    """The container engine stopped answering in the middle of work; worth a retry."""


@dataclass
class BuildRequest:
    """Everything one build needs; the context arrives as a ``.tar.gz`` stream."""

    #: Full reference with tag, e.g. ``127.0.0.1:5000/team/app:<source-hash>``.
    image: str
    #: Opens the gzipped tar build context; called once per attempt, read as a stream.
    open_context: Callable[[], AbstractContextManager[BinaryIO]]
    dockerfile: str = "Dockerfile"
    build_args: Mapping[str, str] = field(default_factory=dict)
    target: str | None = None
    platform: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    network_mode: str | None = None
    #: Wall-clock seconds, upload of the context included, before the build is cancelled.
    timeout: float = 3600.0
    #: Secret build args, name → value, looked up on this worker; never logged or shown.
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    #: Images whose layer cache the build may reuse (BuildKit's inline cache); a missing one
    #: is a warning in the log, never a failure.
    cache_from: Sequence[str] = ()
    #: Registry host → ``{"username", "password"}`` the build may pull with (base images,
    #: cache images); handed to the builder in a private config file, never an argument.
    registry_logins: Mapping[str, Mapping[str, str]] = field(default_factory=dict, repr=False)
    #: The Dockerfile's text when the caller has it (a generated one); else read from the context.
    dockerfile_text: str | None = None
    #: Build every step afresh (a forced rebuild): no layer from the engine's cache or an
    #: imported one may stand in for a step.
    no_cache: bool = False
    #: Set when the build's request is cancelled: the builder stops the build on the engine
    #: and raises :class:`~config.errors.BuildCancelledError`.
    cancel: threading.Event | None = field(default=None, repr=False, compare=False)


class Builder(ABC):
    """Builds and pushes images; one per worker process."""

    #: The ``builder.type`` this backend answers to.
    name: str
    #: Which Dockerfile frontend builds (``buildkit`` or ``legacy``), where the backend has a choice.
    frontend: str | None = None
    #: The Dockerfile frontend that parsed the last build's Dockerfile with BuildKit: the
    #: frontend image's reference, or ``built-in`` for the engine's own; None elsewhere.
    dockerfile_frontend: str | None = None

    @abstractmethod
    def build(self, request: BuildRequest, log: LogFn) -> str:
        """Build ``request.image``; return the local image id."""

    @abstractmethod
    def push(self, image: str, auth: Mapping[str, str] | None, log: LogFn) -> str:
        """Push ``image``; return the registry's manifest digest (``sha256:...``)."""

    @abstractmethod
    def has_image(self, image: str) -> bool:
        """Whether ``image`` exists locally (not in the registry)."""

    @abstractmethod
    def remove_image(self, image: str) -> None:
        """Drop the local tag; failures are ignored (it is only disk space)."""


def engine_available(base_url: str | None = None) -> bool:
    """Whether a Docker Engine answers a ping at ``base_url`` (None: DOCKER_HOST or the socket)."""
    import docker

    try:
        client = (docker.from_env(timeout=int(PING_TIMEOUT)) if base_url is None
                  else docker.DockerClient(base_url=base_url, timeout=int(PING_TIMEOUT)))
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()
