"""Registries: does a tag exist, and with which credentials to push.

Backends: ``v2`` (any registry), ``ecr``, ``gar`` (Artifact Registry) and ``acr``;
``registry_for`` picks one by the destination's host.
"""

from workers.registries.base import BACKENDS, Registry, registry_for
from workers.registries.v2 import V2Registry

__all__ = ["BACKENDS", "Registry", "V2Registry", "registry_for"]
