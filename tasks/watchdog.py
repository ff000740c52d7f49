"""The watchdog's side of the build protocol: who restarts a build whose worker died.

A holder that dies stops renewing its lease; its lock expires while requests still
wait in the hash's pending map, and :func:`restart_orphans` gives the lock to one of
them (see :mod:`tasks.lock`). A request that died before it took a lock is found by
its in-flight lease instead (see :mod:`tasks.inflight`). Kaniko Jobs outlive the worker
that dispatched them; :func:`sweep_kaniko_jobs` deletes the finished ones no build holds.

The control and kaniko pools call these from a thread (``tasks/cli/pools.py``); nothing
here knows about threads or processes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import redis

from config.names import HASH_LABEL
from config.settings import Settings
from tasks.app import ROUTES
from tasks.inflight import lost_submissions, reclaim_orphans
from tasks.keys import answered_key, lock_key
from tasks.lock import orphaned_hashes, take_over
from tasks.stages import build_image, resume
from tasks.state import BuildState
from workers import metrics

log = logging.getLogger("buildq.pool")


class JobApi(Protocol):
    """What the Job sweep needs of a Kubernetes client (``workers.kube.Kube`` has it)."""

    def list_jobs(self, namespace: str, selector: str) -> list[dict[str, Any]]: ...

    def delete_job(self, namespace: str, name: str) -> None: ...


def redis_uptime(client: redis.Redis) -> float:
    """Seconds since the Redis server started (infinite when it does not say)."""
    return float(client.info("server").get("uptime_in_seconds", math.inf))


def restart_orphans(client: redis.Redis, settings: Settings) -> int:
    """Give each hash whose holder died to one of its waiters, and restart each request
    lost before it took a lock; returns how many restarted."""
    if redis_uptime(client) < settings.lock_lease:
        # Every lease ran out while Redis was down, the live holders' too. They renew (and
        # retake) theirs within a third of a lease of its return: until a lease has passed,
        # an expired lease says nothing about its holder, and a takeover would build again.
        return 0
    restarted = 0
    for source_hash in orphaned_hashes(client):
        claim = take_over(client, source_hash, settings.lock_lease)
        if claim is None:
            continue
        token, pending = claim
        oldest = min(pending.values(), key=lambda r: float(r.get("created_at", 0)))
        state = BuildState.from_dict(oldest)
        state.token = token
        log.warning("holder of %s is gone; restarting the build for request %s",
                    source_hash[:12], state.request_id)
        resume.apply_async(args=[state.to_dict()])
        metrics.takeover()
        restarted += 1
    for request_id, sent in lost_submissions(client, ROUTES["buildq.build_image"],
                                             settings.lock_lease):
        # Sent, never taken by a worker, and no longer queued: its message was lost.
        if client.exists(answered_key(request_id)):
            continue
        log.warning("request %s was lost between the broker and a worker; sending it again",
                    request_id)
        # The same id (its caller waits on it) and headers (who asked); with signing on,
        # this worker signs the copy.
        build_image.apply_async(args=[sent["source"]], kwargs=sent["options"],
                                task_id=request_id, headers=sent.get("headers") or {})
        metrics.takeover()
        restarted += 1
    for data in reclaim_orphans(client, settings.lock_lease):
        # Died while fetching or hashing, before the lock could keep it.
        log.warning("request %s was lost with its worker before it took a lock; restarting it",
                    data.get("request_id"))
        resume.apply_async(args=[data])
        metrics.takeover()
        restarted += 1
    return restarted


def _ended_at(job: Mapping[str, Any]) -> datetime | None:
    """When a Job completed or failed (naive UTC), or None while it runs."""
    ended = [c for c in (job.get("status") or {}).get("conditions") or []
             if c.get("status") == "True" and c.get("type") in ("Complete", "Failed")]
    if not ended:
        return None
    try:
        return datetime.strptime(str(ended[0].get("lastTransitionTime")), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None


def abandoned_jobs(client: redis.Redis, jobs: Iterable[Mapping[str, Any]],
                   lease_seconds: float) -> list[tuple[str, str]]:
    """(name, source hash) of each Job that finished over a lease ago and no build holds."""
    now = datetime.now(UTC).replace(tzinfo=None)
    found = []
    for job in jobs:
        meta = job.get("metadata") or {}
        source_hash = (meta.get("annotations") or {}).get(HASH_LABEL)
        if not source_hash:
            continue
        at = _ended_at(job)
        # A holder that lost its lock a moment ago may still be reading the Job's verdict.
        if at is None or (now - at).total_seconds() < lease_seconds:
            continue
        if client.exists(lock_key(source_hash)):
            continue
        found.append((str(meta.get("name")), str(source_hash)))
    return found


def sweep_kaniko_jobs(client: redis.Redis, settings: Settings, kube: JobApi) -> int:
    """Delete finished Kaniko Jobs whose build nobody holds; returns how many.

    A dispatcher deletes its Job whatever happens, unless its worker is killed first.
    The chain that takes over adopts a Job that still runs; one that already pushed
    makes it skip the build instead, and that Job (with its pod) would wait for
    ttlSecondsAfterFinished. Only Jobs in the pool's default namespace are swept.
    """
    # Imported on use: only kaniko workers sweep, and the kaniko package is slow to import.
    from workers.builders.kaniko.manifest import MANAGED_LABELS

    namespace = settings.kube_namespace
    managed_by = "app.kubernetes.io/managed-by"
    jobs = kube.list_jobs(namespace, f"{managed_by}={MANAGED_LABELS[managed_by]}")
    swept = 0
    for name, source_hash in abandoned_jobs(client, jobs, settings.lock_lease):
        log.warning("deleting Kaniko Job %s/%s: it finished and no build holds %s",
                    namespace, name, source_hash[:12])
        kube.delete_job(namespace, name)
        swept += 1
    return swept
