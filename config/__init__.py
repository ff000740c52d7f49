"""buildq configuration: the launch-config file, image references and service settings."""

from config.errors import ConfigError
from config.loader import AGENT_KEYS, config_from_mapping, load_config
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
