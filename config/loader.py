"""The launch-config's public entry: find, read, translate and check it, then report
every problem at once.

Each step has its module: :mod:`config.reading` (the file, strict YAML),
:mod:`config.translating` (agent and Helm keys, the schema's sections) and
:mod:`config.checking` (rules that span keys). Each problem is one line naming the
file, the key, what was found, what was expected and how to fix it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from config.checking import check_config
from config.errors import ConfigError
from config.problems import Problems, show
from config.reading import find_config, read_config_file
from config.schema import LaunchConfig
from config.translating import translate


def load_config(
    path: str | os.PathLike[str] | None = None, *, env_path: str | None = None,
    destination_given: bool = False,
) -> LaunchConfig:
    """Load the launch-config the way the W&B agent finds it.

    Order: ``path`` (--config), then ``env_path`` (BUILDQ_CONFIG), then
    ``~/.config/wandb/launch-config.yaml`` if present, else the defaults. A path
    the user named explicitly must exist; only the default path may be absent.
    ``destination_given``: the request names its own destination (``--destination``),
    so a config without one is complete; the destination itself is checked when it is
    applied (``tasks.operations.with_destination``).
    """
    found = find_config(path, env_path)
    if found is None:
        return LaunchConfig(origin="<defaults>")
    file, named_by = found
    return config_from_mapping(read_config_file(file, named_by), origin=str(file),
                               destination_given=destination_given)


def config_from_mapping(data: Mapping[str, Any], origin: str = "<inline>", *,
                        destination_given: bool = False) -> LaunchConfig:
    """Validate an already parsed config; every problem is reported in one ConfigError.

    ``destination_given`` as for :func:`load_config`.
    """
    if data is None:
        return LaunchConfig(origin=origin)
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{origin}: (top level): found {show(data)}, expected a mapping of keys "
            "(environment, builder, ...).",
            "A launch config starts with keys such as 'builder:' at the left margin.",
        )
    problems = Problems()
    warnings: list[str] = []
    sections = translate(data, problems, warnings)
    config = LaunchConfig.model_validate({**sections.models, "origin": origin})
    check_config(config, problems, warnings, check_builder=not sections.builder_unreadable,
                 destination_given=destination_given)
    problems.raise_if_any(origin)
    return config.model_copy(update={"warnings": tuple(warnings)})
