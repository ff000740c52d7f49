"""The rules a launch-config must meet beyond its schema, each problem reported at once.

The schema checks shapes and types; these rules span keys (a destination in the
environment's region, a store the environment's builders can read) or know what a
builder will later refuse (kaniko's Job spec and flags), so ``buildq build`` and
``buildq config check`` refuse a config before anything is queued.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from config.errors import ConfigError
from config.kaniko_flags import NOT_A_FLAG_HINT, RESERVED_FLAGS, needs_value_hint, split_arg
from config.names import (
    PLATFORM_FORMS,
    STORE_EXAMPLES,
    StoreKind,
    classify_store_url,
    is_dns_label,
    split_platforms,
)
from config.problems import Problems, show
from config.references import (
    ImageRef,
    classify_registry,
    ecr_host_typo,
    parse_destination,
    parse_image_ref,
)
from config.schema import (
    BuilderConfig,
    Environment,
    LaunchConfig,
    LegacyRegistry,
    legacy_destination,
)

#: Room left in a Kubernetes name (a DNS label, at most MAX_DNS_LABEL characters) for the
#: per-build suffix.
MAX_BUILD_JOB_NAME = 40

_AWS_REGION_RE = re.compile(r"^[a-z]{2}(?:-[a-z]+)+-[0-9]+$")
_GCP_REGION_RE = re.compile(r"^[a-z]+(?:-[a-z]+)*[0-9]+$")
#: Artifact Registry multi-regions and the region prefixes they cover.
_GAR_MULTI_REGIONS = {"us": "us-", "europe": "europe-", "asia": "asia-"}
_GAR_REPOSITORY_FORM = "<region>-docker.pkg.dev/<project-id>/<repository>/<image-name>"
_EXTRA_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
#: The stores a builder in each environment can read; no environment allows any.
_STORES_FOR: dict[str | None, tuple[StoreKind, ...]] = {
    "aws": ("s3",),
    "gcp": ("gs",),
    "azure": ("azure",),
    None: ("file", "s3", "gs", "azure"),
}


def _readable_stores(env: Environment | None) -> str:
    """The store URLs a builder in ``env`` can read, for a message."""
    return " or ".join(STORE_EXAMPLES[k] for k in _STORES_FOR[env.type if env else None])


def _check_environment(env: Environment, problems: Problems) -> None:
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
                show(env.region),
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
                show(env.region),
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
    key: str, ref: ImageRef, env: Environment | None, problems: Problems
) -> None:
    fixed = ecr_host_typo(ref)
    if fixed:
        problems.add(
            key,
            show(ref.name),
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
                show(ref.name),
                _GAR_REPOSITORY_FORM,
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


def _check_store(url: str, env: Environment | None, problems: Problems) -> None:
    key = "builder.build-context-store"
    env_type = env.type if env else None
    allowed = _STORES_FOR[env_type]
    kind, flaw = classify_store_url(url)
    expected = _readable_stores(env)
    if kind is None or kind not in allowed:
        where = f"with environment.type {env_type}" if env_type else "with no environment"
        hint = (
            f"Kaniko pods in {env_type} read the context from there; "
            f"write e.g. {STORE_EXAMPLES[allowed[0]]}."
            if env_type
            else "Pick a local directory (file://) or a bucket the builders can reach."
        )
        problems.add(key, show(url), f"{expected} ({where})", hint)
    elif flaw:
        problems.add(key, show(url), flaw, f"Correct the URL to that form, e.g. "
                     f"{STORE_EXAMPLES[kind]}.")


def _kaniko_section(value: Any, path: str, problems: Problems) -> Mapping[str, Any]:
    """One level of the Job spec; anything but a mapping is reported and read as empty."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.add(path, show(value), "a mapping",
                     "kaniko-config is a Kubernetes Job spec: metadata, spec, spec.template, "
                     "spec.template.spec ...")
        return {}
    return value


def _check_kaniko_config(spec: Mapping[str, Any], problems: Problems) -> None:
    # The same rules the kaniko dispatcher applies when it renders the Job; checked here
    # too, so `buildq build` and `config check` refuse the config before anything is queued.
    base = "builder.kaniko-config"
    _kaniko_section(spec.get("metadata"), f"{base}.metadata", problems)
    job = _kaniko_section(spec.get("spec"), f"{base}.spec", problems)
    pod = _kaniko_section(job.get("template"), f"{base}.spec.template", problems)
    pod_spec = _kaniko_section(pod.get("spec"), f"{base}.spec.template.spec", problems)
    restart = pod_spec.get("restartPolicy", "Never")
    if restart != "Never":
        problems.add(f"{base}.spec.template.spec.restartPolicy", show(restart), "Never",
                     "A restarted kaniko would build on a dirty filesystem; remove the key.")
    _check_node_selector(pod_spec.get("nodeSelector"), f"{base}.spec.template.spec.nodeSelector",
                         problems)
    containers = pod_spec.get("containers") or []
    where = f"{base}.spec.template.spec.containers"
    if not isinstance(containers, list):
        problems.add(where, show(containers), "a list of containers",
                     "Start each container with '- args: [...]'.")
        return
    if len(containers) > 1:
        problems.add(where, f"{len(containers)} containers", "exactly one container",
                     "The kaniko Job runs one container: keep a single entry (its args, env, "
                     "resources and volumeMounts are merged into it); sidecars are not "
                     "supported.")
    for i, container in enumerate(containers):
        if not isinstance(container, Mapping):
            problems.add(f"{where}[{i}]", show(container), "a mapping",
                         "Write the container as 'name: ..., args: [...]'.")
            continue
        _check_kaniko_args(container.get("args"), f"{where}[{i}].args", problems)


def _check_node_selector(selector: Any, path: str, problems: Problems) -> None:
    # Merged over buildq's own kubernetes.io/{os,arch} selector of a platform's Job: a
    # label given here wins, and null drops ours (see workers/builders/kaniko/manifest.py).
    if selector is None:
        return
    if not isinstance(selector, Mapping):
        problems.add(path, show(selector), "a mapping of node labels to values",
                     "Write it as 'label: value' pairs.")
        return
    for label, value in selector.items():
        if value is not None and not isinstance(value, str):
            problems.add(f"{path}.{label}", show(value), "a string (or null)",
                         "Quote the value (\"true\", \"1\"); null drops buildq's own "
                         "selector for that label.")


def _check_kaniko_args(args: Any, path: str, problems: Problems) -> None:
    if args is None:
        return
    if not isinstance(args, list):
        problems.add(path, show(args), "a list of strings", "Write args as a YAML list.")
        return
    for j, arg in enumerate(args):
        split = split_arg(arg)
        if split is None:
            problems.add(f"{path}[{j}]", show(arg), 'a flag written "--key=value"',
                         NOT_A_FLAG_HINT)
            continue
        flag, value = split
        if flag in RESERVED_FLAGS:
            problems.add(f"{path}[{j}]", show(arg),
                         f"no {flag} flag (buildq sets it for each build)",
                         f"Remove {flag}; set builder.destination or "
                         "builder.build-context-store instead.")
        elif value is None:
            problems.add(f"{path}[{j}]", show(arg), f'"{flag}=<value>" (only boolean flags '
                         "may be written bare)", needs_value_hint(flag))


def _check_builder(
    builder: BuilderConfig, env: Environment | None, problems: Problems,
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
                show(text),
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
                f"a store kaniko pods can read, such as {_readable_stores(env)}",
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
                show(builder.kaniko_image),
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
                    show(builder.cache_repo),
                    "a repository other than the destination",
                    f"Use e.g. {dest.name}-cache so cache layers stay out of the image repository.",
                )
    if builder.platform is not None:
        _, why = split_platforms(builder.platform)
        if why is not None:
            problems.add(
                "builder.platform",
                show(builder.platform),
                f"a platform or a list of platforms, like linux/amd64 (this one {why})",
                PLATFORM_FORMS,
            )
    name = builder.build_job_name
    if not is_dns_label(name) or len(name) > MAX_BUILD_JOB_NAME:
        problems.add(
            "builder.build-job-name",
            show(name),
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


def _check_base_image(key: str, image: str, problems: Problems) -> None:
    # "{python}" stands for a version; check the reference as it will be written.
    try:
        parse_image_ref(image.replace("{python}", "3.12"))
    except ConfigError as exc:
        problems.add(key, show(image), "an image reference like python:{python}-slim",
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


def _check_generated_dockerfile(builder: BuilderConfig, problems: Problems) -> None:
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
            problems.add("builder.entrypoint", show(entry), "a command line that splits into "
                         f"arguments ({exc})", "Balance its quotes.")
        if not argv or not argv[0]:
            problems.add("builder.entrypoint", show(entry), "a command such as 'python train.py'",
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
            found = "a URL with '@' in it" if "@" in url else show(url)
            problems.add(key, found, "an http(s):// index URL such as "
                         "https://pypi.example.com/simple", "Correct the URL.")
    if pip.wheels is not None:
        parts = [p for p in pip.wheels.replace("\\", "/").split("/") if p not in ("", ".")]
        if pip.wheels.startswith("/") or ".." in parts or not parts:
            problems.add("builder.pip.wheels", show(pip.wheels),
                         "a directory inside the project, e.g. wheels",
                         "The build only sees the project: give the path relative to its root.")
    for extra in pip.extras or ():
        if not _EXTRA_NAME.match(extra):
            problems.add("builder.pip.extras", show(extra), "the name of an optional-dependency "
                         "group of the project, e.g. web", "Use the name as pyproject.toml spells it.")


def _check_legacy(
    registry: LegacyRegistry,
    builder: BuilderConfig,
    env: Environment | None,
    problems: Problems,
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
            "gcr": _GAR_REPOSITORY_FORM,
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
            show(text),
            f"a repository URI of type {registry.type}, as registry.type says",
            "Correct registry.type or registry.uri, or move to builder.destination.",
        )
        return
    _check_destination("registry.uri", ref, env, problems)
    warnings.append(
        f"registry is deprecated: write 'builder: destination: {ref.name}' instead "
        "and remove the registry block."
    )


#: Keys of the Secrets Kubernetes makes for registry logins (kubernetes.io/dockerconfigjson
#: and kubernetes.io/dockercfg): a registry login, never a storage account key.
_DOCKER_CONFIG_KEYS = (".dockerconfigjson", ".dockercfg")


def _check_azure_store_key(builder: BuilderConfig, env: Environment | None,
                           warnings: list[str]) -> None:
    # In azure, builder.secret-name/secret-key name the Secret the kaniko Job reads the
    # Blob Storage account key from (AZURE_STORAGE_ACCESS_KEY; ACR pushes go through the
    # workload identity). A registry-login Secret wired there is valid YAML and a valid
    # Job, and only fails inside kaniko, when it reads the context with a JSON document
    # as its account key.
    if not (env is not None and env.type == "azure" and builder.secret_name
            and builder.secret_key in _DOCKER_CONFIG_KEYS and builder.build_context_store
            and classify_store_url(builder.build_context_store)[0] == "azure"):
        return
    warnings.append(
        f"builder.secret-key is {builder.secret_key!r}, a registry login's key, but with "
        "environment.type azure and a Blob Storage context store the kaniko Job reads "
        "builder.secret-name/secret-key as the storage account key (AZURE_STORAGE_ACCESS_KEY) "
        "it fetches the context with. Point them at a Secret that holds the account key, e.g. "
        "`kubectl create secret generic azure-storage-key "
        "--from-literal=AZURE_STORAGE_ACCESS_KEY=<key>` with secret-name: azure-storage-key "
        "and secret-key: AZURE_STORAGE_ACCESS_KEY; ACR pushes need no Secret (workload identity)."
    )


def _check_kaniko_file_store(builder: BuilderConfig, warnings: list[str]) -> None:
    # A kaniko Job reads a file:// store through a hostPath volume of its directory
    # (workers/builders/kaniko/manifest.py): valid everywhere, working only where the
    # worker's directory is also the node's, and refused by a Pod Security baseline.
    if not (builder.type == "kaniko" and builder.build_context_store
            and classify_store_url(builder.build_context_store)[0] == "file"):
        return
    warnings.append(
        f"builder.build-context-store {builder.build_context_store!r} is a directory: kaniko "
        "Jobs read it through a hostPath volume, which works only where that directory is the "
        "node's own (a single-node cluster, or a filesystem shared at the same path on every "
        "node) and the namespace's Pod Security level allows hostPath. Use an s3://, gs:// or "
        "Azure Blob store otherwise."
    )


def check_config(
    config: LaunchConfig, problems: Problems, warnings: list[str], *, check_builder: bool = True,
    destination_given: bool = False,
) -> None:
    """Apply every rule to the sections of ``config`` that were read.

    ``check_builder`` False: the builder section was written but could not be read, so
    its rules would only judge the defaults. ``destination_given``: the request names
    its own destination, so a kaniko builder without one is complete.
    """
    env = config.environment
    if env is not None:
        _check_environment(env, problems)
    if check_builder:
        _check_builder(config.builder, env, problems, destination_given)
        _check_azure_store_key(config.builder, env, warnings)
        _check_kaniko_file_store(config.builder, warnings)
    if config.registry is not None:
        _check_legacy(config.registry, config.builder, env, problems, warnings)
