"""Builders: docker on build hosts, kaniko in Kubernetes, noop when building is off."""

from workers.builders.base import (
    Builder,
    BuildRequest,
    EngineUnavailableError,
    engine_available,
)
from workers.builders.noop import NoopBuilder

__all__ = ["BuildRequest", "Builder", "EngineUnavailableError", "NoopBuilder",
           "engine_available"]
