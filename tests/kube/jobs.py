"""What the real API server says happened to the Jobs of one namespace, for tests that
count them: every Job admitted (ADDED) and removed (DELETED), in order, from a watch that
resumes where it was when the API server goes away (restarted, behind a fault proxy); and
which node each build's pods were bound to (they are deleted with their Job, so a test
reads it while they live)."""

from __future__ import annotations

import threading
from typing import Any

from config.names import HASH_LABEL
from tests.kube.cluster import ControlPlane


class JobEvents:
    """A watch on the namespace's Jobs, started at once; ``close()`` it when done."""

    def __init__(self, kube: ControlPlane, namespace: str) -> None:
        from kubernetes import client

        self.kube = kube
        self.namespace = namespace
        #: (event type, the Job) for each ADDED and DELETED, in the order the server sent them.
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._stop = threading.Event()
        api = kube.api_client()
        try:
            batch: Any = client.BatchV1Api(api)
            self._version = batch.list_namespaced_job(namespace).metadata.resource_version
        finally:
            api.close()
        self._thread = threading.Thread(target=self._run, daemon=True, name="job-events")
        self._thread.start()

    def _run(self) -> None:
        from kubernetes import client, watch

        while not self._stop.is_set():
            api = self.kube.api_client()
            try:
                batch: Any = client.BatchV1Api(api)
                for event in watch.Watch().stream(batch.list_namespaced_job, self.namespace,
                                                  resource_version=self._version, timeout_seconds=5):
                    job = event["raw_object"]
                    self._version = job["metadata"]["resourceVersion"]
                    if event["type"] in ("ADDED", "DELETED"):
                        self.events.append((event["type"], job))
                    if self._stop.is_set():
                        break
            except Exception:  # the API server away (restarted, cut off): resume from _version
                self._stop.wait(1)
            finally:
                api.close()

    @property
    def added(self) -> list[dict[str, Any]]:
        return [job for kind, job in self.events if kind == "ADDED"]

    def of(self, source_hash: str) -> list[str]:
        """The uids of the Jobs created for a build."""
        return [job["metadata"]["uid"] for job in self.added
                if (job["metadata"].get("annotations") or {}).get(HASH_LABEL) == source_hash]

    def most_at_once(self) -> int:
        """The most Jobs that existed at the same time."""
        live, most = 0, 0
        for kind, _ in self.events:
            live += 1 if kind == "ADDED" else -1
            most = max(most, live)
        return most

    def close(self) -> None:
        self._stop.set()
        self._thread.join(15)


class PodNodes:
    """A watch on the namespace's pods, started at once: the node each build's pods were
    bound to (``spec.nodeName``), by the source hash their annotation names; ``close()`` it."""

    def __init__(self, kube: ControlPlane, namespace: str) -> None:
        from kubernetes import client

        self.kube = kube
        self.namespace = namespace
        #: source hash → the nodes its pods were bound to, in the order first seen.
        self.nodes: dict[str, list[str]] = {}
        self._stop = threading.Event()
        api = kube.api_client()
        try:
            core: Any = client.CoreV1Api(api)
            self._version = core.list_namespaced_pod(namespace).metadata.resource_version
        finally:
            api.close()
        self._thread = threading.Thread(target=self._run, daemon=True, name="pod-nodes")
        self._thread.start()

    def _run(self) -> None:
        from kubernetes import client, watch

        while not self._stop.is_set():
            api = self.kube.api_client()
            try:
                core: Any = client.CoreV1Api(api)
                for event in watch.Watch().stream(core.list_namespaced_pod, self.namespace,
                                                  resource_version=self._version, timeout_seconds=5):
                    pod = event["raw_object"]
                    self._version = pod["metadata"]["resourceVersion"]
                    source_hash = (pod["metadata"].get("annotations") or {}).get(HASH_LABEL)
                    node = (pod.get("spec") or {}).get("nodeName")
                    if source_hash and node and node not in self.nodes.get(source_hash, []):
                        self.nodes.setdefault(source_hash, []).append(node)
                    if self._stop.is_set():
                        break
            except Exception:  # the API server away: resume from _version
                self._stop.wait(1)
            finally:
                api.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(15)
