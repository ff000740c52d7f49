"""Find, parse and validate the launch-config, reporting every problem at once.

Users hand buildq the ``launch-config.yaml`` their W&B launch agent already uses,
so the agent's own keys (entity, queues, api_key, ...) are accepted and dropped,
and everything buildq does read is checked before any build starts. Each problem
is one line naming the file, the key, what was found, what was expected and how
to fix it; values of dropped keys are never read into a message.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ValidationError

from config.errors import ConfigError
from config.references import (
    ImageRef,
    classify_registry,
    ecr_host_typo,
    parse_destination,
    parse_image_ref,
)
from config.schema import (
    BuilderConfig,
    BuilderType,
    Environment,
    EnvironmentType,
    LaunchConfig,
    LegacyRegistry,
    LegacyRegistryType,
    legacy_destination,
)
from config.settings import DEFAULT_CONFIG_PATH

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

#: Room left in Kubernetes' 63-character names for the per-build suffix.
MAX_BUILD_JOB_NAME = 40

_SECTIONS: dict[str, type[BaseModel]] = {
    "environment": Environment,
    "builder": BuilderConfig,
    "registry": LegacyRegistry,
}
_ALLOWED: dict[tuple[str, str], tuple[str, ...]] = {
    ("environment", "type"): get_args(EnvironmentType),
    ("builder", "type"): get_args(BuilderType),
    ("registry", "type"): get_args(LegacyRegistryType),
}
_EXAMPLE_REGION = {"aws": "us-east-1", "gcp": "us-central1"}
_AWS_REGION_RE = re.compile(r"^[a-z]{2}(?:-[a-z]+)+-[0-9]+$")
_GCP_REGION_RE = re.compile(r"^[a-z]+(?:-[a-z]+)*[0-9]+$")
#: Artifact Registry multi-regions and the region prefixes they cover.
_GAR_MULTI_REGIONS = {"us": "us-", "europe": "europe-", "asia": "asia-"}
_DNS_LABEL_RE = re.compile(r"^[a-z0-9](?:[-a-z0-9]*[a-z0-9])?$")
_PLATFORM_RE = re.compile(r"^[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9]+)?$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_AZURE_ACCOUNT_RE = re.compile(r"^([a-z0-9]{3,24})\.blob\.core\.windows\.net$")
_AZURE_CONTAINER_RE = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}$")
#: Kaniko flags buildq sets per build; a fixed value in kaniko-config would break tagging.
_RESERVED_KANIKO_FLAGS = ("--destination", "--context", "--digest-file")
#: Kaniko's boolean flags: written bare they mean "=true"; every other flag needs a value.
KANIKO_BOOLEAN_FLAGS = frozenset({
    "--cache", "--cache-copy-layers", "--cache-run-layers", "--cleanup", "--compressed-caching",
    "--force", "--ignore-var-run", "--insecure", "--insecure-pull", "--log-timestamp",
    "--no-push", "--no-push-cache", "--push-ignore-immutable-tag-errors", "--reproducible",
    "--single-snapshot", "--skip-default-registry-fallback", "--skip-push-permission-check",
    "--skip-tls-verify", "--skip-tls-verify-pull", "--skip-unused-stages", "--use-new-run",
    "--preserve-context",
})

StoreKind = Literal["s3", "gs", "azure", "file"]
_STORE_EXAMPLES: dict[StoreKind, str] = {
    "s3": "s3://<bucket>/<path>",
    "gs": "gs://<bucket>/<path>",
    "azure": "https://<storage-account>.blob.core.windows.net/<container>",
    "file": "file:///<absolute/path>",
}
_STORES_FOR: dict[str | None, tuple[StoreKind, ...]] = {
    "aws": ("s3",),
    "gcp": ("gs",),
    "azure": ("azure",),
    None: ("file", "s3", "gs", "azure"),
}


@dataclass(frozen=True)
class _Problem:
    path: str
    found: str
    expected: str
    hint: str

    def line(self, origin: str) -> str:
        return f"{origin}: {self.path}: found {self.found}, expected {self.expected}. {self.hint}"


class _Problems:
    def __init__(self) -> None:
        self.items: list[_Problem] = []
        #: Keys already explained by another problem (a misspelling of them).
        self.claimed: set[str] = set()

    def add(self, path: str, found: str, expected: str, hint: str) -> None:
        # A key that failed its type check is then also "missing" to later rules;
        # the first report is the useful one.
        if path in self.claimed or any(p.path == path for p in self.items):
            return
        self.items.append(_Problem(path, found, expected, hint))

    def add_error(self, err: ConfigError) -> None:
        # Reference errors already say "<key>: found ..., expected ..."; keep them whole.
        path, _, rest = err.message.partition(": ")
        found, _, expected = rest.removeprefix("found ").partition(", expected ")
        self.add(path, found, expected.rstrip("."), err.hint or "")

    def raise_if_any(self, origin: str) -> None:
        if not self.items:
            return
        if len(self.items) == 1:
            p = self.items[0]
            raise ConfigError(
                f"{origin}: {p.path}: found {p.found}, expected {p.expected}.", p.hint
            )
        lines = "\n".join(p.line(origin) for p in self.items)
        raise ConfigError(
            f"{origin} has {len(self.items)} problems in its launch config:\n{lines}",
            None,
        )


def _show(value: Any) -> str:
    """Describe a value the user wrote, short enough for one line."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value if len(value) <= 80 else value[:77] + "..."
        return repr(text) if text else "an empty string"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


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


# --------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping.

    PyYAML keeps the last value silently, so a doubled ``destination:`` would
    push somewhere the user did not read first.
    """


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[tuple[str, str], int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        ident = (key_node.tag, key_node.value)
        if ident in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key {key_node.value!r} appears twice (first on line {seen[ident] + 1})",
                key_node.start_mark,
            )
        seen[ident] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def _parse_yaml(text: str, origin: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        # Only PyYAML's problem text: its snippet of the line could hold an api_key.
        problem = exc.problem or exc.context or "syntax error"
        twice = re.match(r"key ('.*') appears twice", problem)
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


def _read(path: Path, source: str, destination_given: bool = False) -> LaunchConfig:
    origin = str(path)
    if not path.exists():
        raise ConfigError(
            f"{origin}: the launch config named by {source} does not exist.",
            f"Check the path given to {source}, or leave {source} unset to use "
            f"{DEFAULT_CONFIG_PATH} or the defaults.",
        )
    if not path.is_file():
        raise ConfigError(
            f"{origin}: the launch config named by {source} is not a file.",
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
    return config_from_mapping(_parse_yaml(text, origin), origin=origin,
                               destination_given=destination_given)


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
    if path is not None and os.fspath(path) != "":
        return _read(Path(os.fspath(path)).expanduser(), "--config", destination_given)
    if env_path:
        return _read(Path(env_path).expanduser(), "BUILDQ_CONFIG", destination_given)
    default = DEFAULT_CONFIG_PATH.expanduser()
    if default.exists():
        return _read(default, "the default path", destination_given)
    return LaunchConfig(origin="<defaults>")


# --------------------------------------------------------------------- structure


def _unwrap_helm_values(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accept a Helm ``values.yaml``, whose agent config sits under ``agentConfig``."""
    if any(k in data for k in _SECTIONS) or not isinstance(data.get("agentConfig"), Mapping):
        return data
    inner: Mapping[str, Any] = data["agentConfig"]
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


def _translate(section: str, exc: ValidationError, data: Any, problems: _Problems) -> None:
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        field = loc[0] if loc else ""
        # A missing key is not in the data to walk, so its path is spelled directly.
        if err["type"] == "missing":
            path = ".".join([section, *loc])
        else:
            path = _key_path(section, err["loc"], data)
        found = _show(err.get("input"))
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
    name: str, value: Any, problems: _Problems, warnings: list[str]
) -> dict[str, Any] | None:
    model = _SECTIONS[name]
    if value is None:
        return None
    if not isinstance(value, Mapping):
        problems.add(
            name, _show(value), "a mapping of keys", f"Indent the keys of {name} below it."
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
        model.model_validate(kept)
    except ValidationError as exc:
        _translate(name, exc, kept, problems)
        # Check the rest of the section too, so one bad key does not hide others.
        bad = {str(err["loc"][0]) for err in exc.errors() if err["loc"]}
        kept = {k: v for k, v in kept.items() if k not in bad}
        try:
            model.model_validate(kept)
        except ValidationError:
            return None
    return kept


# ------------------------------------------------------------------------- rules


def _check_environment(env: Environment, problems: _Problems) -> None:
    if env.type == "aws":
        if not env.region:
            problems.add(
                "environment.region",
                "nothing",
                "the AWS region the agent runs in",
                "Add 'region: us-east-1' (your region) under environment.",
            )
        elif not _AWS_REGION_RE.match(env.region):
            problems.add(
                "environment.region",
                _show(env.region),
                "an AWS region name like us-east-1",
                "Copy the region code from the AWS console.",
            )
    elif env.type == "gcp":
        if not env.region:
            problems.add(
                "environment.region",
                "nothing",
                "the Google Cloud region the agent runs in",
                "Add 'region: us-central1' (your region) under environment.",
            )
        elif not _GCP_REGION_RE.match(env.region):
            problems.add(
                "environment.region",
                _show(env.region),
                "a Google Cloud region name like us-central1",
                "Google Cloud regions have no '-' before the digit.",
            )
        if not env.project:
            problems.add(
                "environment.project",
                "nothing",
                "the Google Cloud project id the agent runs in",
                "Add 'project: <project-id>' under environment.",
            )


def _check_destination(
    key: str, ref: ImageRef, env: Environment | None, problems: _Problems
) -> None:
    fixed = ecr_host_typo(ref)
    if fixed:
        problems.add(
            key,
            _show(ref.name),
            "an ECR host of the form <account-id>.dkr.ecr.<region>.amazonaws.com",
            f"ECR hosts contain '.dkr.': write {fixed}/{ref.repository}.",
        )
        return
    kind = classify_registry(ref)
    if kind.kind == "ecr" and env is not None and env.type == "aws" and env.region:
        if kind.region != env.region:
            problems.add(
                key,
                f"an ECR repository in {kind.region} ({ref.name})",
                f"a repository in the environment's region {env.region}",
                f"Use {kind.account}.dkr.ecr.{env.region}.amazonaws.com/{ref.repository}, "
                f"or set environment.region: {kind.region} if the agent runs there.",
            )
    elif kind.kind == "gar":
        parts = ref.repository.split("/")
        if len(parts) < 3:
            problems.add(
                key,
                _show(ref.name),
                "<region>-docker.pkg.dev/<project-id>/<repository>/<image-name>",
                "Artifact Registry needs the project, the repository and an image name.",
            )
            return
        if env is not None and env.type == "gcp":
            region = kind.region or ""
            prefix = _GAR_MULTI_REGIONS.get(region)
            region_ok = region == env.region or (
                prefix is not None and (env.region or "").startswith(prefix)
            )
            if env.region and not region_ok:
                problems.add(
                    key,
                    f"an Artifact Registry location {region!r} ({ref.name})",
                    f"the environment's region {env.region}",
                    f"Use {env.region}-docker.pkg.dev/{ref.repository}, or correct "
                    "environment.region.",
                )
            if env.project and kind.project != env.project:
                problems.add(
                    key,
                    f"the project {kind.project!r} ({ref.name})",
                    f"the environment's project {env.project}",
                    f"Use {ref.registry}/{env.project}/{'/'.join(parts[1:])}, or correct "
                    "environment.project.",
                )


def _store_kind(url: str) -> tuple[StoreKind | None, str | None]:
    """Classify a context-store URL; the second item says what is wrong with it."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    bucket_kind: StoreKind | None = "s3" if scheme == "s3" else "gs" if scheme == "gs" else None
    if bucket_kind is not None:
        if not _BUCKET_RE.match(parts.netloc):
            return bucket_kind, f"a bucket name after {scheme}:// ({_STORE_EXAMPLES[bucket_kind]})"
        return bucket_kind, None
    if scheme == "https" and parts.netloc.endswith(".blob.core.windows.net"):
        container = parts.path.strip("/").split("/")[0]
        if not _AZURE_ACCOUNT_RE.match(parts.netloc):
            return "azure", "a storage account of 3-24 lowercase letters and digits"
        if not _AZURE_CONTAINER_RE.match(container):
            return "azure", f"a container after the account ({_STORE_EXAMPLES['azure']})"
        return "azure", None
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            return "file", "an absolute path: file:///<absolute/path>"
        return "file", None
    return None, None


def _check_store(url: str, env: Environment | None, problems: _Problems) -> None:
    key = "builder.build-context-store"
    env_type = env.type if env else None
    allowed = _STORES_FOR[env_type]
    kind, flaw = _store_kind(url)
    expected = " or ".join(_STORE_EXAMPLES[k] for k in allowed)
    if kind is None or kind not in allowed:
        where = f"with environment.type {env_type}" if env_type else "with no environment"
        hint = (
            f"Kaniko pods in {env_type} read the context from there; "
            f"write e.g. {_STORE_EXAMPLES[allowed[0]]}."
            if env_type
            else "Pick a local directory (file://) or a bucket the builders can reach."
        )
        problems.add(key, _show(url), f"{expected} ({where})", hint)
    elif flaw:
        problems.add(key, _show(url), flaw, f"Correct the URL to that form, e.g. "
                     f"{_STORE_EXAMPLES[kind]}.")


def _kaniko_section(value: Any, path: str, problems: _Problems) -> Mapping[str, Any]:
    """One level of the Job spec; anything but a mapping is reported and read as empty."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.add(path, _show(value), "a mapping",
                     "kaniko-config is a Kubernetes Job spec: metadata, spec, spec.template, "
                     "spec.template.spec ...")
        return {}
    return value


def _check_kaniko_config(spec: Mapping[str, Any], problems: _Problems) -> None:
    # The same rules the kaniko dispatcher applies when it renders the Job; checked here
    # too, so `buildq build` and `config check` refuse the config before anything is queued.
    base = "builder.kaniko-config"
    _kaniko_section(spec.get("metadata"), f"{base}.metadata", problems)
    job = _kaniko_section(spec.get("spec"), f"{base}.spec", problems)
    pod = _kaniko_section(job.get("template"), f"{base}.spec.template", problems)
    pod_spec = _kaniko_section(pod.get("spec"), f"{base}.spec.template.spec", problems)
    restart = pod_spec.get("restartPolicy", "Never")
    if restart != "Never":
        problems.add(f"{base}.spec.template.spec.restartPolicy", _show(restart), "Never",
                     "A restarted kaniko would build on a dirty filesystem; remove the key.")
    containers = pod_spec.get("containers") or []
    where = f"{base}.spec.template.spec.containers"
    if not isinstance(containers, list):
        problems.add(where, _show(containers), "a list of containers",
                     "Start each container with '- args: [...]'.")
        return
    if len(containers) > 1:
        problems.add(where, f"{len(containers)} containers", "exactly one container",
                     "The kaniko Job runs one container: keep a single entry (its args, env, "
                     "resources and volumeMounts are merged into it); sidecars are not "
                     "supported.")
    for i, container in enumerate(containers):
        if not isinstance(container, Mapping):
            problems.add(f"{where}[{i}]", _show(container), "a mapping",
                         "Write the container as 'name: ..., args: [...]'.")
            continue
        _check_kaniko_args(container.get("args"), f"{where}[{i}].args", problems)


def _check_kaniko_args(args: Any, path: str, problems: _Problems) -> None:
    if args is None:
        return
    if not isinstance(args, list):
        problems.add(path, _show(args), "a list of strings", "Write args as a YAML list.")
        return
    for j, arg in enumerate(args):
        flag = arg.split("=", 1)[0] if isinstance(arg, str) else ""
        if not isinstance(arg, str) or not arg.startswith("--"):
            problems.add(f"{path}[{j}]", _show(arg), 'a flag written "--key=value"',
                         'Quote each flag, e.g. "--cache=false".')
        elif flag in _RESERVED_KANIKO_FLAGS:
            problems.add(f"{path}[{j}]", _show(arg),
                         f"no {flag} flag (buildq sets it for each build)",
                         f"Remove {flag}; set builder.destination or "
                         "builder.build-context-store instead.")
        elif "=" not in arg and flag not in KANIKO_BOOLEAN_FLAGS:
            # "--verbosity", "debug" as two items would pass "debug" as a positional argument.
            problems.add(f"{path}[{j}]", _show(arg), f'"{flag}=<value>" (only boolean flags '
                         "may be written bare)", f'Write it as "{flag}=<value>" in one list item.')


def _check_builder(
    builder: BuilderConfig, env: Environment | None, problems: _Problems,
    destination_given: bool = False,
) -> ImageRef | None:
    dest: ImageRef | None = None
    for key, text in (("builder.destination", builder.destination), ("builder.uri", builder.uri)):
        if text is None:
            continue
        try:
            ref = parse_destination(text, key)
        except ConfigError as exc:
            problems.add_error(exc)
            continue
        _check_destination(key, ref, env, problems)
        if dest is not None and ref.name != dest.name:
            problems.add(
                "builder.uri",
                _show(text),
                f"the same repository as builder.destination ({dest.name}) or nothing",
                "Keep only builder.destination.",
            )
        dest = dest or ref
    if builder.type == "kaniko":
        if not builder.destination and not builder.uri and not destination_given:
            problems.add(
                "builder.destination",
                "nothing",
                "a registry repository for kaniko to push to",
                "Add 'destination: <registry>/<repository>' under builder.",
            )
        if not builder.build_context_store:
            problems.add(
                "builder.build-context-store",
                "nothing",
                "a store kaniko pods can read, such as "
                + " or ".join(_STORE_EXAMPLES[k] for k in _STORES_FOR[env.type if env else None]),
                "Add 'build-context-store: <url>' under builder.",
            )
    if builder.build_context_store is not None:
        _check_store(builder.build_context_store, env, problems)
    if builder.kaniko_image is not None:
        try:
            parse_image_ref(builder.kaniko_image)
        except ConfigError as exc:
            problems.add(
                "builder.kaniko-image",
                _show(builder.kaniko_image),
                "an image reference like ghcr.io/osscontainertools/kaniko:<version>",
                exc.hint or "",
            )
    if builder.cache_repo is not None:
        try:
            cache = parse_destination(builder.cache_repo, "builder.cache-repo")
        except ConfigError as exc:
            problems.add_error(exc)
        else:
            if dest is not None and cache.name == dest.name:
                problems.add(
                    "builder.cache-repo",
                    _show(builder.cache_repo),
                    "a repository other than the destination",
                    f"Use e.g. {dest.name}-cache so cache layers stay out of the image repository.",
                )
    if builder.platform is not None and not _PLATFORM_RE.match(builder.platform):
        problems.add(
            "builder.platform",
            _show(builder.platform),
            "one platform written os/arch[/variant], like linux/amd64",
            "Name a single target platform.",
        )
    name = builder.build_job_name
    if not _DNS_LABEL_RE.match(name) or len(name) > MAX_BUILD_JOB_NAME:
        problems.add(
            "builder.build-job-name",
            _show(name),
            f"lowercase letters, digits and '-', at most {MAX_BUILD_JOB_NAME} characters",
            "Kubernetes job names are DNS labels; buildq appends a per-build suffix.",
        )
    if builder.secret_key and not builder.secret_name:
        problems.add(
            "builder.secret-name",
            "nothing",
            "the Kubernetes secret that holds builder.secret-key",
            "Add 'secret-name: <secret>' under builder, or remove secret-key.",
        )
    if builder.kaniko_config is not None:
        _check_kaniko_config(builder.kaniko_config, problems)
    _check_generated_dockerfile(builder, problems)
    for key, value in (
        ("builder.secret-name", builder.secret_name),
        ("builder.secret-key", builder.secret_key),
    ):
        if value == "":
            problems.add(key, "an empty string", "a name", f"Fill in {key} or remove it.")
    return dest


def _check_base_image(key: str, image: str, problems: _Problems) -> None:
    # "{python}" stands for a version; check the reference as it will be written.
    try:
        parse_image_ref(image.replace("{python}", "3.12"))
    except ConfigError as exc:
        problems.add(key, _show(image), "an image reference like python:{python}-slim",
                     exc.hint or "")


def _index_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be written into a generated Dockerfile, or None."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a malformed port
    except ValueError:
        return "not a URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "not an http(s):// URL"
    if parts.username is not None or parts.password is not None:
        return "credentials"
    return None


def _check_generated_dockerfile(builder: BuilderConfig, problems: _Problems) -> None:
    """Keys used only when buildq writes the Dockerfile of a project that has none."""
    if builder.base_image is not None:
        _check_base_image("builder.base-image", builder.base_image, problems)
    if builder.accelerator is not None and builder.accelerator.base_image is not None:
        _check_base_image("builder.accelerator.base-image", builder.accelerator.base_image,
                          problems)
    if builder.entrypoint is not None:
        entry = builder.entrypoint
        try:
            argv = shlex.split(entry) if isinstance(entry, str) else list(entry)
        except ValueError as exc:
            argv = []
            problems.add("builder.entrypoint", _show(entry), "a command line that splits into "
                         f"arguments ({exc})", "Balance its quotes.")
        if not argv or not argv[0]:
            problems.add("builder.entrypoint", _show(entry), "a command such as 'python train.py'",
                         "Give the command the image runs, or remove the key.")
    pip = builder.pip
    if pip is None:
        return
    urls = [("builder.pip.index-url", pip.index_url)] + [
        (f"builder.pip.extra-index-urls[{i}]", u) for i, u in enumerate(pip.extra_index_urls or [])
    ]
    for key, url in urls:
        if url is None:
            continue
        flaw = _index_url_problem(url)
        if flaw == "credentials":
            # Never echo the value: it holds a password or token.
            problems.add(key, "a URL with credentials in it", "an index URL without user:password@",
                         "A generated Dockerfile ends up in the image's history, so buildq will "
                         "not write credentials into it: use an index that the build hosts reach "
                         "without them, put the wheels in the project (builder.pip.wheels), or "
                         "write your own Dockerfile with a build secret.")
        elif flaw:
            # A URL with an '@' may hold a secret even when it does not parse: not shown.
            found = "a URL with '@' in it" if "@" in url else _show(url)
            problems.add(key, found, "an http(s):// index URL such as "
                         "https://pypi.example.com/simple", "Correct the URL.")
    if pip.wheels is not None:
        parts = [p for p in pip.wheels.replace("\\", "/").split("/") if p not in ("", ".")]
        if pip.wheels.startswith("/") or ".." in parts or not parts:
            problems.add("builder.pip.wheels", _show(pip.wheels),
                         "a directory inside the project, e.g. wheels",
                         "The build only sees the project: give the path relative to its root.")


def _check_legacy(
    registry: LegacyRegistry,
    builder: BuilderConfig,
    env: Environment | None,
    problems: _Problems,
    warnings: list[str],
) -> None:
    if builder.destination or builder.uri:
        warnings.append(
            "registry is ignored because builder.destination is set; remove the registry block."
        )
        return
    if registry.type == "local":
        warnings.append(
            "registry.type local is deprecated: images stay in the local docker; "
            "remove the registry block."
        )
        return
    text = legacy_destination(registry, env)
    if text is None:
        examples = {
            "ecr": "<account-id>.dkr.ecr.<region>.amazonaws.com/<repository>",
            "gcr": "<region>-docker.pkg.dev/<project-id>/<repository>/<image-name>",
            "acr": "https://<registry-name>.azurecr.io/<repository>",
        }
        problems.add(
            "registry.uri",
            "nothing",
            f"the repository URI {examples[registry.type]}",
            f"Replace the registry block with builder.destination: {examples[registry.type]}.",
        )
        return
    try:
        ref = parse_destination(text, "registry.uri")
    except ConfigError as exc:
        problems.add_error(exc)
        return
    kind = classify_registry(ref).kind
    expected_kind = {"ecr": "ecr", "gcr": "gar", "acr": "acr"}[registry.type]
    if kind != expected_kind and ecr_host_typo(ref) is None:
        problems.add(
            "registry.uri",
            _show(text),
            f"a repository URI of type {registry.type}, as registry.type says",
            "Correct registry.type or registry.uri, or move to builder.destination.",
        )
        return
    _check_destination("registry.uri", ref, env, problems)
    warnings.append(
        f"registry is deprecated: write 'builder: destination: {ref.name}' instead "
        "and remove the registry block."
    )


def config_from_mapping(data: Mapping[str, Any], origin: str = "<inline>", *,
                        destination_given: bool = False) -> LaunchConfig:
    """Validate an already parsed config; every problem is reported in one ConfigError.

    ``destination_given`` as for :func:`load_config`.
    """
    if data is None:
        return LaunchConfig(origin=origin)
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{origin}: (top level): found {_show(data)}, expected a mapping of keys "
            "(environment, builder, ...).",
            "A launch config starts with keys such as 'builder:' at the left margin.",
        )
    data = _unwrap_helm_values(data)
    problems = _Problems()
    warnings: list[str] = []
    sections: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTIONS:
            kept = _validate_section(key, value, problems, warnings)
            if kept is not None:
                sections[key] = kept
        elif key in AGENT_KEYS:
            # The agent's own settings; values (api_key above all) are never read.
            continue
        else:
            problems.add(
                str(key),
                "an unknown top-level key",
                "environment, builder, registry or a W&B agent key",
                _suggest(str(key), [*_SECTIONS, *sorted(AGENT_KEYS)]),
            )
    env = Environment.model_validate(sections["environment"]) if "environment" in sections else None
    builder = BuilderConfig.model_validate(sections.get("builder", {}))
    if env is not None:
        _check_environment(env, problems)
    if "builder" in sections or "builder" not in data:
        _check_builder(builder, env, problems, destination_given)
    if "registry" in sections:
        _check_legacy(
            LegacyRegistry.model_validate(sections["registry"]), builder, env, problems, warnings
        )
    problems.raise_if_any(origin)
    return LaunchConfig.model_validate({**sections, "origin": origin, "warnings": tuple(warnings)})
