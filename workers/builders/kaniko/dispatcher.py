"""Running one Kaniko Job to the end: create it (adopting it on 409), follow it, and
delete it with its pods whatever happens."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from config.errors import BuildError, BuildqError, TransientError
from config.names import HASH_LABEL
from config.schema import LaunchConfig
from config.settings import Settings
from workers.builders.kaniko.follower import CancelOnTerminate, JobFollower, KanikoCancelledError
from workers.builders.kaniko.manifest import KanikoRequest, render_job, resolve_namespace
from workers.kube import Kube, KubeConflictError, KubeNotFoundError, new_api_client

logger = logging.getLogger("buildq.kaniko")


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
        with CancelOnTerminate(f"{namespace}/{name}").installed() as cancel:
            try:
                job = self._create_or_adopt(kube, namespace, manifest, request, say)
                digest = JobFollower(kube, namespace, job, manifest, say).run()
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
            logger.warning(log_line)

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
