"""The Kaniko Job manifest: a :class:`KanikoRequest` rendered as a batch/v1 Job.

Our defaults are deep-merged with ``builder.kaniko-config`` (the launch agent's "Job
spec merged into ours"), and credentials are wired per environment as references to
Secrets only. Nothing here talks to the API server; :mod:`.follower` and
:mod:`.dispatcher` run what this renders.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from config.errors import ConfigError
from config.kaniko_flags import REPEATABLE_FLAGS, RESERVED_FLAGS, parse_arg
from config.names import (
    HASH_LABEL,
    MAX_DNS_LABEL,
    classify_store_url,
    is_dns_label,
    is_loopback_host,
    platform_fields,
)
from config.references import ImageRef, classify_registry, parse_destination
from config.schema import LaunchConfig
from config.settings import Settings
from workers.context import BuildInputs
from workers.kube import in_cluster_namespace, in_cluster_service_account

#: The kaniko executor image used when neither ``builder.kaniko-image`` nor the
#: kaniko-config container names one. Upstream GoogleContainerTools/kaniko was archived
#: in June 2025 (last release v1.24.0); this is a pinned release of the maintained
#: fork, so a build never changes under us when the fork publishes a new tag.
DEFAULT_KANIKO_IMAGE = "ghcr.io/osscontainertools/kaniko:v1.28.2"
#: Seconds a Job may run when kaniko-config sets no ``spec.activeDeadlineSeconds``.
DEFAULT_ACTIVE_DEADLINE = 1800
#: Seconds a finished Job lingers before Kubernetes deletes it, if we could not.
TTL_AFTER_FINISHED = 600
#: Name of our container in the pod (a kaniko-config container may rename it).
CONTAINER_NAME = "kaniko"
#: Where the kaniko image looks for its docker config.json.
DOCKER_CONFIG_DIR = "/kaniko/.docker"
#: Where a Google service-account key Secret is mounted.
GCP_SECRET_DIR = "/secret"
#: The Secret (and key) holding the Azure storage key when the config names none.
AZURE_KEY_SECRET = ("azure-storage-access-key", "AZURE_STORAGE_ACCESS_KEY")
#: Annotation keys put on Jobs and pods (the source hash goes under ``HASH_LABEL``).
IMAGE_ANNOTATION = "buildq/image"
DOCKER_CONFIG_ANNOTATION = "buildq/docker-config"
MANAGED_LABELS = {"app.kubernetes.io/name": "kaniko", "app.kubernetes.io/managed-by": "buildq"}
#: The well-known node labels a platform's Job selects its node by (the kubelet sets
#: them from Go's GOOS and GOARCH, which the OCI platform fields use too).
ARCH_LABEL = "kubernetes.io/arch"
OS_LABEL = "kubernetes.io/os"
#: Characters of the source hash in the Job's label value (a label value stops at 63).
LABEL_HASH_CHARS = 24
#: Fewest hex digits of the source hash in a Job name: 64 bits keep names unique.
MIN_HASH_CHARS = 16


@dataclass(frozen=True)
class KanikoRequest:
    """One build for a Kaniko Job; the context is already in the store."""

    #: Where the image is pushed, tag included (the tag is the source hash's prefix).
    image: ImageRef
    #: Where kaniko reads the ``.tar.gz`` context (s3://, gs://, https://...blob..., file://).
    context_uri: str
    source_hash: str
    #: What besides the files changes the image. Secret build args are names only: kaniko
    #: reads each value from the Job's env, which takes it from the Kubernetes Secret named
    #: by BUILDQ_BUILD_SECRETS_SECRET (key = name).
    inputs: BuildInputs

    def __post_init__(self) -> None:
        # Kaniko would push an untagged destination as :latest, which no record points at.
        if not self.image.tag or self.image.digest:
            raise ValueError(f"KanikoRequest.image must be tagged and carry no digest: {self.image}")

    @property
    def labels(self) -> dict[str, str]:
        """Image labels (``--label``): every image names the source hash it was built from."""
        return {HASH_LABEL: self.source_hash}


# --------------------------------------------------------------------------- arguments


def merge_args(defaults: Iterable[tuple[str, str]], user: Iterable[str],
               where: str = "kaniko-config") -> list[str]:
    """Our args with the user's: a user flag replaces ours, repeatable flags accumulate."""
    merged: list[tuple[str, str]] = list(defaults)
    for raw in user:
        key, value = parse_arg(raw, where)
        if key in RESERVED_FLAGS:
            raise ConfigError(f"{where}: {key} is set by buildq for each build.",
                              f"Remove {raw!r} from the container args.")
        if key in REPEATABLE_FLAGS:
            if (key, value) not in merged:
                merged.append((key, value))
            continue
        positions = [i for i, (k, _) in enumerate(merged) if k == key]
        if positions:
            # Keep our flag's place so the rendered args read in a stable order.
            merged[positions[0]] = (key, value)
            for i in reversed(positions[1:]):
                del merged[i]
        else:
            merged.append((key, value))
    return [f"{k}={v}" for k, v in merged]


# --------------------------------------------------------------------------- merging


#: Lists in a pod spec merged item by item on this key (the user's item wins); other
#: lists given by the user replace ours, except tolerations, which add up.
_LIST_KEYS = {"env": "name", "volumes": "name", "volumeMounts": "mountPath",
              "imagePullSecrets": "name", "ports": "containerPort", "envFrom": None,
              "tolerations": None}


def deep_merge(base: Any, override: Any, key: str = "") -> Any:
    """``override`` merged into ``base``: mappings recursively, named lists by name."""
    if isinstance(base, Mapping) and isinstance(override, Mapping):
        out = dict(base)
        for k, v in override.items():
            out[k] = deep_merge(base[k], v, k) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(override, list) and key in _LIST_KEYS:
        ident = _LIST_KEYS[key]
        if ident is None:
            return [*base, *(v for v in override if v not in base)]
        out_list = list(base)
        for item in override:
            name = item.get(ident) if isinstance(item, Mapping) else None
            at = next((i for i, b in enumerate(out_list)
                       if isinstance(b, Mapping) and name is not None and b.get(ident) == name), None)
            if at is None:
                out_list.append(copy.deepcopy(item))
            else:
                out_list[at] = deep_merge(out_list[at], item)
        return out_list
    return copy.deepcopy(override)


# --------------------------------------------------------------------------- naming


def job_name(cfg: LaunchConfig, source_hash: str) -> str:
    """``<build-job-name>-<hash prefix>``: a DNS-1123 label of at most 63 characters."""
    base = cfg.builder.build_job_name.strip("-")[: MAX_DNS_LABEL - 1 - MIN_HASH_CHARS].rstrip("-")
    room = MAX_DNS_LABEL - len(base) - 1
    name = f"{base}-{source_hash[:min(room, 24)]}".lower()
    if not is_dns_label(name):
        raise ConfigError(f"builder.build-job-name {cfg.builder.build_job_name!r} does not make a "
                          "valid Kubernetes Job name.",
                          "Use lowercase letters, digits and '-', starting with a letter or digit.")
    return name


def _config_namespace(cfg: LaunchConfig) -> str | None:
    metadata = (cfg.builder.kaniko_config or {}).get("metadata")
    if isinstance(metadata, Mapping):
        ns = metadata.get("namespace")
        if isinstance(ns, str) and ns:
            return ns
    return None


def resolve_namespace(cfg: LaunchConfig, settings: Settings) -> str:
    """kaniko-config's ``metadata.namespace``, else this pod's namespace, else the setting."""
    return _config_namespace(cfg) or in_cluster_namespace() or settings.kube_namespace


def _config_service_account(cfg: LaunchConfig) -> str | None:
    spec = (cfg.builder.kaniko_config or {}).get("spec")
    template = spec.get("template") if isinstance(spec, Mapping) else None
    pod = template.get("spec") if isinstance(template, Mapping) else None
    name = pod.get("serviceAccountName") if isinstance(pod, Mapping) else None
    return name if isinstance(name, str) and name else None


def resolve_service_account(cfg: LaunchConfig, namespace: str) -> str | None:
    """The ServiceAccount the Job's pod runs as: kaniko-config's ``serviceAccountName``,
    else the pool's own account when the Job is in the pool's namespace (where that
    account exists), else None: the namespace's ``default``.

    The README tells operators to give the pool's account the cloud role (IRSA, GKE or
    Azure workload identity) kaniko pushes and reads the context with; without a name the
    pod would run as ``default``, which has none of it.
    """
    named = _config_service_account(cfg)
    if named:
        return named
    if in_cluster_namespace() == namespace:
        return in_cluster_service_account()
    return None


# --------------------------------------------------------------------------- credentials


@dataclass
class _Wiring:
    env: list[dict[str, Any]] = field(default_factory=list)
    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


#: The docker credential helper kaniko uses for each cloud registry.
_CRED_HELPERS = {"ecr": "ecr-login", "gar": "gcr", "acr": "acr-env"}


def _credentials(request: KanikoRequest, cfg: LaunchConfig, settings: Settings) -> _Wiring:
    """Env, volumes and annotations that let kaniko read the context and push.

    Only references to Secrets ever go in: a credHelpers config holds no secret, so it
    travels as a pod annotation projected into config.json by a downwardAPI volume
    (no ConfigMap to create or leave behind); tokens come from Secrets the operator made.
    """
    wiring = _Wiring()
    env_type = cfg.environment.type if cfg.environment else None
    builder = cfg.builder
    dest = request.image
    kind = classify_registry(dest).kind
    store, _ = classify_store_url(request.context_uri)

    region = cfg.environment.region if env_type == "aws" and cfg.environment else None
    if store == "s3":
        # Kaniko's S3 client signs for a region and has no default, endpoint or not.
        region = region or settings.s3_region
    if region:
        wiring.env.append({"name": "AWS_REGION", "value": region})
    if store == "s3" and settings.s3_endpoint_url:
        wiring.env += [{"name": "S3_ENDPOINT", "value": settings.s3_endpoint_url},
                       {"name": "S3_FORCE_PATH_STYLE", "value": "true"}]
    if store == "gs" and settings.gcs_endpoint_url:
        # kaniko's Go storage client honours the same emulator variable as ours.
        wiring.env.append({"name": "STORAGE_EMULATOR_HOST", "value": settings.gcs_endpoint_url})
    if store == "azure":
        secret, key = ((builder.secret_name, builder.secret_key or AZURE_KEY_SECRET[1])
                       if env_type == "azure" and builder.secret_name else AZURE_KEY_SECRET)
        wiring.env.append({"name": "AZURE_STORAGE_ACCESS_KEY",
                           "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
        # No endpoint override goes in: kaniko reaches the account by the context URL's
        # host and has none (BUILDQ_AZURE_BLOB_ENDPOINT is the workers' own, for Azurite).
    if store == "file":
        # The worker wrote the object to its own directory: the pod reads it through the
        # node's filesystem, which works where that directory is the node's too (a
        # single-node cluster, or a shared filesystem mounted at the same path on every
        # node). Read-only: kaniko only unpacks it.
        directory = posixpath.dirname(file_store_path(request.context_uri))
        wiring.volumes.append({"name": "context-store",
                               "hostPath": {"path": directory, "type": "Directory"}})
        wiring.mounts.append({"name": "context-store", "mountPath": directory, "readOnly": True})
    if env_type == "azure":
        # ACR's credential helper (acr-env) reads the federated token workload identity
        # injects. Kaniko's Blob context reader does not: it knows the shared key only.
        wiring.labels["azure.workload.identity/use"] = "true"
    if env_type == "gcp" and builder.secret_name:
        key_file = builder.secret_key or "key.json"
        wiring.volumes.append({"name": "gcp-credentials",
                               "secret": {"secretName": builder.secret_name}})
        wiring.mounts.append({"name": "gcp-credentials", "mountPath": GCP_SECRET_DIR,
                              "readOnly": True})
        wiring.env.append({"name": "GOOGLE_APPLICATION_CREDENTIALS",
                           "value": f"{GCP_SECRET_DIR}/{key_file}"})

    helper = _CRED_HELPERS.get(kind)
    if helper:
        # Keyed on the host kaniko pushes to, which an endpoint mapping may change.
        pushed_host = settings.registry_endpoints.get(dest.registry, dest.registry)
        wiring.annotations[DOCKER_CONFIG_ANNOTATION] = json.dumps(
            {"credHelpers": {pushed_host: helper}}, sort_keys=True)
        wiring.volumes.append({"name": "docker-config", "downwardAPI": {"items": [{
            "path": "config.json",
            "fieldRef": {"fieldPath": f"metadata.annotations['{DOCKER_CONFIG_ANNOTATION}']"},
        }]}})
        wiring.mounts.append({"name": "docker-config", "mountPath": DOCKER_CONFIG_DIR,
                              "readOnly": True})
    elif builder.secret_name and env_type != "gcp":
        # Any other registry: a kubernetes.io/dockerconfigjson Secret the operator created.
        wiring.volumes.append({"name": "docker-config", "secret": {
            "secretName": builder.secret_name,
            "items": [{"key": builder.secret_key or ".dockerconfigjson", "path": "config.json"}],
        }})
        wiring.mounts.append({"name": "docker-config", "mountPath": DOCKER_CONFIG_DIR,
                              "readOnly": True})
    return wiring


# --------------------------------------------------------------------------- the manifest


def kaniko_context(uri: str) -> str:
    """The ``--context`` kaniko reads: a ``file://`` object is a ``tar://`` path (the pod
    sees the store's directory through a hostPath volume, see :func:`_credentials`)."""
    if classify_store_url(uri)[0] == "file":
        return f"tar://{file_store_path(uri)}"
    return uri


def file_store_path(uri: str) -> str:
    """The local path a ``file://`` store URL names."""
    return unquote(urlsplit(uri).path)


def reached_as(ref: ImageRef, settings: Settings) -> str:
    """``ref`` named after the endpoint its registry is really reached at.

    Kaniko pushes to the host a ``--destination`` names, like the engine does, so a
    registry mapped by ``Settings.registry_endpoints`` (BUILDQ_REGISTRY_ENDPOINTS) is
    written with its endpoint; the record keeps the name the user configured.
    """
    endpoint = settings.registry_endpoints.get(ref.registry)
    return str(dataclasses.replace(ref, registry=endpoint) if endpoint else ref)


def cache_repo(request: KanikoRequest, cfg: LaunchConfig) -> ImageRef:
    """Where kaniko caches layers: ``builder.cache-repo``, else ``<destination>-cache``."""
    dest = request.image
    repo = (parse_destination(cfg.builder.cache_repo, "builder.cache-repo")
            if cfg.builder.cache_repo
            else ImageRef(dest.registry, f"{dest.repository}-cache"))
    if repo.name == dest.name:
        raise ConfigError(f"builder.cache-repo {repo.name!r} is the destination repository.",
                          f"Use e.g. {dest.name}-cache so cache layers stay out of the image "
                          "repository.")
    return ImageRef(repo.registry, repo.repository)


def default_args(request: KanikoRequest, cfg: LaunchConfig,
                 settings: Settings) -> list[tuple[str, str]]:
    inputs = request.inputs
    args: list[tuple[str, str]] = [
        ("--context", kaniko_context(request.context_uri)),
        ("--dockerfile", inputs.dockerfile),
        ("--destination", reached_as(request.image, settings)),
        ("--cache", "true"),
        ("--cache-repo", reached_as(cache_repo(request, cfg), settings)),
        ("--snapshot-mode", "redo"),
        ("--compressed-caching", "false"),
        # The digest lands in the pod status, where the dispatcher reads it.
        ("--digest-file", "/dev/termination-log"),
    ]
    args += [("--build-arg", f"{k}={v}") for k, v in sorted(inputs.build_args)]
    # A value-less --build-arg makes kaniko take the value from its environment.
    args += [("--build-arg", name) for name in inputs.secrets]
    if inputs.target:
        args.append(("--target", inputs.target))
    if inputs.platform:
        args.append(("--custom-platform", inputs.platform))
    args += [("--label", f"{k}={v}") for k, v in sorted(request.labels.items())]
    registry = request.image.registry
    endpoint = settings.registry_endpoints.get(registry)
    for host in dict.fromkeys(h for h in (registry, endpoint) if h):
        if is_loopback_host(host) or host in settings.insecure_registries:
            args.append(("--insecure-registry", host))
    for host, mapped in sorted(settings.registry_endpoints.items()):
        # Base images named after a mapped registry are pulled from its endpoint too.
        args.append(("--registry-map", f"{host}={mapped}"))
    return args


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"builder.kaniko-config.{where} is not a mapping.",
                          "kaniko-config is a Kubernetes Job spec: metadata, spec, spec.template...")
    return dict(value)


def _user_container(spec: Mapping[str, Any]) -> dict[str, Any]:
    containers = spec.get("containers") or []
    if not isinstance(containers, list):
        raise ConfigError("builder.kaniko-config.spec.template.spec.containers is not a list.",
                          "Give at most one container, as a list item.")
    if len(containers) > 1:
        raise ConfigError(
            f"builder.kaniko-config.spec.template.spec.containers has {len(containers)} "
            "containers; the kaniko Job runs exactly one.",
            "Keep a single container entry (its args, env, resources, volumeMounts are merged "
            "into the kaniko container); sidecars are not supported.")
    if containers and not isinstance(containers[0], Mapping):
        raise ConfigError("builder.kaniko-config.spec.template.spec.containers[0] is not a mapping.",
                          "Write the container as 'name: ..., args: [...]'.")
    return dict(containers[0]) if containers else {}


def _secret_env(request: KanikoRequest, settings: Settings,
                taken: set[str]) -> list[dict[str, Any]]:
    """Env entries that hand kaniko each secret build arg by reference, never by value."""
    clash = sorted(taken.intersection(request.inputs.secrets))
    if clash:
        raise ConfigError(f"secret build arg {clash[0]} has the name of an environment variable "
                          "the kaniko container needs.", "Rename the ARG and the secret.")
    return [{"name": name, "valueFrom": {"secretKeyRef": {
        "name": settings.build_secrets_secret, "key": name}}} for name in request.inputs.secrets]


def platform_node_selector(platform: str | None) -> dict[str, str]:
    """The node selector of a build for ``platform``: a node of its OS and architecture.

    Kaniko builds the ``--custom-platform`` it is given, but its ``RUN`` steps run the base
    image's binaries on the node's CPU; on a node of the platform's architecture they run
    natively (the variant is not a node label: ``linux/arm/v7`` selects ``arm`` nodes).
    """
    if not platform:
        return {}
    fields = platform_fields(platform)
    return {OS_LABEL: fields["os"], ARCH_LABEL: fields["architecture"]}


def _node_selector(pod_spec: dict[str, Any]) -> None:
    """Drop the node selector keys kaniko-config set to null (our default for the key is
    unwanted, say on nodes that run other architectures through QEMU), and an empty one."""
    selector = pod_spec.get("nodeSelector")
    if selector is None:
        pod_spec.pop("nodeSelector", None)
        return
    if not isinstance(selector, Mapping):
        raise ConfigError("builder.kaniko-config.spec.template.spec.nodeSelector is not a mapping.",
                          "Write it as label: value pairs (a null value drops buildq's own "
                          "selector for that label).")
    kept = {k: v for k, v in selector.items() if v is not None}
    bad = sorted(str(k) for k, v in kept.items() if not isinstance(v, str))
    if bad:
        raise ConfigError(f"builder.kaniko-config nodeSelector {bad[0]!r} is not a string.",
                          "Quote label values (\"true\", \"1\"); null drops buildq's own "
                          "selector for that label.")
    if kept:
        pod_spec["nodeSelector"] = kept
    else:
        pod_spec.pop("nodeSelector", None)


def render_job(request: KanikoRequest, cfg: LaunchConfig, settings: Settings,
               namespace: str | None = None) -> dict[str, Any]:
    """The batch/v1 Job manifest that builds and pushes ``request``."""
    namespace = namespace or resolve_namespace(cfg, settings)
    name = job_name(cfg, request.source_hash)
    user: dict[str, Any] = copy.deepcopy(dict(cfg.builder.kaniko_config or {}))
    user_meta = _mapping(user.pop("metadata", None), "metadata")
    user_spec = _mapping(user.pop("spec", None), "spec")
    user_template = _mapping(user_spec.pop("template", None), "spec.template")
    user_pod = _mapping(user_template.pop("spec", None), "spec.template.spec")
    user_container = _user_container(user_pod)
    user_pod.pop("containers", None)

    wiring = _credentials(request, cfg, settings)
    wiring.env += _secret_env(request, settings, {item["name"] for item in wiring.env})
    # Label values stop at 63 characters: the label holds the tag, the annotation the hash.
    labels = {**MANAGED_LABELS, HASH_LABEL: request.source_hash[:LABEL_HASH_CHARS]}
    annotations = {HASH_LABEL: request.source_hash, IMAGE_ANNOTATION: str(request.image)}

    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": cfg.builder.kaniko_image or DEFAULT_KANIKO_IMAGE,
        "args": [],
        "env": wiring.env,
        "volumeMounts": wiring.mounts,
        # A failing build has no digest file: show its last lines in the status instead.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    user_args = user_container.pop("args", None) or []
    if not isinstance(user_args, list):
        raise ConfigError("builder.kaniko-config container args is not a list.",
                          "Write args as a YAML list of \"--key=value\" strings.")
    container = deep_merge(container, user_container)
    container["args"] = merge_args(default_args(request, cfg, settings), user_args)
    for key in ("env", "volumeMounts"):
        if not container.get(key):
            container.pop(key, None)

    restart = user_pod.get("restartPolicy", "Never")
    if restart != "Never":
        raise ConfigError(
            f"builder.kaniko-config.spec.template.spec.restartPolicy is {restart!r}.",
            "Kaniko Jobs must use restartPolicy: Never (a restarted kaniko would build on a "
            "dirty filesystem); remove the key.")
    pod_spec: dict[str, Any] = {"restartPolicy": "Never", "volumes": wiring.volumes}
    selector = platform_node_selector(request.inputs.platform)
    if selector:
        # A label kaniko-config's nodeSelector names is theirs (deep_merge: theirs wins).
        pod_spec["nodeSelector"] = selector
    account = resolve_service_account(cfg, namespace)
    if account:
        pod_spec["serviceAccountName"] = account
    pod_spec = deep_merge(pod_spec, user_pod)
    _node_selector(pod_spec)
    pod_spec["containers"] = [container]
    if not pod_spec.get("volumes"):
        pod_spec.pop("volumes", None)

    template_meta = deep_merge({"labels": {**labels, **wiring.labels},
                                "annotations": {**annotations, **wiring.annotations}},
                               user_template.get("metadata") or {})
    # Our labels last: the dispatcher finds its pods by them and the user may not drop them.
    template_meta["labels"].update(labels)
    template_meta["annotations"].update(wiring.annotations)

    spec: dict[str, Any] = {
        "backoffLimit": 0,
        "activeDeadlineSeconds": DEFAULT_ACTIVE_DEADLINE,
        "ttlSecondsAfterFinished": TTL_AFTER_FINISHED,
    }
    spec = deep_merge(spec, user_spec)
    spec["template"] = {"metadata": template_meta, "spec": pod_spec}

    metadata = deep_merge({"labels": labels, "annotations": annotations}, user_meta)
    metadata["name"] = name
    metadata["namespace"] = namespace
    metadata["labels"].update(labels)
    metadata.pop("resourceVersion", None)
    metadata.pop("uid", None)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec}
