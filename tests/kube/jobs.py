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


class NamespaceWatch:
    """A watch on one kind of object in a namespace, started at once, that resumes from the
    last resource version it saw when the API server goes away; ``close()`` it when done.
    A subclass names the list call (``_list``) and keeps what it needs of each event."""

    name = "namespace-watch"

    def __init__(self, kube: ControlPlane, namespace: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self._stop = threading.Event()
        api = kube.api_client()
        try:
            self._version = self._list(api)(namespace).metadata.resource_version
        finally:
            api.close()
        self._thread = threading.Thread(target=self._run, daemon=True, name=self.name)
        self._thread.start()

    def _list(self, api: Any) -> Any:
        raise NotImplementedError

    def _seen(self, kind: str, obj: dict[str, Any]) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            api = self.kube.api_client()
            try:
                for event in watch.Watch().stream(self._list(api), self.namespace,
                                                  resource_version=self._version, timeout_seconds=5):
                    obj = event["raw_object"]
                    self._version = obj["metadata"]["resourceVersion"]
                    self._seen(event["type"], obj)
                    if self._stop.is_set():
                        break
            except Exception:  # the API server away (restarted, cut off): resume from _version
                self._stop.wait(1)
            finally:
                api.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(15)


class JobEvents(NamespaceWatch):
    """The namespace's Jobs as the server admitted and removed them."""

    name = "job-events"

    def __init__(self, kube: ControlPlane, namespace: str) -> None:
        #: (event type, the Job) for each ADDED and DELETED, in the order the server sent them.
        self.events: list[tuple[str, dict[str, Any]]] = []
        super().__init__(kube, namespace)

    def _list(self, api: Any) -> Any:
        from kubernetes import client

        return client.BatchV1Api(api).list_namespaced_job

    def _seen(self, kind: str, obj: dict[str, Any]) -> None:
        if kind in ("ADDED", "DELETED"):
            self.events.append((kind, obj))

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


class PodNodes(NamespaceWatch):
    """The node each build's pods were bound to (``spec.nodeName``), by the source hash
    their annotation names."""

    name = "pod-nodes"

    def __init__(self, kube: ControlPlane, namespace: str) -> None:
        #: source hash → the nodes its pods were bound to, in the order first seen.
        self.nodes: dict[str, list[str]] = {}
        super().__init__(kube, namespace)

    def _list(self, api: Any) -> Any:
        from kubernetes import client

        return client.CoreV1Api(api).list_namespaced_pod

    def _seen(self, kind: str, obj: dict[str, Any]) -> None:
        source_hash = (obj["metadata"].get("annotations") or {}).get(HASH_LABEL)
        node = (obj.get("spec") or {}).get("nodeName")
        if source_hash and node and node not in self.nodes.get(source_hash, []):
            self.nodes.setdefault(source_hash, []).append(node)
