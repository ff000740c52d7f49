"""Where workers may push: ``BUILDQ_ALLOWED_DESTINATIONS``, else the operator's launch-config.

A request names its own destination (and may carry its own launch-config), so the
rule cannot come from the request: it comes from the environment and the launch-config
of the process that checks it (``BUILDQ_CONFIG``, else the agent's default path). With
``BUILDQ_ALLOWED_DESTINATIONS`` set (comma-separated glob patterns over
``registry/repository``, ``*`` matching across ``/``), a push target must match one of
them. Unset, the operator's ``builder.destination`` and the repositories under it are
allowed, and so is any repository of a loopback registry (a build host's own).

Every repository a build pushes to is a push target: the destination, ``builder.cache-repo``
when set (the default ``<destination>-cache`` follows the destination), and any
``--cache-repo``/``--destination`` in kaniko-config's container args.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from config.errors import ForbiddenError
from config.names import is_loopback_host
from config.references import ImageRef, parse_destination, parse_image_ref
from config.settings import Settings

#: kaniko flags whose value is a repository kaniko pushes to.
PUSH_FLAGS = ("--destination", "--cache-repo")


@dataclass(frozen=True)
class DestinationPolicy:
    """The rule a push target is checked against."""

    #: BUILDQ_ALLOWED_DESTINATIONS; when empty, ``home`` and loopback registries.
    patterns: tuple[str, ...] = ()
    #: The operator's launch-config destination (``registry/repository``), if any.
    home: str | None = None
    #: Where ``home`` came from, for messages.
    origin: str = "<defaults>"

    def allows(self, ref: ImageRef) -> bool:
        name = f"{ref.registry.lower()}/{ref.repository}"
        if self.patterns:
            return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)
        if is_loopback_host(ref.registry):
            return True
        return self.home is not None and (name == self.home or name.startswith(self.home + "/"))

    def rule(self) -> str:
        if self.patterns:
            return f"BUILDQ_ALLOWED_DESTINATIONS={','.join(self.patterns)}"
        home = (f"{self.home} and repositories under it (builder.destination of {self.origin})"
                if self.home else f"no builder.destination in {self.origin}")
        return f"BUILDQ_ALLOWED_DESTINATIONS is unset: {home}, and loopback registries"

    def check(self, ref: ImageRef, what: str) -> None:
        if self.allows(ref):
            return
        raise ForbiddenError(
            f"{what} {ref.name} is not a destination workers may push to ({self.rule()}).",
            "Push to an allowed repository, or ask the operator to add a pattern to "
            "BUILDQ_ALLOWED_DESTINATIONS (e.g. registry.example.com/team/*) where workers run "
            "and where requests are made.")

    @classmethod
    def from_settings(cls, settings: Settings) -> DestinationPolicy:
        """The policy of this process: its environment and its own launch-config."""
        if settings.allowed_destinations:
            return cls(patterns=tuple(p.lower() if "/" not in p else _lower_host(p)
                                      for p in settings.allowed_destinations))
        home, origin = _operator_destination(settings.config_path)
        return cls(home=home, origin=origin)


def _lower_host(pattern: str) -> str:
    host, _, rest = pattern.partition("/")
    return f"{host.lower()}/{rest}"


_homes: dict[tuple[str, float], tuple[str | None, str]] = {}


def _operator_destination(env_path: str | None) -> tuple[str | None, str]:
    """builder.destination of the launch-config this process would read, cached per file
    version (a worker checks every request against it)."""
    from config.loader import load_config
    from config.reading import find_config

    found = find_config(None, env_path)
    if found is None:
        return None, "<no launch-config>"
    path = str(found[0])
    try:
        key = (path, os.stat(path).st_mtime)
    except OSError:
        key = (path, 0.0)
    if key not in _homes:
        cfg = load_config(None, env_path=env_path, destination_given=True)
        dest = cfg.destination()
        _homes.clear()
        _homes[key] = (f"{dest.registry.lower()}/{dest.repository}" if dest else None, path)
    return _homes[key]


def kaniko_push_args(kaniko_config: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """``(flag, value)`` of each push flag in kaniko-config's container args."""
    found: list[tuple[str, str]] = []
    if not isinstance(kaniko_config, Mapping):
        return found
    pod = ((kaniko_config.get("spec") or {}).get("template") or {}).get("spec") or {}
    containers = pod.get("containers") if isinstance(pod, Mapping) else None
    for container in containers if isinstance(containers, list) else []:
        args = container.get("args") if isinstance(container, Mapping) else None
        for arg in args if isinstance(args, list) else []:
            if isinstance(arg, str):
                key, sep, value = arg.partition("=")
                if key in PUSH_FLAGS and sep:
                    found.append((key, value))
    return found


def push_targets(destination: ImageRef | None, cache_repo: str | None,
                 kaniko_config: Mapping[str, Any] | None) -> list[tuple[str, ImageRef]]:
    """Every repository a build of this request pushes to, with what named it."""
    targets: list[tuple[str, ImageRef]] = []
    if destination is not None:
        targets.append(("destination", destination))
    if cache_repo:
        targets.append(("builder.cache-repo", parse_destination(cache_repo, "builder.cache-repo")))
    for flag, value in kaniko_push_args(kaniko_config):
        ref = parse_image_ref(value.removeprefix("https://"))
        targets.append((f"builder.kaniko-config {flag}", ImageRef(ref.registry, ref.repository)))
    return targets


def check_push_targets(policy: DestinationPolicy, destination: ImageRef | None,
                       cache_repo: str | None, kaniko_config: Mapping[str, Any] | None) -> None:
    """Refuse the request when any repository it would push to is outside the policy."""
    for what, ref in push_targets(destination, cache_repo, kaniko_config):
        policy.check(ref, what)
