"""A thin wrapper over the official ``kubernetes`` client for the Kaniko-dispatch pool.

Everything goes through plain dicts (the JSON the API server speaks): requests are
sent with ``_preload_content=False`` and answers parsed here, so the code does not
depend on which generation of the client's model classes is installed, and a field
the models do not know yet survives the round trip.

Errors are translated once, here: 5xx, 429 and dropped connections are retried with
backoff and end as :class:`KubeUnavailableError` (transient: the stage is retried);
403 names the RBAC permission that is missing; other refusals become
:class:`KubeApiError`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import urllib3

from config.errors import ServiceError, TransientError

log = logging.getLogger("buildq.kube")

#: Mounted into every pod that has a service account; its presence means "in-cluster".
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
#: Attempts per API call before a transient fault is handed to the stage's own retries.
API_ATTEMPTS = 5
#: Backoff between attempts: up to RETRY_BASE * 2**attempt seconds, never above RETRY_CAP.
RETRY_BASE, RETRY_CAP = 0.25, 4.0
#: Seconds a single (non-streaming) API request may take.
REQUEST_TIMEOUT = 30.0

T = TypeVar("T")


@dataclass(frozen=True)
class Access:
    """One RBAC permission: ``verb`` on ``resource`` of API ``group`` ("" is the core group).

    A subresource is written as RBAC writes it, ``pods/log``.
    """

    verb: str
    group: str
    resource: str

    @property
    def resource_name(self) -> str:
        """``jobs.batch``, ``pods``, ``pods/log``: how kubectl and API errors name it."""
        base, slash, sub = self.resource.partition("/")
        return f"{base}.{self.group}{slash}{sub}" if self.group else self.resource

    def __str__(self) -> str:
        return f"{self.verb} {self.resource_name}"


# Every request the kaniko pool sends goes through :class:`Kube`, and each of its methods
# names one of these; ``buildq doctor`` checks this same table and
# deploy/kubernetes/role.yaml grants it, so the three cannot drift apart unnoticed (a test
# replays a kaniko build against the API stand-in and compares what it was asked).
CREATE_JOBS = Access("create", "batch", "jobs")
GET_JOBS = Access("get", "batch", "jobs")
LIST_JOBS = Access("list", "batch", "jobs")
WATCH_JOBS = Access("watch", "batch", "jobs")
DELETE_JOBS = Access("delete", "batch", "jobs")
LIST_PODS = Access("list", "", "pods")
WATCH_PODS = Access("watch", "", "pods")
GET_POD_LOG = Access("get", "", "pods/log")

#: What the kaniko pool does through the Kubernetes API, and nothing more.
KANIKO_ACCESS: tuple[Access, ...] = (
    CREATE_JOBS, GET_JOBS, LIST_JOBS, WATCH_JOBS, DELETE_JOBS, LIST_PODS, WATCH_PODS, GET_POD_LOG,
)


class KubeUnavailableError(TransientError, ServiceError):
    """The API server answered 5xx/429 or could not be reached; worth retrying later."""


class KubeApiError(ServiceError):
    """The API server refused a request for a reason a retry will not fix."""

    def __init__(self, message: str, hint: str | None = None, status: int = 0,
                 reason: str = "") -> None:
        super().__init__(message, hint)
        self.status = status
        self.reason = reason


class KubeForbiddenError(KubeApiError):
    """403: the service account lacks an RBAC permission."""


class KubeNotFoundError(KubeApiError):
    """404 on a named object."""


class KubeConflictError(KubeApiError):
    """409 AlreadyExists / Conflict."""


def retrying(fn: Callable[[], T], attempts: int = API_ATTEMPTS) -> T:
    """``fn()``, again after a jittered exponential pause while it raises KubeUnavailableError.

    The last transient error is re-raised as is, so the stage's own retries (and the
    record, if they run out) say what happened.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except KubeUnavailableError:
            if attempt == attempts - 1:
                raise
            # Full jitter: several workers hitting one sick API server spread out.
            time.sleep(random.uniform(0, min(RETRY_CAP, RETRY_BASE * 2 ** attempt)))
    raise AssertionError("unreachable")


def _status_of(exc: Exception) -> tuple[int, str, str]:
    """(HTTP status, Status.reason, Status.message) of a client exception."""
    status = int(getattr(exc, "status", 0) or 0)
    body = getattr(exc, "body", None) or b""
    reason = str(getattr(exc, "reason", "") or "")
    message = ""
    try:
        data = json.loads(body)
        reason = data.get("reason") or reason
        message = data.get("message") or ""
    except (ValueError, TypeError, AttributeError):
        pass
    return status, reason, message


def translate(exc: Exception, access: Access, namespace: str) -> Exception:
    """The buildq error for a failed API call that needed ``access``."""
    from kubernetes.client.exceptions import ApiException

    verb, resource = access.verb, access.resource_name
    if isinstance(exc, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError):
        return KubeUnavailableError(
            f"the Kubernetes API server could not be reached to {verb} {resource} "
            f"({type(exc).__name__}).",
            "Check the worker's in-cluster config or KUBECONFIG; the build is retried.")
    if not isinstance(exc, ApiException):
        return exc
    status, reason, message = _status_of(exc)
    detail = f": {message}" if message else ""
    if status >= 500 or status == 429 or status == 0:
        return KubeUnavailableError(
            f"the Kubernetes API server answered {status or 'nothing'} {reason} to "
            f"{verb} {resource}{detail}.", "The build is retried.")
    if status == 403:
        return KubeForbiddenError(
            f"the worker's service account may not {verb} {resource} in namespace "
            f"{namespace!r} (403 Forbidden){detail}.",
            f"Grant it with a Role in {namespace!r}: rule verbs [{verb}] on "
            f"{resource}, bound to the service account the kaniko pool runs as.",
            status, reason)
    if status == 401:
        return KubeApiError(
            f"the Kubernetes API server rejected the worker's credentials (401) to {verb} "
            f"{resource}{detail}.", "Check the service account token or the KUBECONFIG user.",
            status, reason)
    if status == 404:
        return KubeNotFoundError(f"{resource} not found in namespace {namespace!r}{detail}.",
                                 None, status, reason)
    if status == 409:
        return KubeConflictError(f"{resource} already exists in namespace {namespace!r}{detail}.",
                                 None, status, reason)
    return KubeApiError(
        f"the Kubernetes API server refused to {verb} {resource} ({status} {reason}){detail}.",
        "Check builder.kaniko-config against the Job schema.", status, reason)


def new_api_client() -> Any:
    """An ApiClient from the in-cluster service account, else from kubeconfig (KUBECONFIG).

    Neither touches the client's global default configuration, so tests and several
    dispatchers in one process do not step on each other.
    """
    from kubernetes import client, config

    try:
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        return client.ApiClient(configuration)
    except config.ConfigException:
        pass
    try:
        return config.new_client_from_config()
    except (config.ConfigException, FileNotFoundError, OSError) as exc:
        raise ServiceError(
            f"no Kubernetes API to run kaniko Jobs: not in a pod with a service account, "
            f"and no usable kubeconfig ({exc}).",
            "Run the kaniko pool in-cluster, or set KUBECONFIG for the worker.") from None


def in_cluster_namespace() -> str | None:
    """The namespace of the pod this process runs in, when it runs in one."""
    try:
        text = (SERVICE_ACCOUNT_DIR / "namespace").read_text().strip()
    except OSError:
        return None
    return text or None


def in_cluster_service_account() -> str | None:
    """The name of the ServiceAccount this pod runs as, when it runs in one.

    Read from the token's ``sub`` claim (``system:serviceaccount:<namespace>:<name>``),
    which projected and legacy tokens both carry; the signature is the API server's
    business, this only names the account.
    """
    try:
        token = (SERVICE_ACCOUNT_DIR / "token").read_text().strip()
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (OSError, IndexError, ValueError):
        return None
    subject = claims.get("sub") if isinstance(claims, dict) else None
    prefix, _, name = str(subject or "").rpartition(":")
    return name if prefix.startswith("system:serviceaccount:") and name else None


class Kube:
    """The few API calls the dispatcher makes, on dicts, with retries and clear errors."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self.api_client = api_client
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)

    def _call(self, access: Access, namespace: str, fn: Callable[..., Any],
              *args: Any, **kwargs: Any) -> dict[str, Any]:
        def attempt() -> dict[str, Any]:
            try:
                resp = fn(*args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT,
                          **kwargs)
                data = resp.data
            except Exception as exc:
                raise translate(exc, access, namespace) from exc
            return json.loads(data) if data else {}

        return retrying(attempt)

    def create_job(self, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
        return self._call(CREATE_JOBS, namespace, self.batch.create_namespaced_job,
                          namespace, _job_body(manifest))

    def read_job(self, namespace: str, name: str) -> dict[str, Any]:
        return self._call(GET_JOBS, namespace, self.batch.read_namespaced_job, name, namespace)

    def delete_job(self, namespace: str, name: str) -> None:
        """Delete the Job and, through the garbage collector, its pods; gone already is fine."""
        with contextlib.suppress(KubeNotFoundError):
            self._call(DELETE_JOBS, namespace, self.batch.delete_namespaced_job,
                       name, namespace, propagation_policy="Background")

    def list_jobs(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        data = self._call(LIST_JOBS, namespace, self.batch.list_namespaced_job,
                          namespace, label_selector=selector)
        return list(data.get("items") or [])

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        data = self._call(LIST_PODS, namespace, self.core.list_namespaced_pod, namespace,
                          label_selector=selector)
        return list(data.get("items") or [])

    def watch(self, kind: str, namespace: str, resource_version: str | None, *,
              field_selector: str | None = None, label_selector: str | None = None,
              timeout_seconds: int = 60) -> Iterator[dict[str, Any]]:
        """Events ``{"type", "object"}`` of one watch request, ended by the server's timeout.

        The caller reconnects from the last resourceVersion it saw; a 410 Gone (too old)
        is raised as KubeApiError with status 410 so it can re-read and start over.
        """
        from kubernetes.client.exceptions import ApiException
        from kubernetes.watch.watch import iter_resp_lines

        fn, access = ((self.batch.list_namespaced_job, WATCH_JOBS) if kind == "jobs"
                      else (self.core.list_namespaced_pod, WATCH_PODS))
        kwargs: dict[str, Any] = {"watch": True, "timeout_seconds": timeout_seconds,
                                  "allow_watch_bookmarks": True, "_preload_content": False,
                                  "_request_timeout": (REQUEST_TIMEOUT, timeout_seconds + 15)}
        if resource_version:
            kwargs["resource_version"] = resource_version
        if field_selector:
            kwargs["field_selector"] = field_selector
        if label_selector:
            kwargs["label_selector"] = label_selector
        # The stream is read here rather than through kubernetes.watch.Watch: that helper,
        # asked for plain dicts, meets an ERROR event (410 Gone once our resourceVersion
        # is compacted away, as after an API server restart) with KeyError 'raw_object'
        # (client 37), and asked for models it refuses objects a model finds incomplete.
        resp: Any = None
        try:
            resp = fn(namespace, **kwargs)
            if not 200 <= int(resp.status) <= 299:
                failed = ApiException(status=resp.status, reason=resp.reason)
                failed.body = resp.data
                raise failed
            for line in iter_resp_lines(resp):
                if not line or line.isspace():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    failed = ApiException(status=int(status.get("code") or 0),
                                          reason=str(status.get("reason") or ""))
                    failed.body = json.dumps(status)
                    raise failed
                yield {"type": event.get("type"), "object": event.get("object") or {}}
        except Exception as exc:
            raise translate(exc, access, namespace) from exc
        finally:
            if resp is not None:
                with contextlib.suppress(Exception):
                    resp.close()
                    resp.release_conn()

    def follow_log(self, namespace: str, pod: str, container: str, read_timeout: float) -> Any:
        """The raw streaming response of the pod's log (``follow=true``); close it when done.

        ``read_timeout`` bounds the silence between two chunks, not the whole stream.
        """
        try:
            return self.core.read_namespaced_pod_log(
                pod, namespace, container=container, follow=True, _preload_content=False,
                _request_timeout=(REQUEST_TIMEOUT, read_timeout))
        except Exception as exc:
            raise translate(exc, GET_POD_LOG, namespace) from exc


def _job_body(manifest: dict[str, Any]) -> Any:
    """The body the installed client wants for a Job: a model where models are strict."""
    from kubernetes.client import V1Job

    from_dict = getattr(V1Job, "from_dict", None)
    return from_dict(manifest) if from_dict is not None else manifest
