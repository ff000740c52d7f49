"""The builder used when building is switched off: it refuses, clearly."""

from __future__ import annotations

from collections.abc import Mapping

from config.errors import InputError
from workers.builders.base import Builder, BuildRequest, LogFn

_HINT = ("Set builder.type: docker (with a Docker Engine on this host) or builder.type: kaniko "
         "(in Kubernetes) in the launch config, or enqueue an image job that needs no build.")


class NoopBuilder(Builder):
    name = "noop"

    def build(self, request: BuildRequest, log: LogFn) -> str:
        raise InputError(
            f"building is disabled (builder.type: noop); cannot build {request.image}.", _HINT
        )

    def push(self, image: str, auth: Mapping[str, str] | None, log: LogFn) -> str:
        raise InputError(f"building is disabled (builder.type: noop); cannot push {image}.", _HINT)

    def has_image(self, image: str) -> bool:
        return False

    def remove_image(self, image: str) -> None:
        return None
