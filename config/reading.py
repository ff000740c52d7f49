"""Finding the launch-config file and reading it as strict YAML.

Nothing here knows what the keys mean: the result is plain data for
:mod:`config.translating`. Messages quote positions, never the file's text, since
the lines around a mistake can hold the agent's ``api_key``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from config.errors import ConfigError
from config.settings import DEFAULT_CONFIG_PATH


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping.

    PyYAML keeps the last value silently, so a doubled ``destination:`` would
    push somewhere the user did not read first.
    """


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    first_line: dict[tuple[str, str], int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        ident = (key_node.tag, key_node.value)
        if ident in first_line:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key {key_node.value!r} appears twice (first on line {first_line[ident] + 1})",
                key_node.start_mark,
            )
        first_line[ident] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)

_DUPLICATE_KEY_RE = re.compile(r"key ('.*') appears twice")


def parse_yaml(text: str, origin: str) -> Any:
    """The data of one YAML document; a duplicate key is a syntax error."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        # Only PyYAML's problem text: its snippet of the line could hold an api_key.
        problem = exc.problem or exc.context or "syntax error"
        twice = _DUPLICATE_KEY_RE.match(problem)
        if "\\t" in problem or "\t" in problem:
            hint = "YAML indents with spaces only; replace the tab with spaces."
        elif twice:
            # YAML would keep only the last one; which one was meant is the user's call.
            hint = f"Keep one of the two {twice.group(1)} keys and delete the other."
        else:
            hint = ("Check the indentation and quoting at that spot; values holding ': ' or "
                    "' #' need quotes.")
        raise ConfigError(
            f"{origin}: {where}: the file is not valid YAML ({problem}).", hint
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{origin}: the file is not valid YAML ({exc}).",
            "Save the file as plain UTF-8 text.",
        ) from None


def find_config(
    path: str | os.PathLike[str] | None = None, env_path: str | None = None
) -> tuple[Path, str] | None:
    """The launch-config file the way the W&B agent finds it, and what named it.

    Order: ``path`` (--config), then ``env_path`` (BUILDQ_CONFIG), then
    ``~/.config/wandb/launch-config.yaml`` if present; None means the defaults. A
    file the user named is returned even when missing, so reading it says so.
    """
    if path is not None and os.fspath(path) != "":
        return Path(os.fspath(path)).expanduser(), "--config"
    if env_path:
        return Path(env_path).expanduser(), "BUILDQ_CONFIG"
    default = DEFAULT_CONFIG_PATH.expanduser()
    if default.exists():
        return default, "the default path"
    return None


def read_config_file(path: Path, named_by: str) -> Any:
    """The parsed YAML of ``path``; ``named_by`` (--config, BUILDQ_CONFIG, ...) is how
    the user pointed at it, so a message can say where to correct the path."""
    origin = str(path)
    if not path.exists():
        raise ConfigError(
            f"{origin}: the launch config named by {named_by} does not exist.",
            f"Check the path given to {named_by}, or leave {named_by} unset to use "
            f"{DEFAULT_CONFIG_PATH} or the defaults.",
        )
    if not path.is_file():
        raise ConfigError(
            f"{origin}: the launch config named by {named_by} is not a file.",
            "Point it at the launch-config.yaml file itself, not its directory.",
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{origin}: the launch config cannot be read ({exc.strerror}).",
            "Make the file readable by the user running buildq.",
        ) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{origin}: byte {exc.start} is not UTF-8 text.",
            "Save the file as UTF-8.",
        ) from None
    return parse_yaml(text, origin)
