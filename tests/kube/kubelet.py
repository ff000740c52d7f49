"""A test kubelet: one Node of the test control plane, running its pods on the Docker Engine.

Started by ``tests.kube.cluster`` beside the API server (``python -m tests.kube.kubelet``).
What it does, as a kubelet does it, through the real API server:

- registers a Node (Ready, ``kubernetes.io/{arch,os,hostname}``, InternalIP 127.0.0.1,
  its kubelet port in ``daemonEndpoints``);
- binds every pod without a ``nodeName`` whose ``nodeSelector`` its labels satisfy (there is
  no scheduler); a pod they do not satisfy stays Pending with ``PodScheduled=False``. With
  several kubelets (``ControlPlane.add_node``) each binds what its own labels satisfy, the
  first binding wins (the API server answers the others 409), and none marks a pod that
  another has bound;
- ``--arch`` makes it advertise another architecture than this host's (``kubernetes.io/arch``
  and ``nodeInfo.architecture``): a node that stands in for, say, an arm64 machine. Its
  containers still run on this host's Engine with this host's CPU; only what those
  containers run of a foreign architecture runs under the host's QEMU binfmt handlers;
- runs a bound pod's init containers, then its containers, each as a Docker container on the
  host network (the Engine here has no bridge, and the test services listen on loopback),
  with the pod's env (``value``, ``secretKeyRef``, ``configMapKeyRef``, ``fieldRef``,
  ``resourceFieldRef``, ``envFrom``), volumes (Secret, ConfigMap, projected with
  serviceAccountToken from the TokenRequest API, downwardAPI, emptyDir), command, args,
  workingDir, ``runAsUser``/``runAsGroup``, and ``resources.limits`` as the container's real
  memory (no swap) and CPU limits;
- reports what a kubelet reports: ``ErrImagePull`` / ``ImagePullBackOff`` with the Engine's
  message, ``CreateContainerConfigError``, running, terminated with the exit code, reason
  ``OOMKilled`` (the Engine's OOMKilled state), ``Error``, ``Completed`` or ``StartError``, and
  the termination message from ``terminationMessagePath`` (``FallbackToLogsOnError`` too);
  the pod's phase follows its ``restartPolicy``;
- on a pod's graceful deletion stops its containers within the grace period, removes them
  and deletes the pod with grace 0;
- serves the kubelet API over HTTPS on 127.0.0.1 (``/containerLogs/{ns}/{pod}/{container}``
  with ``follow``, ``tailLines``, ``timestamps``, ``sinceSeconds``, ``sinceTime``,
  ``limitBytes``), accepting only clients with a certificate from the cluster CA (the API
  server's ``--kubelet-client-certificate``), so ``read_namespaced_pod_log`` goes through
  the API server to here as in a cluster.

Not a kubelet: no probes, no pod sandbox (every container shares the host's network, so the
pod IP is 127.0.0.1), no image garbage collection, no node lease (nothing here runs the node
lifecycle controller). It talks to the API server with the admin credentials: the RBAC mode
has no Node authorizer, and this process stands in for the node, not for its identity.

Every Docker container it makes carries :data:`DIR_LABEL` (its state directory), so a
kubelet restarted on the same directory, and ``kube-down``, remove what it left behind (a
restarted kubelet then runs again the pods that had not finished: it adopts nothing).

``OOMKilled``: the Engine's own flag misses a few OOM kills (containerd's event comes after
the exit, or never), so on cgroup v1 a memory limit is also set on a parent cgroup of the
container's (``/sys/fs/cgroup/*/buildq-test-kubelet/<pod uid>-<container>-<attempt>``,
removed with the container) whose peak usage outlives it; elsewhere the kernel's
``oom-kill:`` lines in /dev/kmsg are read, as the kubelet's OOM watcher does.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import datetime
import json
import logging
import os
import platform
import re
import shutil
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger("buildq.test-kubelet")

DOCKER_URL = "unix:///var/run/docker.sock"
#: Labels on every container this kubelet makes.
LABEL = "io.buildq.test-kubelet"
DIR_LABEL = f"{LABEL}.dir"
UID_LABEL = f"{LABEL}.pod-uid"
NAMESPACE_LABEL = f"{LABEL}.pod-namespace"
POD_LABEL = f"{LABEL}.pod-name"
CONTAINER_LABEL = f"{LABEL}.container"
#: Every pod shares the host's network namespace: this is its IP, and the node's.
NODE_IP = "127.0.0.1"
#: The kubelet's own caps on the termination message (file, and logs on error).
MESSAGE_BYTES, FALLBACK_LINES, FALLBACK_BYTES = 4096, 80, 2048
#: The kubelet's back-off for image pulls and container restarts: 10 s doubling to 5 min.
BACKOFF_START, BACKOFF_CAP = 10.0, 300.0
#: How long a watch request lasts before it is renewed.
WATCH_SECONDS = 240
#: How long a call waits for an API server that does not answer (one being restarted).
API_OUTAGE_SECONDS = 180.0
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: How much higher than the pod's memory limit a container's own cgroup limit is (see _create).
LIMIT_MARGIN_BYTES = 256 * os.sysconf("SC_PAGE_SIZE")
#: The cgroup (in every hierarchy) under which containers with a memory limit get a parent.
CGROUP_PARENT = "buildq-test-kubelet"
#: How long a container's SIGKILL (137) waits for the kernel's OOM line to be read.
OOM_LOG_SECONDS = 5.0
UNSCHEDULABLE_MESSAGE = "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."


class ContainerConfigError(Exception):
    """What a kubelet reports as CreateContainerConfigError (a missing Secret key, say)."""


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _raw(response: Any) -> dict[str, Any]:
    data = response.data
    return json.loads(data) if data else {}


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined names replaced, ``$$`` an escaped ``$``."""
    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", one, text)


def memory_bytes(quantity: object) -> int:
    from kubernetes.utils.quantity import parse_quantity

    return int(parse_quantity(quantity))


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


class Kubelet:
    def __init__(self, *, node_name: str, directory: Path, kubeconfig: Path, pki: Path, port: int,
                 kubernetes_version: str, api_port: int, docker_url: str = DOCKER_URL,
                 arch: str | None = None) -> None:
        import docker
        from kubernetes import client, config

        self.node_name = node_name
        self.directory = directory
        self.pki = pki
        self.port = port
        self.kubernetes_version = kubernetes_version
        self.api_port = api_port
        self.docker_url = docker_url
        #: The architecture this node advertises (see the module's docstring on ``--arch``).
        self.arch = arch or _arch()
        self.api = config.new_client_from_config(config_file=str(kubeconfig))
        # Typed as Any: every call here sends and reads plain dicts (the API's JSON).
        self.core: Any = client.CoreV1Api(self.api)
        self.docker = docker.DockerClient(base_url=docker_url)
        self.node_labels = {"kubernetes.io/arch": self.arch, "kubernetes.io/os": "linux",
                            "kubernetes.io/hostname": node_name}
        self.workers: dict[str, PodWorker] = {}
        self.terminating: set[str] = set()
        self.unschedulable: set[str] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.server: ThreadingHTTPServer | None = None
        self.oom_log = KernelOomLog()

    # -- node ------------------------------------------------------------------------------

    def node_status(self) -> dict[str, Any]:
        memory_ki = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1024
        resources = {"cpu": str(os.cpu_count() or 1), "memory": f"{memory_ki}Ki", "pods": "110"}
        stamp = now()
        conditions = [{"type": kind, "status": "False", "reason": f"KubeletHas{reason}",
                       "message": message, "lastHeartbeatTime": stamp, "lastTransitionTime": stamp}
                      for kind, reason, message in (
                          ("MemoryPressure", "SufficientMemory", "kubelet has sufficient memory available"),
                          ("DiskPressure", "NoDiskPressure", "kubelet has no disk pressure"),
                          ("PIDPressure", "SufficientPID", "kubelet has sufficient PID available"))]
        conditions.append({"type": "Ready", "status": "True", "reason": "KubeletReady",
                           "message": "kubelet is posting ready status", "lastHeartbeatTime": stamp,
                           "lastTransitionTime": stamp})
        version = self.docker.version()
        return {
            "capacity": resources, "allocatable": resources, "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": NODE_IP},
                          {"type": "Hostname", "address": self.node_name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.port}},
            "nodeInfo": {
                "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": platform.release(),
                "osImage": "buildq test kubelet", "operatingSystem": "linux", "architecture": self.arch,
                "containerRuntimeVersion": f"docker://{version.get('Version', '')}",
                "kubeletVersion": self.kubernetes_version, "kubeProxyVersion": ""},
        }

    def register(self) -> None:
        from kubernetes.client.exceptions import ApiException

        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.node_name, "labels": self.node_labels}}
        try:
            self.core.create_node(node, _preload_content=False)
        except ApiException as exc:
            if exc.status != 409:
                raise
        current = _raw(self.core.read_node(self.node_name, _preload_content=False))
        current["metadata"].setdefault("labels", {}).update(self.node_labels)
        current["status"] = self.node_status()
        self.core.replace_node_status(self.node_name, current, _preload_content=False)
        log.info("node %s registered (kubelet API on %s:%d)", self.node_name, NODE_IP, self.port)

    # -- containers left behind ------------------------------------------------------------

    def remove_leftovers(self) -> int:
        """Remove the containers an earlier kubelet on this directory made."""
        return remove_containers(self.directory, self.docker_url)

    # -- pods --------------------------------------------------------------------------------

    def handle(self, kind: str, pod: dict[str, Any]) -> None:
        """One watch event (or one item of a list, as ADDED)."""
        meta, spec = pod["metadata"], pod.get("spec") or {}
        uid = meta["uid"]
        if kind == "DELETED":
            self.forget(uid)
            return
        node = spec.get("nodeName")
        if not node:
            if not meta.get("deletionTimestamp"):
                self.schedule(pod)
            return
        if node != self.node_name:
            return
        if meta.get("deletionTimestamp"):
            with self.lock:
                if uid in self.terminating:
                    return
                self.terminating.add(uid)
            threading.Thread(target=self.terminate, args=(pod,), daemon=True,
                             name=f"terminate-{meta['name']}").start()
            return
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return
        with self.lock:
            if uid in self.workers:
                return
            worker = self.workers[uid] = PodWorker(self, pod)
        worker.start()

    def schedule(self, pod: dict[str, Any]) -> None:
        """Bind the pod here, or say why not (as the scheduler would)."""
        from kubernetes.client.exceptions import ApiException

        meta, spec = pod["metadata"], pod.get("spec") or {}
        if spec.get("schedulingGates") or \
                spec.get("schedulerName", "default-scheduler") != "default-scheduler":
            return
        if not _labels_match(spec.get("nodeSelector") or {}, self.node_labels):
            if meta["uid"] in self.unschedulable:
                return
            self.unschedulable.add(meta["uid"])

            def unschedulable(status: dict[str, Any]) -> None:
                status["phase"] = "Pending"
                _set_condition(status, "PodScheduled", "False", "Unschedulable", UNSCHEDULABLE_MESSAGE)
            # Another kubelet may have bound it meanwhile: its status is that node's to tell.
            self.put_status(meta["namespace"], meta["name"], meta["uid"], unschedulable,
                            unbound_only=True)
            return
        binding = {"apiVersion": "v1", "kind": "Binding",
                   "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
                   "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name}}
        try:
            self.call(self.core.create_namespaced_pod_binding, meta["name"], meta["namespace"], binding)
        except ApiException as exc:
            if exc.status not in (404, 409):  # deleted, or bound meanwhile
                raise
        else:
            log.info("bound %s/%s", meta["namespace"], meta["name"])

    def terminate(self, pod: dict[str, Any]) -> None:
        """A graceful deletion: stop the containers within the grace period, then finish it."""
        from kubernetes.client.exceptions import ApiException

        meta = pod["metadata"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
        with self.lock:
            worker = self.workers.get(meta["uid"])
        if worker is not None:
            worker.stop(int(grace))
        self.cleanup(meta["uid"])
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                "preconditions": {"uid": meta["uid"]}}
        try:
            self.call(self.core.delete_namespaced_pod, meta["name"], meta["namespace"], body=body)
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise
        log.info("deleted %s/%s", meta["namespace"], meta["name"])

    def forget(self, uid: str) -> None:
        with self.lock:
            worker = self.workers.pop(uid, None)
            self.terminating.discard(uid)
            self.unschedulable.discard(uid)
        if worker is not None:
            worker.stop(0)
        self.cleanup(uid)

    def forget_all_but(self, uids: set[str]) -> None:
        """Forget the pods deleted while no watch was open (their DELETED event never came)."""
        with self.lock:
            gone = set(self.workers) - uids
        gone |= {c.labels.get(UID_LABEL, "") for c in self.docker.containers.list(
            all=True, filters={"label": f"{DIR_LABEL}={self.directory}"})} - uids - {""}
        for uid in gone:
            self.forget(uid)

    def cleanup(self, uid: str) -> None:
        import docker

        for container in self.docker.containers.list(all=True, filters={"label": f"{UID_LABEL}={uid}"}):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                container.remove(force=True)
            remove_cgroup(container.attrs.get("HostConfig", {}).get("CgroupParent") or "")
        for made in (CGROUP_ROOT / "memory" / CGROUP_PARENT).glob(f"{uid}-*"):  # for containers not made
            remove_cgroup(f"/{CGROUP_PARENT}/{made.name}")
        shutil.rmtree(self.directory / "pods" / uid, ignore_errors=True)

    def put_status(self, namespace: str, name: str, uid: str,
                   change: Callable[[dict[str, Any]], None], unbound_only: bool = False) -> bool:
        """Apply ``change`` to the pod's status on the server (re-read on conflicts); with
        ``unbound_only``, not once the pod is bound to a node."""
        from kubernetes.client.exceptions import ApiException

        for _ in range(20):
            try:
                pod = _raw(self.call(self.core.read_namespaced_pod, name, namespace))
            except ApiException as exc:
                if exc.status == 404:
                    return False
                raise
            if pod["metadata"]["uid"] != uid:
                return False
            if unbound_only and (pod.get("spec") or {}).get("nodeName"):
                return False
            status = pod.setdefault("status", {})
            change(status)
            try:
                self.call(self.core.replace_namespaced_pod_status, name, namespace, pod)
                return True
            except ApiException as exc:
                if exc.status == 404:
                    return False
                if exc.status != 409:
                    raise
        raise RuntimeError(f"pod {namespace}/{name}: status update kept conflicting")

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args)`` (raw answer), retried while the API server is away (restarted, say)."""
        import urllib3
        from kubernetes.client.exceptions import ApiException

        deadline = time.monotonic() + API_OUTAGE_SECONDS
        while True:
            try:
                return fn(*args, _preload_content=False, _request_timeout=30, **kwargs)
            except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
                status = getattr(exc, "status", 0) or 0
                transient = not isinstance(exc, ApiException) or status >= 500 or status in (0, 429)
                if not transient or time.monotonic() > deadline or self.stopping.is_set():
                    raise
                log.info("API server away (%s); retrying", type(exc).__name__)
                time.sleep(1)

    def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        fn = self.core.read_namespaced_secret if kind == "Secret" else self.core.read_namespaced_config_map
        try:
            return _raw(self.call(fn, name, namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def service_account_token(self, pod: dict[str, Any], source: dict[str, Any]) -> str:
        meta = pod["metadata"]
        account = (pod.get("spec") or {}).get("serviceAccountName") or "default"
        spec: dict[str, Any] = {"expirationSeconds": int(source.get("expirationSeconds") or 3600),
                                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                                                   "uid": meta["uid"]}}
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        answer = _raw(self.call(self.core.create_namespaced_service_account_token, account,
                                meta["namespace"], body))
        return str(answer["status"]["token"])

    # -- the loop ----------------------------------------------------------------------------

    def sync_forever(self) -> None:
        """List, then watch, all pods; relist when the watch is too old (410) or breaks."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        while not self.stopping.is_set():
            try:
                listing = _raw(self.core.list_pod_for_all_namespaces(_preload_content=False))
                version = listing["metadata"]["resourceVersion"]
                for pod in listing.get("items") or []:
                    self.handle("ADDED", pod)
                self.forget_all_but({pod["metadata"]["uid"] for pod in listing.get("items") or []})
                while not self.stopping.is_set():
                    w = watch.Watch()
                    for event in w.stream(self.core.list_pod_for_all_namespaces, resource_version=version,
                                          timeout_seconds=WATCH_SECONDS, allow_watch_bookmarks=True,
                                          deserialize=False):
                        obj = event["object"]
                        if isinstance(obj, str):
                            obj = json.loads(obj)
                        version = obj["metadata"].get("resourceVersion") or version
                        if event["type"] != "BOOKMARK":
                            self.handle(event["type"], obj)
                        if self.stopping.is_set():
                            w.stop()
            except ApiException as exc:
                if exc.status != 410:
                    log.warning("pod watch: %s %s; relisting", exc.status, exc.reason)
                    self.stopping.wait(1)
            except Exception:
                log.exception("pod watch broke; relisting")
                self.stopping.wait(1)

    def serve(self) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.pki / "kubelet.crt", self.pki / "kubelet.key")
        context.load_verify_locations(self.pki / "ca.crt")
        context.verify_mode = ssl.CERT_REQUIRED  # only the API server (a cluster CA client cert)
        server = ThreadingHTTPServer((NODE_IP, self.port), _handler(self))
        server.daemon_threads = True
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self.server = server
        threading.Thread(target=server.serve_forever, daemon=True, name="kubelet-api").start()

    def container_for(self, namespace: str, pod: str, name: str) -> Any | None:
        """The newest Docker container of that pod's container, if it was ever made."""
        found = self.docker.containers.list(all=True, filters={"label": [
            f"{DIR_LABEL}={self.directory}", f"{NAMESPACE_LABEL}={namespace}", f"{POD_LABEL}={pod}",
            f"{CONTAINER_LABEL}={name}"]})
        return max(found, key=lambda c: c.attrs.get("Created", "")) if found else None

    def waiting_reason(self, namespace: str, pod: str, container: str) -> str:
        """Why a container that has not started yet waits, as its status says (for the log API)."""
        with contextlib.suppress(Exception):
            found = _raw(self.call(self.core.read_namespaced_pod, pod, namespace))
            status_of_pod = found.get("status") or {}
            statuses = [*(status_of_pod.get("initContainerStatuses") or []),
                        *(status_of_pod.get("containerStatuses") or [])]
            for status in statuses:
                waiting = (status.get("state") or {}).get("waiting") or {}
                if status.get("name") == container and waiting.get("reason"):
                    return str(waiting["reason"])
        return "ContainerCreating"

    def run(self) -> None:
        removed = self.remove_leftovers()
        if removed:
            log.info("removed %d container(s) an earlier kubelet left", removed)
        self.serve()
        self.register()
        self.sync_forever()

    def shutdown(self) -> None:
        self.stopping.set()
        if self.server is not None:
            self.server.shutdown()


def remove_containers(directory: Path, docker_url: str = DOCKER_URL) -> int:
    """Remove every container a kubelet on ``directory`` made; how many."""
    import docker

    client = docker.DockerClient(base_url=docker_url)
    found = client.containers.list(all=True, filters={"label": f"{DIR_LABEL}={directory}"})
    for container in found:
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            container.remove(force=True)
        remove_cgroup(container.attrs.get("HostConfig", {}).get("CgroupParent") or "")
    return len(found)


# --- memory limits on cgroup v1 ---------------------------------------------------------------

def memory_cgroups_writable() -> bool:
    """A cgroup v1 memory hierarchy this process may make cgroups in (root, cgroupfs)."""
    memory = CGROUP_ROOT / "memory"
    return (memory / "memory.limit_in_bytes").exists() and os.access(memory, os.W_OK)


def make_memory_parent(key: str, limit: int) -> str:
    """A memory cgroup limited to ``limit`` bytes (no swap), as a Docker ``cgroup_parent``."""
    parent = f"/{CGROUP_PARENT}/{key}"
    memory = CGROUP_ROOT / "memory" / parent.lstrip("/")
    memory.mkdir(parents=True, exist_ok=True)
    (memory / "memory.limit_in_bytes").write_text(str(limit))
    if (memory / "memory.memsw.limit_in_bytes").exists():
        (memory / "memory.memsw.limit_in_bytes").write_text(str(limit))
    return parent


def memory_limit_hit(parent: str) -> bool:
    """Whether the cgroup's usage ever reached its limit (its failcnt stays 0 on this kernel,
    6.18, even when the kernel OOM-kills in it)."""
    memory = CGROUP_ROOT / "memory" / parent.lstrip("/")
    try:
        peak, limit = (int((memory / f"memory.{name}").read_text())
                       for name in ("max_usage_in_bytes", "limit_in_bytes"))
        return peak >= limit or int((memory / "memory.failcnt").read_text()) > 0
    except (OSError, ValueError):
        return False


def remove_cgroup(parent: str) -> None:
    """Remove a cgroup parent this kubelet made, in every hierarchy the Engine put it in."""
    if not parent.startswith(f"/{CGROUP_PARENT}/"):
        return
    for hierarchy in CGROUP_ROOT.iterdir():
        top = hierarchy / parent.lstrip("/")
        if not top.is_dir():
            continue
        for directory in [*sorted((p for p in top.rglob("*") if p.is_dir()), reverse=True), top]:
            with contextlib.suppress(OSError):
                directory.rmdir()


def _set_condition(status: dict[str, Any], kind: str, value: str, reason: str = "",
                   message: str = "") -> None:
    conditions = status.setdefault("conditions", []) or []
    status["conditions"] = conditions
    for condition in conditions:
        if condition.get("type") == kind:
            if condition.get("status") != value:
                condition["lastTransitionTime"] = now()
            condition["status"] = value
            break
    else:
        condition = {"type": kind, "status": value, "lastProbeTime": None, "lastTransitionTime": now()}
        conditions.append(condition)
    for key, text in (("reason", reason), ("message", message)):
        if text:
            condition[key] = text
        else:
            condition.pop(key, None)


class PodWorker:
    """Runs one pod to its end (or until it is deleted) and keeps its status on the server."""

    def __init__(self, kubelet: Kubelet, pod: dict[str, Any]) -> None:
        self.kubelet = kubelet
        self.pod = copy.deepcopy(pod)
        meta = pod["metadata"]
        self.namespace, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.spec: dict[str, Any] = pod.get("spec") or {}
        self.restart_policy = self.spec.get("restartPolicy", "Always")
        self.root = kubelet.directory / "pods" / self.uid
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.publishing = threading.Lock()
        self.running: dict[str, Any] = {}  # container name -> its Docker container now
        self.memory_parents: dict[str, str] = {}  # container name -> its limit's cgroup now
        self.statuses: dict[str, dict[str, Any]] = {}
        self.init_statuses: dict[str, dict[str, Any]] = {}
        self.phase = "Pending"
        self.started = now()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"pod-{self.name}")

    def start(self) -> None:
        self.thread.start()

    def stop(self, grace: int) -> None:
        self.stopping.set()
        with self.lock:
            running = list(self.running.values())
        stoppers = [threading.Thread(target=_stop_container, args=(c, grace), daemon=True) for c in running]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join(grace + 30)
        self.thread.join(grace + 30)

    # -- status ----------------------------------------------------------------------------

    def _status_for(self, container: dict[str, Any], state: dict[str, Any], restarts: int = 0,
                    last: dict[str, Any] | None = None, image_id: str = "", container_id: str = "",
                    ) -> dict[str, Any]:
        status: dict[str, Any] = {
            "name": container["name"], "image": container.get("image", ""), "imageID": image_id,
            "ready": "running" in state, "restartCount": restarts, "started": "running" in state,
            "state": state, "lastState": last or {}}
        if container_id:
            status["containerID"] = f"docker://{container_id}"
        return status

    def publish(self) -> None:
        # One at a time, each with what is known when it starts: the last write is the newest.
        with self.publishing:
            self._publish()

    def _publish(self) -> None:
        with self.lock:
            containers = [self.statuses[c["name"]] for c in self.spec.get("containers") or []
                          if c["name"] in self.statuses]
            inits = [self.init_statuses[c["name"]] for c in self.spec.get("initContainers") or []
                     if c["name"] in self.init_statuses]
            phase = self.phase
        initialized = all("terminated" in s["state"] and s["state"]["terminated"]["exitCode"] == 0
                          for s in inits) and len(inits) == len(self.spec.get("initContainers") or [])
        ready = bool(containers) and all(s["ready"] for s in containers) and phase == "Running"

        def change(status: dict[str, Any]) -> None:
            status.update(phase=phase, hostIP=NODE_IP, hostIPs=[{"ip": NODE_IP}], podIP=NODE_IP,
                          podIPs=[{"ip": NODE_IP}], startTime=self.started, qosClass=status.get("qosClass"))
            status["containerStatuses"] = containers
            if inits:
                status["initContainerStatuses"] = inits
            terminal = phase in ("Succeeded", "Failed")
            _set_condition(status, "PodScheduled", "True")
            _set_condition(status, "PodReadyToStartContainers", "False" if terminal else "True")
            _set_condition(status, "Initialized", "True" if initialized else "False",
                           "" if initialized else "ContainersNotInitialized",
                           "" if initialized else "containers with incomplete status: "
                           + str([c["name"] for c in self.spec.get("initContainers") or []]))
            not_ready = [s["name"] for s in containers if not s["ready"]] or \
                [c["name"] for c in self.spec.get("containers") or []]
            reason = "PodCompleted" if terminal else "ContainersNotReady"
            message = "" if terminal else f"containers with unready status: {not_ready}"
            for kind in ("ContainersReady", "Ready"):
                _set_condition(status, kind, "True" if ready else "False",
                               "" if ready else reason, "" if ready else message)
            if status.get("qosClass") is None:
                status.pop("qosClass", None)

        self.kubelet.put_status(self.namespace, self.name, self.uid, change)

    def _set(self, container: dict[str, Any], init: bool, status: dict[str, Any]) -> None:
        with self.lock:
            (self.init_statuses if init else self.statuses)[container["name"]] = status
        self.publish()

    # -- running -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._run_pod()
        except Exception:
            log.exception("pod %s/%s", self.namespace, self.name)

    def _run_pod(self) -> None:
        inits = self.spec.get("initContainers") or []
        mains = self.spec.get("containers") or []
        for container in inits:
            self.init_statuses[container["name"]] = self._status_for(
                container, {"waiting": {"reason": "PodInitializing"}})
        for container in mains:
            self.statuses[container["name"]] = self._status_for(
                container, {"waiting": {"reason": "PodInitializing" if inits else "ContainerCreating"}})
        self.publish()
        mounts = self._until_ready(self._volumes, mains)
        if mounts is None:
            return
        for container in inits:
            code = self._run_container(container, mounts, init=True)
            if code is None:
                return
            if code != 0:  # only Never gets here with a failure: the others retry
                with self.lock:
                    self.phase = "Failed"
                self.publish()
                return
        codes: dict[str, int | None] = {}
        threads = [threading.Thread(target=lambda c=c: codes.__setitem__(c["name"], self._run_container(
            c, mounts, init=False)), daemon=True) for c in mains]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self.stopping.is_set() and any(code is None for code in codes.values()):
            return
        with self.lock:
            self.phase = "Succeeded" if all(code == 0 for code in codes.values()) else "Failed"
        self.publish()

    def _until_ready(self, prepare: Callable[[], dict[str, Path]], containers: list[dict[str, Any]],
                     ) -> dict[str, Path] | None:
        """``prepare()``, retried while it fails on a missing object (reported as a kubelet does)."""
        while not self.stopping.is_set():
            try:
                return prepare()
            except ContainerConfigError as exc:
                for container in containers:
                    self._set(container, False, self._status_for(
                        container, {"waiting": {"reason": "ContainerCreating", "message": str(exc)}}))
            self.stopping.wait(2)
        return None

    def _run_container(self, container: dict[str, Any], mounts: dict[str, Path], init: bool) -> int | None:
        """Run one container until it is done under the restart policy; its last exit code."""
        import docker

        restarts = 0
        last: dict[str, Any] = {}
        backoff = BACKOFF_START
        while not self.stopping.is_set():
            image_id = self._pull(container, init, restarts, last)
            if image_id is None:
                return None
            try:
                env = self._env(container)
            except ContainerConfigError as exc:
                self._set(container, init, self._status_for(
                    container, {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}},
                    restarts, last, image_id))
                self.stopping.wait(2)
                continue
            attempt = f"{restarts}"
            log_file = self.root / "containers" / container["name"] / attempt / "termination-log"
            log_file.parent.mkdir(parents=True, exist_ok=True)
            log_file.write_bytes(b"")
            log_file.chmod(0o666)
            started = now()
            try:
                made = self._create(container, env, mounts, log_file, attempt)
            except docker.errors.APIError as exc:
                self._set(container, init, self._status_for(
                    container, {"waiting": {"reason": "CreateContainerError", "message": exc.explanation
                                            or str(exc)}}, restarts, last, image_id))
                if self.stopping.wait(BACKOFF_START):
                    return None
                continue
            with self.lock:
                self.running[container["name"]] = made
            if self.stopping.is_set():
                return None
            try:
                made.start()
            except docker.errors.APIError as exc:
                state = {"terminated": {"exitCode": 128, "reason": "StartError",
                                        "message": exc.explanation or str(exc), "startedAt": started,
                                        "finishedAt": now(), "containerID": f"docker://{made.id}"}}
                code = 128
            else:
                made.reload()
                started = made.attrs["State"].get("StartedAt") or started
                if not init:
                    with self.lock:
                        self.phase = "Running"  # Pending until a container of its own has started
                self._set(container, init, self._status_for(
                    container, {"running": {"startedAt": _seconds(started)}}, restarts, last, image_id,
                    made.id))
                made.wait()
                made.reload()
                state, code = self._terminated(container, made, log_file)
            with self.lock:
                self.running.pop(container["name"], None)
            self._set(container, init, self._status_for(container, state, restarts, last, image_id, made.id))
            again = self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and code != 0)
            if self.stopping.is_set() or not again:
                return code
            restarts, last = restarts + 1, state
            self._set(container, init, self._status_for(container, {"waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off {backoff:.0f}s restarting failed container={container['name']} "
                           f"pod={self.name}_{self.namespace}({self.uid})"}}, restarts, last, image_id))
            if self.stopping.wait(backoff):
                return None
            backoff = min(backoff * 2, BACKOFF_CAP)
        return None

    def _terminated(self, container: dict[str, Any], made: Any, log_file: Path) -> tuple[dict[str, Any], int]:
        state = made.attrs["State"]
        code = int(state.get("ExitCode", 0))
        # The Engine's OOMKilled flag misses some OOM kills (containerd's event lands after the
        # exit, or never: 4 in 60 here). A SIGKILL (137) this kubelet did not send is an OOM
        # kill if the limit's cgroup was pushed to its limit, or (without one) if the kernel
        # logged killing in the container (its log is rate-limited, hence not first choice).
        parent = self.memory_parents.pop(container["name"], None)
        killed_for_memory = bool(state.get("OOMKilled")) or (
            code == 137 and not self.stopping.is_set()
            and (memory_limit_hit(parent) if parent else self.kubelet.oom_log.killed(made.id)))
        if killed_for_memory and not state.get("OOMKilled"):
            log.info("%s/%s %s: OOMKilled (the Engine missed it)", self.namespace, self.name,
                     container["name"])
        reason = "OOMKilled" if killed_for_memory else ("Completed" if code == 0 else "Error")
        message = log_file.read_bytes()[:MESSAGE_BYTES].decode(errors="replace")
        if not message and code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            tail = made.logs(stdout=True, stderr=True, tail=FALLBACK_LINES)
            message = tail[-FALLBACK_BYTES:].decode(errors="replace")
        terminated: dict[str, Any] = {"exitCode": code, "reason": reason,
                                      "startedAt": _seconds(state.get("StartedAt") or ""),
                                      "finishedAt": _seconds(state.get("FinishedAt") or ""),
                                      "containerID": f"docker://{made.id}"}
        if message:
            terminated["message"] = message
        return {"terminated": terminated}, code

    def _pull(self, container: dict[str, Any], init: bool, restarts: int, last: dict[str, Any]) -> str | None:
        """The image's ID once it is here, pulling as ``imagePullPolicy`` says (with back-off)."""
        import docker

        image = container.get("image", "")
        policy = container.get("imagePullPolicy") or "IfNotPresent"
        backoff = BACKOFF_START
        while not self.stopping.is_set():
            if policy != "Always":
                with contextlib.suppress(docker.errors.ImageNotFound):
                    return str(self.kubelet.docker.images.get(image).id)
                if policy == "Never":
                    self._set(container, init, self._status_for(container, {"waiting": {
                        "reason": "ErrImageNeverPull",
                        "message": f'Container image "{image}" is not present with pull policy of Never'}},
                        restarts, last))
                    self.stopping.wait(BACKOFF_START)
                    continue
            try:
                return self._pull_now(image)
            except docker.errors.APIError as exc:
                detail = exc.explanation or str(exc)
            message = f'Failed to pull image "{image}": {detail}'
            self._set(container, init, self._status_for(
                container, {"waiting": {"reason": "ErrImagePull", "message": message}}, restarts, last))
            if self.stopping.wait(1):
                return None
            self._set(container, init, self._status_for(container, {"waiting": {
                "reason": "ImagePullBackOff", "message": f'Back-off pulling image "{image}": ErrImagePull: '
                                                         f"{detail}"}}, restarts, last))
            if self.stopping.wait(backoff):
                return None
            backoff = min(backoff * 2, BACKOFF_CAP)
        return None

    def _pull_now(self, image: str) -> str:
        from docker.utils import parse_repository_tag

        repository, tag = parse_repository_tag(image)
        auth = self._pull_credentials(repository)
        pulled = self.kubelet.docker.images.pull(repository, tag=tag or "latest", auth_config=auth)
        return str(pulled.id)

    def _pull_credentials(self, repository: str) -> dict[str, str] | None:
        """The first ``imagePullSecrets`` entry for the image's registry, as a kubelet picks it."""
        host = repository.split("/", 1)[0] if "/" in repository else "docker.io"
        for ref in self.spec.get("imagePullSecrets") or []:
            secret = self.kubelet.read("Secret", self.namespace, ref.get("name", ""))
            data = (secret or {}).get("data") or {}
            raw = data.get(".dockerconfigjson") or data.get(".dockercfg")
            if not raw:
                continue
            config = json.loads(base64.b64decode(raw))
            for server, entry in (config.get("auths", config) or {}).items():
                if server.removeprefix("https://").removeprefix("http://").split("/", 1)[0] != host:
                    continue
                if entry.get("auth"):
                    user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
                else:
                    user, password = entry.get("username", ""), entry.get("password", "")
                return {"username": user, "password": password}
        return None

    def _create(self, container: dict[str, Any], env: dict[str, str], volumes: dict[str, Path],
                log_file: Path, attempt: str) -> Any:
        import docker

        binds: list[Any] = []
        for mount in container.get("volumeMounts") or []:
            source = volumes.get(mount["name"])
            if source is None:
                raise ContainerConfigError(f'volume "{mount["name"]}" is not defined')
            if mount.get("subPath"):
                source = source / mount["subPath"]
                if not source.exists():
                    source.mkdir(parents=True)
            binds.append(docker.types.Mount(mount["mountPath"], str(source), type="bind",
                                            read_only=bool(mount.get("readOnly"))))
        binds.append(docker.types.Mount(container.get("terminationMessagePath") or "/dev/termination-log",
                                        str(log_file), type="bind"))
        limits = (container.get("resources") or {}).get("limits") or {}
        options: dict[str, Any] = {}
        if "memory" in limits:
            limit = memory_bytes(limits["memory"])
            options["mem_limit"] = options["memswap_limit"] = limit
        if "memory" in limits and memory_cgroups_writable():
            # The limit also goes on a parent cgroup, which outlives the container: its peak usage
            # says the limit was hit (see _terminated). The container's own is a little higher
            # (more than the kernel's charge batch, 64 pages), so the parent's is the one reached.
            parent = make_memory_parent(f"{self.uid}-{container['name']}-{attempt}", limit)
            options["cgroup_parent"] = self.memory_parents[container["name"]] = parent
            options["mem_limit"] = options["memswap_limit"] = limit + LIMIT_MARGIN_BYTES
        if "cpu" in limits:
            from kubernetes.utils.quantity import parse_quantity

            options["nano_cpus"] = int(parse_quantity(limits["cpu"]) * 10**9)
        user = self._user(container)
        if user:
            options["user"] = user
        if container.get("workingDir"):
            options["working_dir"] = container["workingDir"]
        command = [expand(part, env) for part in container.get("command") or []]
        args = [expand(part, env) for part in container.get("args") or []]
        labels = {DIR_LABEL: str(self.kubelet.directory), UID_LABEL: self.uid,
                  NAMESPACE_LABEL: self.namespace, POD_LABEL: self.name, CONTAINER_LABEL: container["name"]}
        return self.kubelet.docker.containers.create(
            container["image"], command=args or None, entrypoint=command or None,
            environment=[f"{k}={v}" for k, v in env.items()], mounts=binds, network_mode="host",
            labels=labels, name=f"k8s_{container['name']}_{self.name}_{self.namespace}_{self.uid}_{attempt}",
            tty=bool(container.get("tty")), stdin_open=bool(container.get("stdin")), **options)

    def _user(self, container: dict[str, Any]) -> str:
        pod_context = self.spec.get("securityContext") or {}
        context = {**pod_context, **(container.get("securityContext") or {})}
        user, group = context.get("runAsUser"), context.get("runAsGroup")
        if user is None:
            return ""
        return f"{user}:{group}" if group is not None else str(user)

    # -- env and volumes ---------------------------------------------------------------------

    def _object(self, kind: str, name: str, optional: bool) -> dict[str, bytes] | None:
        found = self.kubelet.read(kind, self.namespace, name)
        if found is None:
            if optional:
                return None
            raise ContainerConfigError(f'{kind.lower()} "{name}" not found')
        values = {k: base64.b64decode(v) for k, v in (found.get("data") or {}).items()} if kind == "Secret" \
            else {**{k: v.encode() for k, v in (found.get("data") or {}).items()},
                  **{k: base64.b64decode(v) for k, v in (found.get("binaryData") or {}).items()}}
        return values

    def _key(self, kind: str, ref: dict[str, Any]) -> str | None:
        optional = bool(ref.get("optional"))
        values = self._object(kind, ref.get("name", ""), optional)
        if values is None:
            return None
        if ref["key"] not in values:
            if optional:
                return None
            raise ContainerConfigError(
                f"couldn't find key {ref['key']} in {kind} {self.namespace}/{ref.get('name')}")
        return values[ref["key"]].decode()

    def field(self, path: str) -> str:
        meta = self.pod["metadata"]
        match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if match:
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        if path in ("metadata.labels", "metadata.annotations"):
            items = meta.get(path.split(".")[1]) or {}
            return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
        values = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
                  "metadata.uid": meta["uid"], "spec.nodeName": self.kubelet.node_name,
                  "spec.serviceAccountName": self.spec.get("serviceAccountName", ""),
                  "status.hostIP": NODE_IP, "status.hostIPs": NODE_IP, "status.podIP": NODE_IP,
                  "status.podIPs": NODE_IP}
        if path not in values:
            raise ContainerConfigError(f"unsupported fieldRef fieldPath {path!r}")
        return values[path]

    def resource(self, ref: dict[str, Any], container: dict[str, Any] | None) -> str:
        from kubernetes.utils.quantity import parse_quantity

        if container is None:
            named = [c for c in self.spec.get("containers") or [] if c["name"] == ref.get("containerName")]
            container = named[0] if named else {}
        kind, _, resource = ref["resource"].partition(".")
        value = ((container.get("resources") or {}).get(kind) or {}).get(resource)
        if value is None:  # unset: the node's allocatable, as a kubelet reports it
            value = self.kubelet.node_status()["allocatable"].get(resource, "0")
        divisor = parse_quantity(ref.get("divisor") or "1")
        quotient = parse_quantity(value) / divisor
        return str(int(-(-quotient // 1)))  # rounded up, as the kubelet does

    def _env(self, container: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {
            # The `kubernetes` Service's cluster IP is not routed here; pods share the host's
            # network, where the API server listens: what in-cluster clients need to find it.
            "KUBERNETES_SERVICE_HOST": NODE_IP, "KUBERNETES_SERVICE_PORT": str(self.kubelet.api_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(self.kubelet.api_port),
            "KUBERNETES_PORT": f"tcp://{NODE_IP}:{self.kubelet.api_port}",
        }
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if key in source:
                    ref = source[key]
                    values = self._object(kind, ref.get("name", ""), bool(ref.get("optional"))) or {}
                    env.update({f"{prefix}{k}": v.decode() for k, v in values.items()})
        for item in container.get("env") or []:
            if "valueFrom" not in item:
                env[item["name"]] = expand(str(item.get("value", "")), env)
                continue
            source = item["valueFrom"]
            value: str | None
            if "secretKeyRef" in source:
                value = self._key("Secret", source["secretKeyRef"])
            elif "configMapKeyRef" in source:
                value = self._key("ConfigMap", source["configMapKeyRef"])
            elif "fieldRef" in source:
                value = self.field(source["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in source:
                value = self.resource(source["resourceFieldRef"], container)
            else:
                raise ContainerConfigError(f"env {item['name']}: unsupported valueFrom {sorted(source)}")
            if value is not None:
                env[item["name"]] = value
        return env

    def _volumes(self) -> dict[str, Path]:
        """Each volume as a host directory (made afresh), by name."""
        made: dict[str, Path] = {}
        for volume in self.spec.get("volumes") or []:
            target = self.root / "volumes" / volume["name"]
            if "emptyDir" in volume:
                target.mkdir(parents=True, exist_ok=True)
                target.chmod(0o777)
            elif "secret" in volume or "configMap" in volume:
                kind, key = ("Secret", "secret") if "secret" in volume else ("ConfigMap", "configMap")
                source = volume[key]
                name = source.get("secretName" if kind == "Secret" else "name", "")
                self._write(target, self._projected(kind, name, source), source.get("defaultMode"))
            elif "projected" in volume:
                files: dict[str, tuple[bytes, int | None]] = {}
                for source in volume["projected"].get("sources") or []:
                    if "secret" in source:
                        files.update(self._projected("Secret", source["secret"].get("name", ""),
                                                     source["secret"]))
                    elif "configMap" in source:
                        files.update(self._projected("ConfigMap", source["configMap"].get("name", ""),
                                                     source["configMap"]))
                    elif "downwardAPI" in source:
                        files.update(self._downward(source["downwardAPI"]))
                    elif "serviceAccountToken" in source:
                        token_source = source["serviceAccountToken"]
                        token = self.kubelet.service_account_token(self.pod, token_source)
                        files[token_source["path"]] = (token.encode(), None)
                    else:
                        raise ContainerConfigError(
                            f"volume {volume['name']}: unsupported projection {sorted(source)}")
                self._write(target, files, volume["projected"].get("defaultMode"))
            elif "downwardAPI" in volume:
                self._write(target, self._downward(volume["downwardAPI"]),
                            volume["downwardAPI"].get("defaultMode"))
            elif "hostPath" in volume:
                target = Path(volume["hostPath"]["path"])
            else:
                raise ContainerConfigError(f"volume {volume['name']}: unsupported type "
                                           f"{sorted(set(volume) - {'name'})}")
            made[volume["name"]] = target
        return made

    def _projected(self, kind: str, name: str, source: dict[str, Any]) -> dict[str, tuple[bytes, int | None]]:
        values = self._object(kind, name, bool(source.get("optional")))
        if values is None:
            return {}
        items = source.get("items")
        if not items:
            return {key: (value, None) for key, value in values.items()}
        files: dict[str, tuple[bytes, int | None]] = {}
        for item in items:
            if item["key"] not in values:
                if source.get("optional"):
                    continue
                raise ContainerConfigError(
                    f"couldn't find key {item['key']} in {kind} {self.namespace}/{name}")
            files[item["path"]] = (values[item["key"]], item.get("mode"))
        return files

    def _downward(self, source: dict[str, Any]) -> dict[str, tuple[bytes, int | None]]:
        files: dict[str, tuple[bytes, int | None]] = {}
        for item in source.get("items") or []:
            if "fieldRef" in item:
                value = self.field(item["fieldRef"]["fieldPath"])
            else:
                value = self.resource(item["resourceFieldRef"], None)
            files[item["path"]] = (value.encode(), item.get("mode"))
        return files

    def _write(self, target: Path, files: dict[str, tuple[bytes, int | None]],
               default_mode: int | None) -> None:
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        target.chmod(0o755)
        for relative, (content, mode) in files.items():
            path = target / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            path.chmod(mode if mode is not None else default_mode if default_mode is not None else 0o644)


class KernelOomLog:
    """The containers the kernel OOM-killed, from its ``oom-kill:`` lines in /dev/kmsg (as
    the kubelet's OOM watcher reads them), by the container ID ending ``task_memcg``."""

    PATTERN = re.compile(r"oom-kill:.*?task_memcg=[^,]*?([0-9a-f]{64})")

    def __init__(self) -> None:
        self._killed: set[str] = set()
        self._changed = threading.Condition()
        try:
            self._fd = os.open("/dev/kmsg", os.O_RDONLY)
            os.lseek(self._fd, 0, os.SEEK_END)  # only what is logged from now on
        except OSError as exc:
            log.warning("no /dev/kmsg (%s): OOMKilled only as the Engine reports it", exc)
            return
        threading.Thread(target=self._read, daemon=True, name="kmsg-oom").start()

    def _read(self) -> None:
        while True:
            try:
                record = os.read(self._fd, 8192)  # one record per read
            except BrokenPipeError:  # records overwritten before they were read
                continue
            except OSError:
                return
            found = self.PATTERN.search(record.decode(errors="replace"))
            if found:
                with self._changed:
                    self._killed.add(found.group(1))
                    self._changed.notify_all()

    def killed(self, container_id: str, wait: float = OOM_LOG_SECONDS) -> bool:
        """Whether the kernel OOM-killed in that container; the line precedes the exit, but
        the reader may not have reached it yet."""
        with self._changed:
            return self._changed.wait_for(lambda: container_id in self._killed, wait)


def _seconds(stamp: str) -> str:
    """The Engine's RFC 3339 with nanoseconds, as the API's seconds."""
    return stamp[:19] + "Z" if len(stamp) >= 19 and not stamp.startswith("0001") else now()


def _stop_container(container: Any, grace: int) -> None:
    import docker

    with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
        container.stop(timeout=grace)


# --- the kubelet API ------------------------------------------------------------------------

def _handler(kubelet: Kubelet) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # a streamed body ends when the connection closes

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("kubelet API: " + format, *args)

        def _text(self, code: int, text: str) -> None:
            body = text.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            # The API server (its client) may go away mid-stream.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError, ssl.SSLError):
                self._get()

        def _get(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if url.path in ("/healthz", "/readyz", "/livez"):
                self._text(200, "ok")
                return
            parts = [unquote(p) for p in url.path.split("/") if p]
            if len(parts) != 4 or parts[0] != "containerLogs":
                self._text(404, f"404 page not found: {url.path}")
                return
            _, namespace, pod, name = parts
            container = kubelet.container_for(namespace, pod, name)
            if container is None:
                self._text(400, f'container "{name}" in pod "{pod}" is waiting to start: '
                                f"{kubelet.waiting_reason(namespace, pod, name)}")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            for chunk in _logs(container, query):
                self.wfile.write(chunk)
                self.wfile.flush()

    return Handler


def _logs(container: Any, query: dict[str, str]) -> Iterator[bytes]:
    """The container's log as ``/containerLogs`` answers it."""
    options: dict[str, Any] = {"stdout": True, "stderr": True, "stream": True,
                               "follow": query.get("follow") == "true",
                               "timestamps": query.get("timestamps") == "true"}
    if query.get("tailLines"):
        options["tail"] = int(query["tailLines"])
    if query.get("sinceSeconds"):
        options["since"] = int(time.time()) - int(query["sinceSeconds"])
    elif query.get("sinceTime"):
        options["since"] = datetime.datetime.fromisoformat(query["sinceTime"].replace("Z", "+00:00"))
    limit = int(query["limitBytes"]) if query.get("limitBytes") else None
    sent = 0
    stream = container.logs(**options)
    try:
        for chunk in stream:
            if limit is not None:
                chunk = chunk[: limit - sent]
            sent += len(chunk)
            yield chunk
            if limit is not None and sent >= limit:
                return
    finally:
        with contextlib.suppress(Exception):
            stream.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.kube.kubelet", description="A test kubelet.")
    parser.add_argument("--node-name", default="buildq-node")
    parser.add_argument("--directory", type=Path, required=True, help="state (volumes, termination logs)")
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--pki", type=Path, required=True, help="ca.crt, kubelet.crt, kubelet.key")
    parser.add_argument("--port", type=int, required=True, help="kubelet API port on 127.0.0.1")
    parser.add_argument("--api-port", type=int, required=True, help="the API server's port, for pods")
    parser.add_argument("--kubernetes-version", default="v0.0.0")
    parser.add_argument("--arch", help="the architecture the node advertises (default: this host's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args.directory.mkdir(parents=True, exist_ok=True)
    kubelet = Kubelet(node_name=args.node_name, directory=args.directory.resolve(),
                      kubeconfig=args.kubeconfig, pki=args.pki, port=args.port,
                      kubernetes_version=args.kubernetes_version, api_port=args.api_port,
                      arch=args.arch)

    def stop(signum: int, frame: object) -> None:
        kubelet.stopping.set()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    kubelet.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
