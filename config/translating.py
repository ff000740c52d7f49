"""From the data of a launch-config file to the schema's sections.

Users hand buildq the ``launch-config.yaml`` their W&B launch agent already uses (or
the agent's Helm ``values.yaml``), so the agent's own keys (entity, queues, api_key,
...) are accepted and dropped without their values ever being read, and pydantic's
validation errors become problem lines in the user's key paths.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from config.problems import Problems, show
from config.schema import (
    BuilderConfig,
    BuilderType,
    Environment,
    EnvironmentType,
    LegacyRegistry,
    LegacyRegistryType,
)

#: Top-level keys of the W&B launch agent that buildq has no use for.
AGENT_KEYS = frozenset(
    {
        "entity",
        "project",
        "queue",
        "queues",
        "max_jobs",
        "max_schedulers",
        "secure_mode",
        "base_url",
        "api_key",
        "verbosity",
        "runner",
    }
)

#: Environment keys the W&B agent reads that buildq leaves to the default credential chain.
_IGNORED_ENVIRONMENT_KEYS = {"profile": "set AWS_PROFILE for the workers instead"}

_SECTIONS: dict[str, type[BaseModel]] = {
    "environment": Environment,
    "builder": BuilderConfig,
    "registry": LegacyRegistry,
}
#: Keys whose values are a closed list, so a message can name every choice.
_ALLOWED: dict[tuple[str, str], tuple[str, ...]] = {
    ("environment", "type"): get_args(EnvironmentType),
    ("builder", "type"): get_args(BuilderType),
    ("registry", "type"): get_args(LegacyRegistryType),
}
#: The Helm chart of the agent nests the launch-config under this key of values.yaml.
_HELM_AGENT_CONFIG_KEY = "agentConfig"


@dataclass(frozen=True)
class Sections:
    """What :func:`translate` read: the sections that passed the schema, as models."""

    #: Section name → model, ready to be :class:`LaunchConfig` fields.
    models: dict[str, BaseModel]
    #: A builder key was written but its section was too broken to keep: its rules
    #: then wait for the fix instead of checking the defaults.
    builder_unreadable: bool


def _closest(key: str, choices: list[str]) -> str | None:
    # Underscores for hyphens is the commonest slip, so compare both spellings.
    candidates = difflib.get_close_matches(key.replace("_", "-"), choices, n=1, cutoff=0.6)
    if not candidates:
        candidates = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return candidates[0] if candidates else None


def _suggest(key: str, choices: list[str]) -> str:
    known = ", ".join(sorted(choices))
    guess = _closest(key, choices)
    if guess:
        return f"Did you mean {guess!r}? Known keys: {known}."
    return f"Remove it or use one of: {known}."


def _keys_of(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _unwrap_helm_values(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accept a Helm ``values.yaml``, whose agent config sits under ``agentConfig``."""
    inner = data.get(_HELM_AGENT_CONFIG_KEY)
    if any(k in data for k in _SECTIONS) or not isinstance(inner, Mapping):
        return data
    return inner


def _key_path(section: str, loc: tuple[int | str, ...], data: Any) -> str:
    """Render ``loc`` as the user's key path, dropping pydantic's union-branch names."""
    path = section
    node = data
    for step in loc:
        if isinstance(node, Mapping) and step in node:
            path += f".{step}"
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and step < len(node):
            path += f"[{step}]"
            node = node[step]
    return path


def _translate(section: str, exc: ValidationError, data: Any, problems: Problems) -> None:
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        field = loc[0] if loc else ""
        # A missing key is not in the data to walk, so its path is spelled directly.
        if err["type"] == "missing":
            path = ".".join([section, *loc])
        else:
            path = _key_path(section, err["loc"], data)
        found = show(err.get("input"))
        kind = err["type"]
        allowed = _ALLOWED.get((section, field))
        if kind == "missing":
            choices = f"one of {', '.join(allowed)}" if allowed else "a value"
            example = allowed[0] if allowed else "<value>"
            problems.add(path, "nothing", choices, f"Add '{field}: {example}' under {section}.")
        elif kind == "literal_error" and allowed:
            guess = difflib.get_close_matches(str(err.get("input")), allowed, n=1)
            hint = f"Did you mean {guess[0]!r}?" if guess else f"Write {field}: {allowed[0]}."
            problems.add(path, found, f"one of {', '.join(allowed)}", hint)
        elif kind == "string_type":
            problems.add(path, found, "a string", "Quote the value, e.g. '123'.")
        elif kind in {"dict_type", "model_type", "model_attributes_type"}:
            problems.add(path, found, "a mapping", f"Indent the keys of {path} below it.")
        elif kind == "list_type":
            item = err.get("input")
            example = f"'- {item}'" if isinstance(item, str) else "'- <item>'"
            problems.add(path, found, "a list",
                         f"Write each item on its own line below the key, like {example}.")
        elif kind == "invalid-json-value":
            problems.add(
                path,
                found,
                "a string, number, boolean, list or mapping",
                "Quote the value so YAML does not read it as a date or other type.",
            )
        else:
            # pydantic's own words say which type it wanted ("Input should be a valid integer").
            wanted = str(err.get("msg", "")).removeprefix("Input should be ").rstrip(".")
            problems.add(path, found, wanted or "a valid value", f"Correct {path}.")


def _validate_section(
    name: str, value: Any, problems: Problems, warnings: list[str]
) -> BaseModel | None:
    model = _SECTIONS[name]
    if value is None:
        return None
    if not isinstance(value, Mapping):
        problems.add(
            name, show(value), "a mapping of keys", f"Indent the keys of {name} below it."
        )
        return None
    known = _keys_of(model)
    kept: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            problems.add(f"{name}.{key}", "a non-string key", "a key name", "Quote the key.")
        elif key in known:
            kept[key] = item
        elif name == "environment" and key in _IGNORED_ENVIRONMENT_KEYS:
            warnings.append(
                f"environment.{key} is ignored: buildq uses the default credential chain; "
                f"{_IGNORED_ENVIRONMENT_KEYS[key]}."
            )
        else:
            problems.add(
                f"{name}.{key}", "an unknown key", f"a key of {name}", _suggest(key, known)
            )
            guess = _closest(key, known)
            if guess and guess not in value:
                # "missing build-context-store" would only repeat the misspelling report.
                problems.claimed.add(f"{name}.{guess}")
    try:
        return model.model_validate(kept)
    except ValidationError as exc:
        _translate(name, exc, kept, problems)
        # Check the rest of the section too, so one bad key does not hide others.
        bad = {str(err["loc"][0]) for err in exc.errors() if err["loc"]}
        rest = {k: v for k, v in kept.items() if k not in bad}
        try:
            return model.model_validate(rest)
        except ValidationError:
            return None


def translate(data: Mapping[str, Any], problems: Problems, warnings: list[str]) -> Sections:
    """Read the top-level mapping of a launch-config (or of a Helm values file) into
    sections; what does not fit is reported to ``problems``, what is only deprecated
    or ignored to ``warnings``."""
    data = _unwrap_helm_values(data)
    models: dict[str, BaseModel] = {}
    for key, value in data.items():
        if key in _SECTIONS:
            model = _validate_section(key, value, problems, warnings)
            if model is not None:
                models[key] = model
        elif key in AGENT_KEYS:
            # The agent's own settings; values (api_key above all) are never read.
            continue
        else:
            problems.add(
                str(key),
                "an unknown top-level key",
                f"{', '.join(_SECTIONS)} or a W&B agent key",
                _suggest(str(key), [*_SECTIONS, *sorted(AGENT_KEYS)]),
            )
    return Sections(models, builder_unreadable="builder" in data and "builder" not in models)
