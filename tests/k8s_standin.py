"""A Kubernetes API stand-in for tests, with a kubelet that carries out kaniko Jobs.

No API server can run on these machines, so this speaks the REST paths and semantics
the kaniko pool uses, over real HTTP, to the real ``kubernetes`` client:

- batch/v1 Jobs: create (201, or 409 AlreadyExists), get, list, delete (honouring
  ``propagationPolicy``: Background/Foreground delete the pods, Orphan and no policy
  leave them, as the real API does for batch/v1), and watch (``watch=true`` with
  ``fieldSelector``/``labelSelector``/``resourceVersion``/``timeoutSeconds``: a chunked
  stream of ADDED/MODIFIED/DELETED JSON lines with increasing resourceVersions);
- core/v1 Pods: get, list and watch by label selector (``controller-uid``,
  ``job-name``), ``pods/{name}/log`` with ``follow=true`` streaming; Secrets and
  ConfigMaps create/get/delete;
- ``Status`` objects for every error (404 NotFound, 409 AlreadyExists, 403, 500).

Its job controller makes one pod per Job, enforces ``activeDeadlineSeconds`` and sets
the Job's Complete/Failed conditions. Its kubelet does what the kaniko container's args
say with real tools: reads ``--context`` as kaniko would, with the pod's env only
(``tar://`` path; ``s3://`` via ``S3_ENDPOINT``/``S3_FORCE_PATH_STYLE``; ``gs://`` via
``STORAGE_EMULATOR_HOST``; ``https://<account>.blob.core.windows.net/...`` with the
``AZURE_STORAGE_ACCESS_KEY`` the Job takes from a Secret, at the stand-in endpoint in
``BUILDQ_AZURE_BLOB_ENDPOINT``), builds it with the Docker Engine (network none), pushes every
``--destination`` to the registry, streams the build output as the pod log and writes
the pushed digest to the container's termination message (``--digest-file``).

Every request is recorded (:attr:`KubeStandIn.requests`), with the RBAC permission it
needs (:meth:`KubeStandIn.accesses`), so a test can hold what the pool really asks
against the Role that is deployed.

Fault knobs: :meth:`KubeStandIn.fail_next` (N requests answer 500 or another code),
``delay`` (seconds added to every request), and :meth:`KubeStandIn.plan` (what the next
Jobs do: ``build``, ``exit`` (non-zero), ``oom`` (OOMKilled), ``hang`` (runs until its
deadline), ``pull`` (ImagePullBackOff)).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qsl, urlsplit

DOCKER_SOCKET = "unix:///var/run/docker.sock"
AZURE_BLOB_SUFFIX = ".blob.core.windows.net"
#: How many lines / bytes FallbackToLogsOnError copies into the termination message.
FALLBACK_LINES, FALLBACK_BYTES = 80, 2048

_JOB_PATH = re.compile(r"^/apis/batch/v1/(?:namespaces/(?P<ns>[^/]+)/)?jobs(?:/(?P<name>[^/]+))?$")
_CORE_PATH = re.compile(r"^/api/v1/(?:namespaces/(?P<ns>[^/]+)/)?(?P<kind>pods|secrets|configmaps)"
                        r"(?:/(?P<name>[^/]+)(?:/(?P<sub>log|status))?)?$")
_GROUPS = {"jobs": ("batch", "Job", "batch/v1"), "pods": ("", "Pod", "v1"),
           "secrets": ("", "Secret", "v1"), "configmaps": ("", "ConfigMap", "v1")}
#: RBAC verb of each HTTP method on a named object (a collection GET is list or watch).
_VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Request:
    """One request as the stand-in saw it (for tests that assert on names and paths)."""

    method: str
    path: str
    query: dict[str, str]
    status: int = 0
    body: Any = None

    @property
    def access(self) -> tuple[str, str, str] | None:
        """The RBAC permission the request needs: (verb, group, resource), as an API
        server's authorizer derives it; None for a path the stand-in does not serve."""
        if m := _JOB_PATH.match(self.path):
            kind, name, sub = "jobs", m["name"], None
        elif m := _CORE_PATH.match(self.path):
            kind, name, sub = m["kind"], m["name"], m["sub"]
        else:
            return None
        if self.method == "GET" and name is None:
            verb = "watch" if self.query.get("watch") in ("true", "1") else "list"
        else:
            verb = _VERBS.get(self.method, self.method.lower())
        return verb, _GROUPS[kind][0], f"{kind}/{sub}" if sub else kind


@dataclass
class _Fault:
    remaining: int
    status: int
    method: str | None
    path_contains: str | None


@dataclass
class _Log:
    lines: list[str] = field(default_factory=list)
    closed: bool = False


class StandInError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}


def status_object(code: int, reason: str, message: str,
                  details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "details": details or {}, "code": code}


def _match_labels(obj: dict[str, Any], selector: str) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.split("==", 1) if "==" in term else term.split("=", 1)
            if labels.get(k) != v:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _match_fields(obj: dict[str, Any], selector: str) -> bool:
    meta = obj.get("metadata") or {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        k, _, v = term.partition("=")
        v = v.lstrip("=")
        value = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace")}.get(k)
        if value != v:
            return False
    return True


class KubeStandIn:
    """The API server, job controller and kubelet; start with :meth:`start`."""

    def __init__(self, kubelet: Kubelet | None = None) -> None:
        self.cond = threading.Condition(threading.RLock())
        self.rv = 100
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.events: list[tuple[int, str, str, dict[str, Any]]] = []
        self.requests: list[Request] = []
        self.logs: dict[tuple[str, str], _Log] = {}
        self.faults: list[_Fault] = []
        self.delay = 0.0
        self.outcomes: deque[str] = deque()
        #: The environment each container ran with, Secret references resolved.
        self.kubelet_env: list[dict[str, str]] = []
        self.kubelet = kubelet or Kubelet()
        self.closing = False
        self.threads: list[threading.Thread] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        self._serve: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> KubeStandIn:
        self._serve = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       name="k8s-standin")
        self._serve.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "standin", "user": {"token": "standin-token"}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin",
                                                         "namespace": namespace}}],
        }))
        return path

    def api_client(self) -> Any:
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        return client.ApiClient(configuration)

    # -- knobs and views for tests -----------------------------------------------------

    def fail_next(self, n: int, status: int = 500, method: str | None = None,
                  path_contains: str | None = None) -> None:
        """The next ``n`` matching requests answer ``status`` with a Status object."""
        with self.cond:
            self.faults.append(_Fault(n, status, method, path_contains))

    def plan(self, *outcomes: str) -> None:
        """What the next Jobs' containers do: build, exit, oom, hang, pull."""
        with self.cond:
            self.outcomes.extend(outcomes)

    def reset(self) -> None:
        with self.cond:
            self.requests.clear()
            self.faults.clear()
            self.outcomes.clear()
            self.kubelet_env.clear()
            self.delay = 0.0

    def list(self, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        with self.cond:
            return [copy.deepcopy(o) for (k, ns, _), o in self.objects.items()
                    if k == kind and (namespace is None or ns == namespace)]

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self.cond:
            obj = self.objects.get((kind, namespace, name))
            return copy.deepcopy(obj) if obj else None

    def requests_for(self, method: str, kind: str = "jobs") -> list[Request]:
        with self.cond:
            return [r for r in self.requests if r.method == method and f"/{kind}" in r.path]

    def accesses(self) -> set[tuple[str, str, str]]:
        """(verb, group, resource) of every request served since the last :meth:`reset`."""
        with self.cond:
            return {access for r in self.requests if (access := r.access) is not None}

    def log_of(self, namespace: str, pod: str) -> list[str]:
        with self.cond:
            return list(self.logs.get((namespace, pod), _Log()).lines)

    def put_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        import base64

        self._create("secrets", namespace, {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})

    # -- object store ------------------------------------------------------------------

    def _bump(self, kind: str, kind_type: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Give ``obj`` the next resourceVersion and record the event (cond held)."""
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.events.append((self.rv, kind, kind_type, copy.deepcopy(obj)))
        self.cond.notify_all()
        return obj

    def _create(self, kind: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        name = (body.get("metadata") or {}).get("name")
        if not name:
            raise StandInError(422, "Invalid", f"{kind} name is required")
        group, _, api_version = _GROUPS[kind]
        with self.cond:
            key = (kind, namespace, name)
            if key in self.objects:
                resource = f"{kind}.{group}" if group else kind
                raise StandInError(409, "AlreadyExists", f'{resource} "{name}" already exists',
                                   {"name": name, "group": group, "kind": kind})
            obj = copy.deepcopy(body)
            obj.setdefault("apiVersion", api_version)
            obj.setdefault("kind", _GROUPS[kind][1])
            meta = obj["metadata"]
            meta.update(namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=_now(),
                        generation=1)
            if kind == "jobs":
                self._default_job(obj)
            self.objects[key] = obj
            self._bump(kind, "ADDED", obj)
            created = copy.deepcopy(obj)
        if kind == "jobs":
            self._spawn(self._run_job, namespace, name)
        return created

    def _default_job(self, job: dict[str, Any]) -> None:
        uid, name = job["metadata"]["uid"], job["metadata"]["name"]
        owned = {"controller-uid": uid, "batch.kubernetes.io/controller-uid": uid,
                 "job-name": name, "batch.kubernetes.io/job-name": name}
        spec = job.setdefault("spec", {})
        spec.setdefault("selector", {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}})
        template = spec.setdefault("template", {})
        template.setdefault("metadata", {}).setdefault("labels", {}).update(owned)
        spec.setdefault("backoffLimit", 6)
        job["status"] = {}

    def _update(self, kind: str, namespace: str, name: str,
                change: Callable[[dict[str, Any]], None]) -> bool:
        """Apply ``change`` to a live object; False when it is gone (deleted meanwhile)."""
        with self.cond:
            obj = self.objects.get((kind, namespace, name))
            if obj is None:
                return False
            change(obj)
            self._bump(kind, "MODIFIED", obj)
            return True

    def _delete(self, kind: str, namespace: str, name: str, policy: str | None) -> dict[str, Any]:
        with self.cond:
            obj = self.objects.pop((kind, namespace, name), None)
            if obj is None:
                group = _GROUPS[kind][0]
                resource = f"{kind}.{group}" if group else kind
                raise StandInError(404, "NotFound", f'{resource} "{name}" not found',
                                   {"name": name, "group": group, "kind": kind})
            obj["metadata"]["deletionTimestamp"] = _now()
            self._bump(kind, "DELETED", obj)
            if kind == "pods":
                log = self.logs.setdefault((namespace, name), _Log())
                log.closed = True
            if kind == "jobs":
                uid = obj["metadata"]["uid"]
                for (k, ns, pod_name), pod in list(self.objects.items()):
                    owners = pod["metadata"].get("ownerReferences") or []
                    if k != "pods" or ns != namespace or not any(o.get("uid") == uid for o in owners):
                        continue
                    if policy in ("Background", "Foreground"):
                        self._delete("pods", ns, pod_name, None)
                    else:
                        # Orphan (the batch/v1 default without a policy): the pod stays.
                        pod["metadata"]["ownerReferences"] = [o for o in owners if o.get("uid") != uid]
                        self._bump("pods", "MODIFIED", pod)
            return obj

    # -- job controller and kubelet -------------------------------------------------------

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name="k8s-standin-job")
        thread.start()
        self.threads.append(thread)

    def _log(self, namespace: str, pod: str, line: str) -> None:
        with self.cond:
            log = self.logs.setdefault((namespace, pod), _Log())
            if not log.closed:
                log.lines.append(line)
                self.cond.notify_all()

    def _close_log(self, namespace: str, pod: str) -> None:
        with self.cond:
            self.logs.setdefault((namespace, pod), _Log()).closed = True
            self.cond.notify_all()

    def _run_job(self, namespace: str, name: str) -> None:
        job = self.get("jobs", namespace, name)
        if job is None:
            return
        with self.cond:
            outcome = self.outcomes.popleft() if self.outcomes else "build"
        started = time.monotonic()
        deadline = job["spec"].get("activeDeadlineSeconds")
        template = job["spec"]["template"]
        pod_name = f"{name}-{secrets.token_hex(3)[:5]}"
        container = template["spec"]["containers"][0]
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod_name, "labels": dict(template["metadata"].get("labels") or {}),
                         "annotations": dict(template["metadata"].get("annotations") or {}),
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                              "uid": job["metadata"]["uid"], "controller": True,
                                              "blockOwnerDeletion": True}]},
            "spec": copy.deepcopy(template["spec"]),
            "status": {"phase": "Pending", "containerStatuses": [{
                "name": container["name"], "image": container.get("image", ""), "ready": False,
                "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}]},
        }
        self._create("pods", namespace, pod)
        self._update("jobs", namespace, name, lambda j: j["status"].update(
            active=1, startTime=_now(), ready=0))

        def set_state(state: dict[str, Any], phase: str) -> bool:
            def change(p: dict[str, Any]) -> None:
                p["status"]["phase"] = phase
                p["status"]["containerStatuses"][0]["state"] = state
            return self._update("pods", namespace, pod_name, change)

        result: dict[str, Any] = {}
        env: dict[str, str] | None = None
        if outcome == "pull":
            time.sleep(0.2)
            set_state({"waiting": {"reason": "ErrImagePull", "message": "stand-in: pull refused"}},
                      "Pending")
            time.sleep(0.2)
            set_state({"waiting": {"reason": "ImagePullBackOff",
                                   "message": f'Back-off pulling image "{container.get("image")}"'}},
                      "Pending")
        else:
            try:
                env = self._env(namespace, container)
            except StandInError as exc:
                set_state({"waiting": {"reason": "CreateContainerConfigError", "message": exc.message}},
                          "Pending")
        if outcome != "pull" and env is not None:
            with self.cond:
                self.kubelet_env.append(dict(env))
            set_state({"running": {"startedAt": _now()}}, "Running")
            worker = threading.Thread(
                target=self._execute, args=(outcome, namespace, pod_name, container, env, result),
                daemon=True, name="k8s-standin-kubelet")
            worker.start()
        else:
            worker = None
        # Wait for the container, the deadline or the deletion of the Job.
        while True:
            if self.get("jobs", namespace, name) is None or self.closing:
                self._close_log(namespace, pod_name)
                return
            if worker is not None and not worker.is_alive():
                break
            if deadline is not None and time.monotonic() - started > float(deadline):
                result = {"deadline": True}
                break
            time.sleep(0.05)
        self._finish(namespace, name, pod_name, container, result)

    def _finish(self, namespace: str, name: str, pod_name: str, container: dict[str, Any],
                result: dict[str, Any]) -> None:
        now = _now()
        if result.get("deadline"):
            terminated = {"exitCode": 137, "reason": "Error", "finishedAt": now}
            phase, job_cond = "Failed", ("Failed", "DeadlineExceeded",
                                         "Job was active longer than specified deadline")
        else:
            code = int(result.get("code", 1))
            message = str(result.get("message") or "")
            if code != 0 and not message and container.get("terminationMessagePolicy") == \
                    "FallbackToLogsOnError":
                message = "\n".join(self.log_of(namespace, pod_name)[-FALLBACK_LINES:])[-FALLBACK_BYTES:]
            reason = result.get("reason") or ("Completed" if code == 0 else "Error")
            terminated = {"exitCode": code, "reason": reason, "message": message, "finishedAt": now}
            if code == 0:
                phase, job_cond = "Succeeded", ("Complete", "", "")
            else:
                phase, job_cond = "Failed", ("Failed", "BackoffLimitExceeded",
                                             "Job has reached the specified backoff limit")

        def pod_change(p: dict[str, Any]) -> None:
            p["status"]["phase"] = phase
            p["status"]["containerStatuses"][0]["state"] = {"terminated": terminated}
        self._update("pods", namespace, pod_name, pod_change)
        self._close_log(namespace, pod_name)

        def job_change(j: dict[str, Any]) -> None:
            kind, reason, message = job_cond
            status = j["status"]
            status.update(active=0, ready=0)
            status["succeeded" if kind == "Complete" else "failed"] = 1
            conditions = [{"type": "SuccessCriteriaMet" if kind == "Complete" else "FailureTarget",
                           "status": "True", "lastTransitionTime": now, "lastProbeTime": now,
                           **({"reason": reason, "message": message} if reason else {})},
                          {"type": kind, "status": "True", "lastTransitionTime": now,
                           "lastProbeTime": now, **({"reason": reason, "message": message}
                                                    if reason else {})}]
            status["conditions"] = conditions
            if kind == "Complete":
                status["completionTime"] = now
        self._update("jobs", namespace, name, job_change)

    def _env(self, namespace: str, container: dict[str, Any]) -> dict[str, str]:
        """The container's environment, Secret references resolved as the kubelet would."""
        import base64

        env: dict[str, str] = {}
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = str(item["value"])
                continue
            ref = ((item.get("valueFrom") or {}).get("secretKeyRef")) or {}
            secret = self.get("secrets", namespace, ref.get("name", ""))
            data = (secret or {}).get("data") or {}
            if ref.get("key") not in data:
                raise StandInError(400, "CreateContainerConfigError",
                                   f'secret "{ref.get("name")}" not found or has no key '
                                   f'"{ref.get("key")}"')
            env[item["name"]] = base64.b64decode(data[ref["key"]]).decode()
        return env

    def _execute(self, outcome: str, namespace: str, pod: str, container: dict[str, Any],
                 env: dict[str, str], result: dict[str, Any]) -> None:
        def say(line: str) -> None:
            self._log(namespace, pod, line)

        try:
            args = container.get("args") or []
            if outcome == "oom":
                say("INFO[0000] Retrieving image manifest (stand-in: about to run out of memory)")
                time.sleep(0.2)
                result.update(code=137, reason="OOMKilled")
            elif outcome == "exit":
                say("error building image: stand-in: exit non-zero")
                result.update(code=1)
            elif outcome == "hang":
                say("INFO[0000] stand-in: running until the deadline")
                while self.get("pods", namespace, pod) is not None and not self.closing:
                    time.sleep(0.1)
                result.update(code=137)
            else:
                result.update(self.kubelet.run_kaniko(args, env, say))
        except Exception as exc:  # the container "crashes": a non-zero exit with the reason
            say(f"error: {type(exc).__name__}: {exc}")
            result.update(code=1)

    # -- watch -------------------------------------------------------------------------

    def watch(self, kind: str, namespace: str | None, query: dict[str, str]) -> Iterator[dict[str, Any]]:
        labels, fields = query.get("labelSelector", ""), query.get("fieldSelector", "")
        timeout = float(query.get("timeoutSeconds") or 1800)
        end = time.monotonic() + timeout

        def matches(obj: dict[str, Any]) -> bool:
            return ((namespace is None or obj["metadata"].get("namespace") == namespace)
                    and _match_labels(obj, labels) and _match_fields(obj, fields))

        start = query.get("resourceVersion") or "0"
        with self.cond:
            if start == "0":
                # "Any" version: synthetic ADDED events for what exists, then changes.
                snapshot = [copy.deepcopy(o) for (k, _, _), o in self.objects.items()
                            if k == kind and matches(o)]
                sent = self.rv
            else:
                snapshot, sent = [], int(start)
        for obj in snapshot:
            yield {"type": "ADDED", "object": obj}
        while time.monotonic() < end:
            with self.cond:
                fresh = [(rv, t, o) for rv, k, t, o in self.events if rv > sent and k == kind]
                if not fresh:
                    if self.closing:
                        return
                    self.cond.wait(min(0.5, max(0.0, end - time.monotonic())))
                    continue
            for rv, kind_type, obj in fresh:
                sent = rv
                if matches(obj):
                    yield {"type": kind_type, "object": obj}

    def follow(self, namespace: str, pod: str, follow: bool) -> Iterator[str]:
        sent = 0
        while True:
            with self.cond:
                log = self.logs.get((namespace, pod), _Log())
                lines, closed = log.lines[sent:], log.closed
                if not lines and not closed and follow and not self.closing:
                    self.cond.wait(0.5)
                    continue
            yield from lines
            sent += len(lines)
            if closed or not follow or self.closing:
                return


class Kubelet:
    """Runs a kaniko container's args with the Docker Engine and a registry."""

    def __init__(self, docker_url: str = DOCKER_SOCKET,
                 s3_credentials: dict[str, str] | None = None) -> None:
        self.docker_url = docker_url
        #: What the node's IAM role would give a pod (moto accepts any key).
        self.s3_credentials = s3_credentials or {"aws_access_key_id": "standin",
                                                 "aws_secret_access_key": "standin"}

    @staticmethod
    def parse(args: list[str]) -> dict[str, list[str]]:
        flags: dict[str, list[str]] = {}
        for arg in args:
            key, sep, value = arg.partition("=")
            flags.setdefault(key, []).append(value if sep else "true")
        return flags

    @contextlib.contextmanager
    def open_context(self, uri: str, env: dict[str, str]) -> Iterator[BinaryIO]:
        parts = urlsplit(uri)
        if parts.scheme == "tar":
            with open(parts.netloc + parts.path, "rb") as stream:
                yield stream
            return
        if parts.scheme == "s3":
            import boto3
            from botocore.config import Config

            style = "path" if env.get("S3_FORCE_PATH_STYLE") == "true" else "auto"
            s3 = boto3.client("s3", endpoint_url=env.get("S3_ENDPOINT"),
                              region_name=env.get("AWS_REGION", "us-east-1"),
                              config=Config(s3={"addressing_style": style}), **self.s3_credentials)
            body = io.BytesIO()
            s3.download_fileobj(parts.netloc, parts.path.lstrip("/"), body)
            body.seek(0)
            yield body
            return
        if parts.scheme == "gs":
            yield self._read_gcs(parts.netloc, parts.path.lstrip("/"), env)
            return
        if parts.scheme == "https" and (parts.hostname or "").endswith(AZURE_BLOB_SUFFIX):
            yield self._read_azure(parts.hostname or "", parts.path.lstrip("/"), env)
            return
        raise ValueError(f"the stand-in kubelet cannot read context {uri}")

    @staticmethod
    def _read_gcs(bucket: str, name: str, env: dict[str, str]) -> BinaryIO:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        endpoint = env.get("STORAGE_EMULATOR_HOST")
        if not endpoint:
            # There is no real Cloud Storage here: only the emulator the Job names.
            raise ValueError("gs:// context without STORAGE_EMULATOR_HOST in the pod's env")
        client = storage.Client(project="standin", credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": endpoint})
        body = io.BytesIO()
        client.bucket(bucket).blob(name).download_to_file(body)
        body.seek(0)
        return body

    @staticmethod
    def _read_azure(host: str, path: str, env: dict[str, str]) -> BinaryIO:
        from azure.storage.blob import BlobClient

        key = env.get("AZURE_STORAGE_ACCESS_KEY")
        if not key:
            # What kaniko says when the Job gives it no account key.
            raise ValueError("AZURE_STORAGE_ACCESS_KEY environment variable is not set")
        account = host[: -len(AZURE_BLOB_SUFFIX)]
        container, _, blob = path.partition("/")
        endpoint = env.get("BUILDQ_AZURE_BLOB_ENDPOINT") or f"https://{host}"
        client = BlobClient(endpoint, container, blob,
                            credential={"account_name": account, "account_key": key})
        body = io.BytesIO()
        client.download_blob().readinto(body)
        body.seek(0)
        return body

    def run_kaniko(self, args: list[str], env: dict[str, str],
                   say: Callable[[str], None]) -> dict[str, Any]:
        import docker

        flags = self.parse(args)
        destinations = flags.get("--destination") or []
        if not destinations and flags.get("--no-push") != ["true"]:
            say("error: you must provide --destination, or use --no-push")
            return {"code": 1}
        build_args: dict[str, str] = {}
        for item in flags.get("--build-arg", []):
            name, sep, value = item.partition("=")
            if sep:
                build_args[name] = value
            elif name in env:
                # As kaniko does: a build arg written without a value takes the container's.
                build_args[name] = env[name]
        labels = dict(a.split("=", 1) for a in flags.get("--label", []))
        target = (flags.get("--target") or [None])[-1]
        dockerfile = (flags.get("--dockerfile") or ["Dockerfile"])[-1]
        api = docker.APIClient(base_url=self.docker_url)
        try:
            with self.open_context(flags["--context"][-1], env) as context:
                stream = api.build(fileobj=context, custom_context=True, encoding="gzip",
                                   dockerfile=dockerfile, buildargs=build_args, target=target,
                                   labels=labels, tag=destinations[0], network_mode="none",
                                   rm=True, forcerm=True, decode=True)
                for chunk in stream:
                    if "error" in chunk:
                        say(f"error building image: {chunk['error'].strip()}")
                        return {"code": 1}
                    text = chunk.get("stream") or chunk.get("status") or ""
                    for line in text.rstrip("\n").splitlines():
                        say(line)
            digest = ""
            for dest in destinations:
                repo, _, tag = dest.rpartition(":")
                if dest != destinations[0]:
                    api.tag(destinations[0], repo, tag)
                for chunk in api.push(repo, tag, stream=True, decode=True):
                    if "error" in chunk:
                        say(f"error pushing image: {chunk['error']}")
                        return {"code": 1}
                    digest = (chunk.get("aux") or {}).get("Digest") or digest
                say(f"INFO Pushed {dest}@{digest}")
            message = digest if flags.get("--digest-file") == ["/dev/termination-log"] else ""
            return {"code": 0, "message": message}
        finally:
            for dest in destinations:
                with contextlib.suppress(Exception):
                    api.remove_image(dest, force=True)
            api.close()


def _handler_for(standin: KubeStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            return json.loads(raw) if raw else None

        def _send(self, code: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _stream(self, chunks: Iterator[bytes], content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for chunk in chunks:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def _handle(self, method: str) -> None:
            parts = urlsplit(self.path)
            query = dict(parse_qsl(parts.query))
            body = self._body() if method in ("POST", "PUT", "PATCH", "DELETE") else None
            record = Request(method, parts.path, query, body=body)
            with standin.cond:
                standin.requests.append(record)
                fault = next((f for f in standin.faults if f.remaining > 0
                              and (f.method is None or f.method == method)
                              and (f.path_contains is None or f.path_contains in parts.path)), None)
                if fault:
                    fault.remaining -= 1
            if standin.delay:
                time.sleep(standin.delay)
            if fault:
                record.status = fault.status
                reason = {500: "InternalError", 503: "ServiceUnavailable", 403: "Forbidden",
                          429: "TooManyRequests"}.get(fault.status, "Unknown")
                message = ("jobs.batch is forbidden: User \"system:serviceaccount:buildq:kaniko\" "
                           "cannot create resource \"jobs\" in API group \"batch\""
                           if fault.status == 403 else f"stand-in fault {fault.status}")
                self._send(fault.status, status_object(fault.status, reason, message))
                return
            try:
                self._route(method, parts.path, query, body, record)
            except StandInError as exc:
                record.status = exc.code
                self._send(exc.code, status_object(exc.code, exc.reason, exc.message, exc.details))

        def _route(self, method: str, path: str, query: dict[str, str], body: Any,
                   record: Request) -> None:
            if m := _JOB_PATH.match(path):
                kind, ns, name, sub = "jobs", m["ns"], m["name"], None
            elif m := _CORE_PATH.match(path):
                kind, ns, name, sub = m["kind"], m["ns"], m["name"], m["sub"]
            else:
                raise StandInError(404, "NotFound", f"the server could not find {path}")
            record.status = 200
            if method == "GET" and name is None and query.get("watch") in ("true", "1"):
                events = standin.watch(kind, ns, query)
                self._stream((json.dumps(e).encode() + b"\n" for e in events), "application/json")
                return
            if method == "GET" and name is None:
                items = [o for o in standin.list(kind, ns)
                         if _match_labels(o, query.get("labelSelector", ""))
                         and _match_fields(o, query.get("fieldSelector", ""))]
                _, kind_name, api_version = _GROUPS[kind]
                self._send(200, {"apiVersion": api_version, "kind": f"{kind_name}List",
                                 "metadata": {"resourceVersion": str(standin.rv)}, "items": items})
                return
            if method == "POST" and name is None and ns:
                created = standin._create(kind, ns, body or {})
                record.status = 201
                self._send(201, created)
                return
            if name is None or ns is None:
                raise StandInError(405, "MethodNotAllowed", f"{method} {path} is not supported")
            if method == "GET" and sub == "log":
                obj = standin.get("pods", ns, name)
                if obj is None:
                    raise StandInError(404, "NotFound", f'pods "{name}" not found')
                state = obj["status"]["containerStatuses"][0]["state"]
                if "waiting" in state:
                    raise StandInError(400, "BadRequest", f'container "{name}" in pod "{name}" is '
                                       f'waiting to start: {state["waiting"].get("reason")}')
                follow = query.get("follow") in ("true", "1")
                self._stream((line.encode() + b"\n" for line in standin.follow(ns, name, follow)),
                             "text/plain")
                return
            if method == "GET":
                obj = standin.get(kind, ns, name)
                if obj is None:
                    group = _GROUPS[kind][0]
                    raise StandInError(404, "NotFound",
                                       f'{kind}{"." + group if group else ""} "{name}" not found',
                                       {"name": name, "group": group, "kind": kind})
                self._send(200, obj)
                return
            if method == "DELETE":
                policy = query.get("propagationPolicy") or (body or {}).get("propagationPolicy")
                record.body = {"propagationPolicy": policy}
                deleted = standin._delete(kind, ns, name, policy)
                self._send(200, deleted if kind != "jobs" else {
                    "kind": "Status", "apiVersion": "v1", "status": "Success",
                    "details": {"name": name, "group": "batch", "kind": "jobs",
                                "uid": deleted["metadata"]["uid"]}})
                return
            raise StandInError(405, "MethodNotAllowed", f"{method} {path} is not supported")

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

        def do_DELETE(self) -> None:
            self._handle("DELETE")

        def do_PUT(self) -> None:
            self._handle("PUT")

    return Handler
