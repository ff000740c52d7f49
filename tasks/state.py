"""What travels from stage to stage: a build's request and what is known so far.

It is the only argument of every stage task, so Flower shows it. It carries no
secret: credentials are looked up by the worker that needs them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from config.references import ImageRef

Status = Literal["built", "skipped", "failed", "cancelled"]


@dataclass
class BuildState:
    #: The request this chain serves (the task id its caller waits on).
    request_id: str
    source: dict[str, Any]
    #: Where the image goes, parsed once: the repository at first, tagged once hashed.
    ref: ImageRef | None = None
    dockerfile: str | None = None
    build_args: dict[str, str] = field(default_factory=dict)
    #: Names of secret build args; each worker that builds looks their values up itself.
    secrets: list[str] = field(default_factory=list)
    target: str | None = None
    platform: str | None = None
    #: The platforms of a multi-platform request (``platform`` is then None): one build
    #: per platform, then an image index over them (see tasks/multiplatform.py).
    platforms: list[str] = field(default_factory=list)
    #: The multi-platform request this single-platform build is one platform of.
    parent: str | None = None
    builder: str | None = None
    #: Which Dockerfile frontend built the image on the docker pool: ``buildkit`` or ``legacy``.
    frontend: str | None = None
    #: Which Dockerfile frontend parsed the Dockerfile with BuildKit: the frontend image's
    #: reference (a '# syntax=' line's, or BUILDQ_DOCKERFILE_FRONTEND), or ``built-in``.
    dockerfile_frontend: str | None = None
    #: Options of a Dockerfile buildq generates for a Python project that has none.
    entrypoint: list[str] | None = None
    python: str | None = None
    gpu: bool = False
    #: That Dockerfile's text, once the hash stage has written it (hashed and packed as is).
    generated_dockerfile: str | None = None
    #: How a project without a Dockerfile is built (workers.dockerfile.Plan.to_dict()):
    #: "dependencies" (locked/resolved/none), "lock", "job", a job's own "dockerfile" and
    #: "context", the default "ignore" patterns.
    generated: dict[str, Any] | None = None
    #: The validated launch-config as W&B-keyed mapping (never a secret in it).
    config: dict[str, Any] = field(default_factory=dict)
    #: "digest" or "tag": how base images count in the hash (request, config, then env).
    base_policy: str | None = None
    #: Build and push even when the tag exists (same hash, same tag).
    force: bool = False
    #: Where this request's record is POSTed when it ends, besides BUILDQ_NOTIFY_URL.
    notify: str | None = None
    #: Base images as written (after ARG substitution) and the digest each resolved to.
    bases: list[dict[str, str]] = field(default_factory=list)
    #: Who asked (tasks/requester.py), and whether a verified signature says so.
    requester: str | None = None
    requester_verified: bool = False
    #: A token handed over by the watchdog: this chain continues a dead holder's build.
    token: str | None = None
    source_hash: str | None = None
    tag: str | None = None
    image: str | None = None
    #: Directory holding the fetched source, and whether we must delete it.
    workdir: str | None = None
    owned: bool = False
    commit: str | None = None
    context_store: str | None = None
    context_key: str | None = None
    context_bytes: int = 0
    digest: str | None = None
    status: Status | None = None
    error: str | None = None
    error_kind: str | None = None
    stages: dict[str, float] = field(default_factory=dict)
    #: Who cancelled the request (user@host) and when, for a cancelled one.
    cancelled_by: str | None = None
    cancelled_at: float | None = None
    #: Retries already spent on the stage this state is handed to.
    retries: int = 0
    created_at: float = field(default_factory=time.time)

    @property
    def done(self) -> bool:
        """Nothing is left to do but write the record."""
        return self.status is not None

    @property
    def destination(self) -> str | None:
        """The repository the image goes to, as the record shows it."""
        return self.ref.name if self.ref else None

    def fail(self, message: str, kind: str) -> None:
        self.status = "failed"
        self.error = message
        self.error_kind = kind

    def cancel(self, by: str, at: float) -> None:
        self.status = "cancelled"
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
        self.error = f"cancelled by {by} at {when}."
        self.error_kind = "cancelled"
        self.cancelled_by, self.cancelled_at = by, at

    def to_dict(self) -> dict[str, Any]:
        """A copy in plain values, as ``dataclasses.asdict`` makes it, without its deep copy
        of each leaf (~50 µs a time): a cache hit sends it at two stage boundaries."""
        data = {name: _plain(getattr(self, name)) for name in self.__dataclass_fields__}
        data["ref"] = self.ref.to_dict() if self.ref else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildState:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if isinstance(known.get("ref"), dict):
            known["ref"] = ImageRef.from_dict(known["ref"])
        return cls(**known)


def _plain(value: Any) -> Any:
    """A copy of a JSON-shaped value: its dicts and lists are new, its scalars shared."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    return value
