"""buildq configuration: the launch-config file, image references and service settings.

Names load on first use: ``import config.errors`` must not pay for pydantic and YAML,
so a short-lived process (``buildq hash``) starts quickly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from config.errors import ConfigError
    from config.loader import config_from_mapping, load_config
    from config.references import (
        ImageRef,
        RegistryKind,
        classify_registry,
        parse_destination,
        parse_image_ref,
    )
    from config.schema import (
        DEFAULT_BUILD_JOB_NAME,
        BuilderConfig,
        Environment,
        LaunchConfig,
        LegacyRegistry,
    )
    from config.translating import AGENT_KEYS

_HOMES = {
    "ConfigError": "config.errors",
    "AGENT_KEYS": "config.translating",
    "config_from_mapping": "config.loader",
    "load_config": "config.loader",
    "ImageRef": "config.references",
    "RegistryKind": "config.references",
    "classify_registry": "config.references",
    "parse_destination": "config.references",
    "parse_image_ref": "config.references",
    "DEFAULT_BUILD_JOB_NAME": "config.schema",
    "BuilderConfig": "config.schema",
    "Environment": "config.schema",
    "LaunchConfig": "config.schema",
    "LegacyRegistry": "config.schema",
}

__all__ = [
    "AGENT_KEYS",
    "DEFAULT_BUILD_JOB_NAME",
    "BuilderConfig",
    "ConfigError",
    "Environment",
    "ImageRef",
    "LaunchConfig",
    "LegacyRegistry",
    "RegistryKind",
    "classify_registry",
    "config_from_mapping",
    "load_config",
    "parse_destination",
    "parse_image_ref",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(name)
    return getattr(importlib.import_module(home), name)
