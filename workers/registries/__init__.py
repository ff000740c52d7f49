"""Registries: does a tag exist, and with which credentials to push."""

from workers.registries.base import Registry, registry_for
from workers.registries.v2 import V2Registry

__all__ = ["Registry", "V2Registry", "registry_for"]
