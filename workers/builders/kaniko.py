"""Kaniko builds as Kubernetes Jobs: the manifest, and a dispatcher that runs one to the end.

:func:`render_job` turns a :class:`KanikoRequest` into a batch/v1 Job: our defaults
deep-merged with ``builder.kaniko-config`` (the launch agent's "Job spec merged into
ours"), credentials wired per environment as references to Secrets only.
:class:`KanikoDispatcher` creates that Job (adopting it on 409), watches it and its
pod with the watch API, streams the pod's log into the build log, reads the digest
kaniko wrote to the termination message, and deletes the Job with its pods whatever
happens.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import queue
import re
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Any
from urllib.parse import unquote, urlsplit

from config.errors import BuildError, BuildqError, ConfigError, TransientError
from config.loader import KANIKO_BOOLEAN_FLAGS
from config.references import classify_registry, parse_destination, parse_image_ref
from config.schema import LaunchConfig
from config.settings import Settings
from workers.kube import (
    Kube,
    KubeApiError,
    KubeConflictError,
    KubeNotFoundError,
    KubeUnavailableError,
    in_cluster_namespace,
    new_api_client,
)

log = logging.getLogger("buildq.kaniko")

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
#: Job env carrying ``Settings.azure_blob_endpoint`` to a stand-in kubelet (see _credentials).
AZURE_ENDPOINT_ENV = "BUILDQ_AZURE_BLOB_ENDPOINT"
#: Label and annotation keys put on Jobs and pods.
HASH_LABEL = "buildq/source-hash"
IMAGE_ANNOTATION = "buildq/image"
DOCKER_CONFIG_ANNOTATION = "buildq/docker-config"
MANAGED_LABELS = {"app.kubernetes.io/name": "kaniko", "app.kubernetes.io/managed-by": "buildq"}
#: Kubernetes' limit on names of Jobs (a DNS-1123 label) and on label values.
MAX_NAME = 63
#: Fewest hex digits of the source hash in a Job name: 64 bits keep names unique.
MIN_HASH_CHARS = 16

#: Kaniko flags that may be given many times; every value is kept.
REPEATABLE_FLAGS = frozenset({
    "--build-arg", "--destination", "--label", "--annotation", "--registry-mirror",
    "--insecure-registry", "--skip-tls-verify-registry", "--ignore-path",
    "--registry-certificate", "--registry-client-cert", "--registry-map",
})
#: Kaniko's boolean flags (written bare they mean ``=true``): the config check's list.
BOOLEAN_FLAGS = KANIKO_BOOLEAN_FLAGS
#: Flags buildq must own: the build would read another context or lose its digest.
OWNED_FLAGS = ("--context", "--digest-file")
#: Pod waiting reasons after which the container will never start by itself. A first
#: ErrImagePull is not among them: the kubelet retries, and a blip should not fail a build.
FATAL_WAITING = frozenset({"ImagePullBackOff", "InvalidImageName",
                           "ErrImageNeverPull", "CreateContainerConfigError"})
#: Lines of the log kept for the error message of a failed build.
LOG_TAIL = 25
#: Seconds beyond the Job's deadline we wait for the API server to report it.
DEADLINE_GRACE = 60.0
#: Seconds one watch request stays open before it is renewed.
WATCH_SECONDS = 50

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9](?:[-a-z0-9]*[a-z0-9])?$")


@dataclass
class KanikoRequest:
    """One build for a Kaniko Job; the context is already in the store."""

    #: Full reference with tag: ``registry/repo:<tag>``.
    image: str
    #: Where kaniko reads the ``.tar.gz`` context (s3://, gs://, https://...blob..., file://).
    context_uri: str
    source_hash: str
    dockerfile: str = "Dockerfile"
    build_args: Mapping[str, str] = field(default_factory=dict)
    target: str | None = None
    platform: str | None = None
    #: Image labels (``--label``).
    labels: Mapping[str, str] = field(default_factory=dict)
    #: Names of secret build args: kaniko reads each value from the Job's env, which takes
    #: it from the Kubernetes Secret named by BUILDQ_BUILD_SECRETS_SECRET (key = name).
    secrets: tuple[str, ...] = ()


# --------------------------------------------------------------------------- arguments


def parse_arg(arg: str, where: str = "kaniko-config") -> tuple[str, str]:
    """``--key=value`` → (``--key``, ``value``); a bare boolean flag means ``true``."""
    if not isinstance(arg, str) or not arg.startswith("--"):
        raise ConfigError(f"{where}: container arg {arg!r} is not a flag written --key=value.",
                          'Quote each flag, e.g. "--cache=false".')
    key, sep, value = arg.partition("=")
    if not sep:
        if key in BOOLEAN_FLAGS:
            return key, "true"
        raise ConfigError(f"{where}: container arg {arg!r} needs a value.",
                          f'Write it as "{key}=<value>" in one list item.')
    return key, value


def merge_args(defaults: Iterable[tuple[str, str]], user: Iterable[str],
               where: str = "kaniko-config") -> list[str]:
    """Our args with the user's: a user flag replaces ours, repeatable flags accumulate."""
    merged: list[tuple[str, str]] = list(defaults)
    for raw in user:
        key, value = parse_arg(raw, where)
        if key in OWNED_FLAGS:
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
    base = cfg.builder.build_job_name.strip("-")[: MAX_NAME - 1 - MIN_HASH_CHARS].rstrip("-")
    room = MAX_NAME - len(base) - 1
    name = f"{base}-{source_hash[:min(room, 24)]}".lower()
    if not _DNS_LABEL_RE.match(name):
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
    dest = parse_image_ref(request.image)
    kind = classify_registry(dest).kind
    scheme = urlsplit(request.context_uri).scheme
    host = urlsplit(request.context_uri).hostname or ""

    if env_type == "aws" and cfg.environment and cfg.environment.region:
        # IRSA comes from kaniko-config's serviceAccountName; kaniko needs the region.
        wiring.env.append({"name": "AWS_REGION", "value": cfg.environment.region})
    if scheme == "s3" and settings.s3_endpoint_url:
        wiring.env += [{"name": "S3_ENDPOINT", "value": settings.s3_endpoint_url},
                       {"name": "S3_FORCE_PATH_STYLE", "value": "true"}]
    if scheme == "gs" and settings.gcs_endpoint_url:
        # kaniko's Go storage client honours the same emulator variable as ours.
        wiring.env.append({"name": "STORAGE_EMULATOR_HOST", "value": settings.gcs_endpoint_url})
    if scheme == "https" and host.endswith(".blob.core.windows.net"):
        secret, key = ((builder.secret_name, builder.secret_key or AZURE_KEY_SECRET[1])
                       if env_type == "azure" and builder.secret_name else AZURE_KEY_SECRET)
        wiring.env.append({"name": "AZURE_STORAGE_ACCESS_KEY",
                           "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
        if settings.azure_blob_endpoint:
            # Kaniko itself reaches the account by the context URL and has no override;
            # a blob endpoint is only ever set for a stand-in (Azurite), whose kubelet
            # reads this. Harmless to a real kaniko, which ignores the variable.
            wiring.env.append({"name": AZURE_ENDPOINT_ENV, "value": settings.azure_blob_endpoint})
    if env_type == "azure":
        # acr-env and the blob client read the federated token workload identity injects.
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
    """The ``--context`` kaniko understands: a ``file://`` object is a local ``tar://`` path."""
    parts = urlsplit(uri)
    if parts.scheme == "file":
        return f"tar://{unquote(parts.path)}"
    return uri


def reached_as(reference: str, settings: Settings) -> str:
    """``reference`` named after the endpoint its registry is really reached at.

    Kaniko pushes to the host a ``--destination`` names, like the engine does, so a
    registry mapped by ``Settings.registry_endpoints`` (BUILDQ_REGISTRY_ENDPOINTS) is
    written with its endpoint; the record keeps the name the user configured.
    """
    host, sep, rest = reference.partition("/")
    endpoint = settings.registry_endpoints.get(host)
    return f"{endpoint}{sep}{rest}" if endpoint and sep else reference


def cache_repo(request: KanikoRequest, cfg: LaunchConfig) -> str:
    """Where kaniko caches layers: ``builder.cache-repo``, else ``<destination>-cache``."""
    dest = parse_image_ref(request.image).name
    repo = (parse_destination(cfg.builder.cache_repo, "builder.cache-repo").name
            if cfg.builder.cache_repo else f"{dest}-cache")
    if repo == dest:
        raise ConfigError(f"builder.cache-repo {repo!r} is the destination repository.",
                          f"Use e.g. {dest}-cache so cache layers stay out of the image repository.")
    return repo


def _is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name in ("localhost", "::1") or name.startswith("127.")


def default_args(request: KanikoRequest, cfg: LaunchConfig,
                 settings: Settings) -> list[tuple[str, str]]:
    args: list[tuple[str, str]] = [
        ("--context", kaniko_context(request.context_uri)),
        ("--dockerfile", request.dockerfile),
        ("--destination", reached_as(request.image, settings)),
        ("--cache", "true"),
        ("--cache-repo", reached_as(cache_repo(request, cfg), settings)),
        ("--snapshot-mode", "redo"),
        ("--compressed-caching", "false"),
        # The digest lands in the pod status, where the dispatcher reads it.
        ("--digest-file", "/dev/termination-log"),
    ]
    args += [("--build-arg", f"{k}={v}") for k, v in sorted(request.build_args.items())]
    # A value-less --build-arg makes kaniko take the value from its environment.
    args += [("--build-arg", name) for name in request.secrets]
    if request.target:
        args.append(("--target", request.target))
    if request.platform:
        args.append(("--custom-platform", request.platform))
    args += [("--label", f"{k}={v}") for k, v in sorted(request.labels.items())]
    registry = parse_image_ref(request.image).registry
    endpoint = settings.registry_endpoints.get(registry)
    for host in dict.fromkeys(h for h in (registry, endpoint) if h):
        if _is_loopback(host) or host in settings.insecure_registries:
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
    clash = sorted(taken.intersection(request.secrets))
    if clash:
        raise ConfigError(f"secret build arg {clash[0]} has the name of an environment variable "
                          "the kaniko container needs.", "Rename the ARG and the secret.")
    return [{"name": name, "valueFrom": {"secretKeyRef": {
        "name": settings.build_secrets_secret, "key": name}}} for name in request.secrets]


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
    labels = {**MANAGED_LABELS, HASH_LABEL: request.source_hash[:24]}
    annotations = {HASH_LABEL: request.source_hash, IMAGE_ANNOTATION: request.image}

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
    pod_spec = deep_merge(pod_spec, user_pod)
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


# --------------------------------------------------------------------------- dispatch


class KanikoCancelledError(BuildError):
    """The worker was told to stop this build (Celery's ``revoke(terminate=True)``)."""

    kind = "cancelled"


def _leave_after_task() -> None:
    """Die by the deferred SIGTERM once the current Celery task has finished.

    The prefork pool marks a process it sends SIGTERM as terminating and reports its
    next death as that job's termination: a process that lived on would one day have
    an unrelated build reported as revoked (and never redelivered) when it dies. So
    after the failed record is written and the lock released, the process ends as
    asked. Outside a worker's pool (in-process builds, direct calls) nothing changes.
    """
    try:
        from celery import current_task
        from celery.signals import task_postrun
    except ImportError:
        return
    # A proxy: false when no task runs in this thread.
    if not current_task or current_task.request.is_eager or not current_task.request.id:
        return
    wanted = current_task.request.id

    def leave(task_id: str | None = None, **_: Any) -> None:
        if task_id == wanted:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    task_postrun.connect(leave, weak=False)


class _CancelOnTerminate:
    """While armed, SIGTERM raises :class:`KanikoCancelledError` in the dispatching thread.

    Celery's ``revoke(terminate=True)`` sends SIGTERM to the pool process, whose default
    action would end it on the spot: the Job would run on and the uploaded context stay
    until the deadline and TTL. Raised as an exception instead, the dispatcher deletes
    the Job and the stage records a failed build, whose record stage deletes the context.
    Once disarmed (cleanup running) a SIGTERM is only remembered, and raised afterwards,
    so it cannot cut the deletion short. Either way the pool process then ends when the
    task is done (see :func:`_leave_after_task`).
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self.armed = False
        self.pending = False
        self._previous: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        _leave_after_task()
        if self.armed:
            self.armed = False
            raise self.error()
        self.pending = True

    def error(self) -> KanikoCancelledError:
        return KanikoCancelledError(
            f"the build was cancelled (SIGTERM) while the Kaniko Job {self.where} ran; "
            "the Job and its pods were deleted.")

    @contextlib.contextmanager
    def installed(self) -> Iterator[_CancelOnTerminate]:
        # Signal handlers can only be set from the main thread (a prefork pool process);
        # elsewhere (threads, tests) the process's own SIGTERM handling stands.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
            self._installed = True
            self.armed = True
        try:
            yield self
        finally:
            self.armed = False
            if self._installed:
                signal.signal(signal.SIGTERM, self._previous)
                self._installed = False

    def disarm(self) -> None:
        self.armed = False


@dataclass
class _Outcome:
    digest: str | None = None
    error: BuildqError | None = None


class _Follow:
    """Watches one Job and its pod until a verdict, streaming the pod's log meanwhile."""

    def __init__(self, kube: Kube, namespace: str, job: dict[str, Any], manifest: dict[str, Any],
                 say: Callable[[str], None]) -> None:
        self.kube = kube
        self.namespace = namespace
        self.job = job
        self.name = job["metadata"]["name"]
        self.uid = job["metadata"].get("uid", "")
        pod_spec = manifest["spec"]["template"]["spec"]
        self.container = pod_spec["containers"][0]["name"]
        self.deadline_seconds = float(manifest["spec"].get("activeDeadlineSeconds")
                                      or DEFAULT_ACTIVE_DEADLINE)
        self.say = say
        self.events: queue.Queue[tuple[str, str, Any]] = queue.Queue()
        self.stop = threading.Event()
        self.tail: deque[str] = deque(maxlen=LOG_TAIL)
        self.pod: dict[str, Any] | None = None
        self.log_thread: threading.Thread | None = None
        self.log_response: Any = None
        self.log_lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    # -- watchers (background threads) ------------------------------------------------

    def _watch(self, kind: str, **selectors: str) -> None:
        rv: str | None = self.job["metadata"].get("resourceVersion") if kind == "jobs" else None
        failures = 0
        while not self.stop.is_set():
            try:
                for event in self.kube.watch(kind, self.namespace, rv,
                                             timeout_seconds=WATCH_SECONDS, **selectors):
                    failures = 0
                    obj = event.get("object") or {}
                    rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                    if event.get("type") != "BOOKMARK":
                        self.events.put((kind, str(event.get("type")), obj))
                    if self.stop.is_set():
                        return
            except KubeUnavailableError as exc:
                failures += 1
                if failures >= 5:
                    self.events.put(("error", "", exc))
                    return
                self.stop.wait(min(5.0, 0.2 * 2 ** failures))
            except KubeApiError as exc:
                if exc.status == 410:
                    # Our resourceVersion is too old: start over from the current state.
                    rv = None
                    continue
                self.events.put(("error", "", exc))
                return
            except Exception as exc:  # a bug must still end the build, not hang it
                self.events.put(("error", "", exc))
                return

    def _stream_log(self, pod_name: str) -> None:
        try:
            resp = self.kube.follow_log(self.namespace, pod_name, self.container,
                                        self.deadline_seconds + DEADLINE_GRACE)
        except Exception as exc:
            # The build goes on without live output; its verdict does not depend on it.
            self.say(f"[kaniko log unavailable: {getattr(exc, 'message', None) or exc}]")
            return
        with self.log_lock:
            self.log_response = resp
        pending = b""
        try:
            for chunk in resp.stream(8192, decode_content=False):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._line(line)
            if pending:
                self._line(pending)
        except Exception as exc:
            if not self.stop.is_set():
                self.say(f"[kaniko log stream ended early: {type(exc).__name__}]")
        finally:
            with contextlib.suppress(Exception):
                resp.release_conn()

    def _line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        self.tail.append(text)
        self.say(text)

    def _start(self, target: Callable[..., None], *args: Any, **kwargs: Any) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, kwargs=kwargs, daemon=True,
                                  name=f"kaniko-{target.__name__}")
        thread.start()
        self.threads.append(thread)
        return thread

    # -- the verdict (caller's thread) --------------------------------------------------

    def run(self) -> str:
        self._start(self._watch, "jobs", field_selector=f"metadata.name={self.name}")
        self._start(self._watch, "pods", label_selector=f"controller-uid={self.uid}")
        started = time.monotonic()
        try:
            verdict = self._judge_job(self.job)
            while verdict is None:
                if time.monotonic() - started > self.deadline_seconds + DEADLINE_GRACE:
                    raise BuildError(
                        f"the Kaniko Job {self.namespace}/{self.name} gave no verdict within its "
                        f"deadline of {self.deadline_seconds:.0f}s.",
                        "Check the cluster's Job controller; the Job has been deleted.")
                try:
                    kind, kind_type, obj = self.events.get(timeout=0.5)
                except queue.Empty:
                    continue
                if kind == "error":
                    raise obj
                if kind == "pods":
                    self._on_pod(kind_type, obj)
                elif kind == "jobs":
                    if kind_type == "DELETED":
                        raise TransientError(
                            f"the Kaniko Job {self.namespace}/{self.name} was deleted before it "
                            "finished.", "The build is retried.")
                    self.job = obj
                    verdict = self._judge_job(obj)
            return self._conclude(verdict)
        finally:
            self.stop.set()
            with self.log_lock:
                if self.log_response is not None:
                    _abort_stream(self.log_response)

    def _on_pod(self, kind_type: str, pod: dict[str, Any]) -> None:
        if kind_type == "DELETED":
            return
        self.pod = pod
        state = self._container_state(pod)
        if self.log_thread is None and ("running" in state or "terminated" in state):
            self.log_thread = self._start(self._stream_log, pod["metadata"]["name"])
        waiting = state.get("waiting") or {}
        if waiting.get("reason") in FATAL_WAITING:
            image = pod["spec"]["containers"][0].get("image", "?")
            raise BuildError(
                f"the kaniko pod cannot start: {waiting['reason']} for image {image}"
                + (f" ({waiting['message']})" if waiting.get("message") else "") + ".",
                "Check builder.kaniko-image and the imagePullSecrets in kaniko-config."
                if "Image" in waiting["reason"] else
                "Check that every Secret the Job refers to exists in its namespace.")

    def _container_state(self, pod: dict[str, Any] | None) -> dict[str, Any]:
        statuses = ((pod or {}).get("status") or {}).get("containerStatuses") or []
        for status in statuses:
            if status.get("name") == self.container:
                return dict(status.get("state") or {})
        return {}

    @staticmethod
    def _judge_job(job: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        for cond in (job.get("status") or {}).get("conditions") or []:
            if cond.get("status") == "True" and cond.get("type") in ("Complete", "Failed"):
                return str(cond["type"]), cond
        return None

    def _final_pod(self) -> dict[str, Any] | None:
        """The pod as it ended: read again, since its last event may still be in flight."""
        try:
            pods = self.kube.list_pods(self.namespace, f"controller-uid={self.uid}")
        except KanikoCancelledError:
            raise
        except BuildqError:
            pods = []
        ended = [p for p in pods if "terminated" in self._container_state(p)]
        if ended:
            return sorted(ended, key=lambda p: p["metadata"].get("creationTimestamp") or "")[-1]
        return self.pod

    def _conclude(self, verdict: tuple[str, dict[str, Any]]) -> str:
        kind, cond = verdict
        pod = self._final_pod()
        if self.log_thread is None and pod is not None:
            # The build ran before we looked (an adopted Job): fetch what it printed.
            self.log_thread = self._start(self._stream_log, pod["metadata"]["name"])
        if self.log_thread is not None:
            self.log_thread.join(timeout=15)
        terminated = self._container_state(pod).get("terminated") or {}
        where = f"{self.namespace}/{self.name}"
        if kind == "Complete":
            digest = str(terminated.get("message") or "").strip()
            if not _DIGEST_RE.match(digest):
                raise BuildError(f"the Kaniko Job {where} completed but left no image digest in its "
                                 f"termination message (found {digest[:80]!r}).",
                                 "Keep --digest-file=/dev/termination-log in the kaniko args.")
            return digest
        reason = cond.get("reason") or ""
        tail = "\n".join(self.tail) or str(terminated.get("message") or "").strip()
        tail_text = f"\nLast lines of the log:\n{tail}" if tail else ""
        if reason == "DeadlineExceeded":
            raise BuildError(
                f"the Kaniko Job {where} ran past its deadline of {self.deadline_seconds:.0f}s "
                "(DeadlineExceeded) and was stopped." + tail_text,
                "Raise spec.activeDeadlineSeconds in builder.kaniko-config, or speed the build up.")
        if terminated.get("reason") == "OOMKilled":
            limit = (((pod or {}).get("spec") or {}).get("containers") or [{}])[0]
            memory = ((limit.get("resources") or {}).get("limits") or {}).get("memory")
            raise BuildError(
                f"the kaniko container of Job {where} ran out of memory (OOMKilled"
                + (f", limit {memory}" if memory else "") + ")." + tail_text,
                "Raise spec.template.spec.containers[0].resources.limits.memory in "
                "builder.kaniko-config.")
        code = terminated.get("exitCode")
        if code not in (None, 0):
            raise BuildError(f"kaniko exited with code {code} in Job {where}." + tail_text,
                             "Fix the Dockerfile step the log shows.")
        raise BuildError(f"the Kaniko Job {where} failed ({reason or 'no reason given'}: "
                         f"{cond.get('message') or ''})." + tail_text)


def _abort_stream(resp: Any) -> None:
    """End a streaming response another thread is reading.

    ``close()`` would wait for the reader's lock (a deadlock while it blocks in recv);
    shutting the socket down makes that recv return at once.
    """
    sock = getattr(getattr(resp, "connection", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class KanikoDispatcher:
    """Runs one Kaniko Job per call to :meth:`run`, and always deletes it."""

    def __init__(self, cfg: LaunchConfig, settings: Settings, api_client: Any = None) -> None:
        self.cfg = cfg
        self.settings = settings
        self._api_client = api_client

    def run(self, request: KanikoRequest, log: Callable[[str], None]) -> str:
        """Build and push ``request``; returns the digest kaniko pushed."""
        lock = threading.Lock()

        def say(line: str) -> None:
            with lock:
                log(line)

        namespace = resolve_namespace(self.cfg, self.settings)
        manifest = render_job(request, self.cfg, self.settings, namespace)
        name = manifest["metadata"]["name"]
        api_client = self._api_client if self._api_client is not None else new_api_client()
        kube = Kube(api_client)
        with _CancelOnTerminate(f"{namespace}/{name}").installed() as cancel:
            try:
                job = self._create_or_adopt(kube, namespace, manifest, request, say)
                digest = _Follow(kube, namespace, job, manifest, say).run()
            except KanikoCancelledError:
                say(f"[cancelled: deleting Job {namespace}/{name}]")
                raise
            finally:
                cancel.disarm()
                self._delete(kube, namespace, name, say)
                if self._api_client is None:
                    with contextlib.suppress(Exception):
                        api_client.close()
            if cancel.pending:
                raise cancel.error()
        return digest

    @staticmethod
    def _delete(kube: Kube, namespace: str, name: str, say: Callable[[str], None]) -> None:
        try:
            kube.delete_job(namespace, name)
        except BuildqError as exc:
            # Never mask the build's own outcome; ttlSecondsAfterFinished is the backstop.
            log_line = f"[could not delete Job {namespace}/{name}: {exc.message}]"
            say(log_line)
            log.warning(log_line)

    def _create_or_adopt(self, kube: Kube, namespace: str, manifest: dict[str, Any],
                         request: KanikoRequest, say: Callable[[str], None]) -> dict[str, Any]:
        name = manifest["metadata"]["name"]
        for _ in range(3):
            try:
                job = kube.create_job(namespace, manifest)
                say(f"[created Job {namespace}/{name}]")
                return job
            except KubeConflictError:
                pass
            try:
                existing = kube.read_job(namespace, name)
            except KubeNotFoundError:
                continue  # deleted in between: create again
            theirs = (existing["metadata"].get("annotations") or {}).get(HASH_LABEL)
            if theirs and theirs != request.source_hash:
                raise BuildError(f"Job {namespace}/{name} exists for another source ({theirs[:24]}).",
                                 "Delete it, or give builder.build-job-name a distinct value.")
            if existing["metadata"].get("deletionTimestamp"):
                self._wait_gone(kube, namespace, name)
                continue
            say(f"[adopted the existing Job {namespace}/{name} for this source]")
            return existing
        raise TransientError(f"Job {namespace}/{name} kept being replaced while we created it.",
                             "The build is retried.")

    @staticmethod
    def _wait_gone(kube: Kube, namespace: str, name: str, timeout: float = 120.0) -> None:
        """Wait (by watching) for a Job that is being deleted to disappear."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                job = kube.read_job(namespace, name)
            except KubeNotFoundError:
                return
            rv = job["metadata"].get("resourceVersion")
            for event in kube.watch("jobs", namespace, rv, field_selector=f"metadata.name={name}",
                                    timeout_seconds=10):
                if event.get("type") == "DELETED":
                    return
        raise TransientError(f"Job {namespace}/{name} is still being deleted.", "The build is retried.")
