"""Entry points of the three pools: ``buildq worker control|docker|kaniko``.

Each is a Celery worker bound to its pool's queues, with task events on for
Flower. Control workers also run the watchdog that restarts builds whose holder
died (see :mod:`tasks.lock`) and sweeps scratch directories nobody will use again.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from typing import Any

from config.errors import ServiceError
from config.settings import Settings
from workers import metrics

log = logging.getLogger("buildq.pool")

POOLS = ("control", "docker", "kaniko")


def check_pool_can_start(pool: str) -> None:
    if pool == "docker":
        from workers.builders import engine_available

        if not engine_available():
            raise ServiceError(
                "the docker pool needs a Docker Engine, and none answers here.",
                "Start dockerd (or set DOCKER_HOST to a reachable engine), then start the worker.",
            )


class Watchdog(threading.Thread):
    """Restarts orphaned builds, renews this worker's presence, sweeps stale scratch dirs."""

    def __init__(self, settings: Settings, pool: str, hostname: str) -> None:
        super().__init__(name="buildq-watchdog", daemon=True)
        self.settings = settings
        self.pool = pool
        self.hostname = hostname
        self.stopping = threading.Event()
        self.interval = max(0.5, min(10.0, settings.lock_lease / 3))
        self.kube: Any = None
        self.last_job_sweep = time.monotonic()
        if pool == "kaniko":
            # Imported here, before the pool forks: a fork while this thread held the
            # import lock (kubernetes takes a while to import) would deadlock the child.
            import workers.builders.kaniko
            import workers.kube  # noqa: F401

    def run(self) -> None:
        from tasks.connection import redis_client

        client = redis_client(self.settings)
        while True:
            try:
                self.tick(client)
            except Exception:
                log.warning("watchdog tick failed", exc_info=True)
            if self.stopping.wait(self.interval):
                return

    def tick(self, client: Any) -> None:
        from workers.presence import announce

        announce(client, self.pool, self.hostname)
        metrics.heartbeat()
        if self.pool == "control":
            restart_orphans(client, self.settings)
            sweep_workdir(self.settings)
        if self.pool == "kaniko" and time.monotonic() - self.last_job_sweep >= self.settings.lock_lease:
            # One list request per lease is plenty: orphaned Jobs are rare.
            self.last_job_sweep = time.monotonic()
            if self.kube is None:
                from workers.kube import Kube, new_api_client

                self.kube = Kube(new_api_client())
            sweep_kaniko_jobs(client, self.settings, self.kube)


def restart_orphans(client: Any, settings: Settings) -> int:
    """Give each hash whose holder died to one of its waiters, and restart each request
    lost before it took a lock; returns how many restarted."""
    from tasks.inflight import reclaim_orphans
    from tasks.lock import orphaned_hashes, take_over
    from tasks.stages import resume
    from tasks.state import BuildState

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
    for data in reclaim_orphans(client, settings.lock_lease):
        # Died while fetching or hashing, before the lock could keep it.
        log.warning("request %s was lost with its worker before it took a lock; restarting it",
                    data.get("request_id"))
        resume.apply_async(args=[data])
        metrics.takeover()
        restarted += 1
    return restarted


def sweep_kaniko_jobs(client: Any, settings: Settings, kube: Any) -> int:
    """Delete finished Kaniko Jobs whose build nobody holds; returns how many.

    A dispatcher deletes its Job whatever happens, unless its worker is killed first.
    The chain that takes over adopts a Job that still runs; one that already pushed
    makes it skip the build instead, and that Job (with its pod) would wait for
    ttlSecondsAfterFinished. Only Jobs in the pool's default namespace are swept.
    """
    from datetime import UTC, datetime

    from tasks.lock import lock_key
    from workers.builders.kaniko import HASH_LABEL

    namespace = settings.kube_namespace
    swept = 0
    for job in kube.list_jobs(namespace, "app.kubernetes.io/managed-by=buildq"):
        meta = job.get("metadata") or {}
        source_hash = (meta.get("annotations") or {}).get(HASH_LABEL)
        ended = [c for c in (job.get("status") or {}).get("conditions") or []
                 if c.get("status") == "True" and c.get("type") in ("Complete", "Failed")]
        if not source_hash or not ended or client.exists(lock_key(source_hash)):
            continue
        try:
            at = datetime.strptime(str(ended[0].get("lastTransitionTime")), "%Y-%m-%dT%H:%M:%SZ")
        except ValueError:
            continue
        # A holder that lost its lock a moment ago may still be reading the Job's verdict.
        if (datetime.now(UTC).replace(tzinfo=None) - at).total_seconds() < settings.lock_lease:
            continue
        log.warning("deleting Kaniko Job %s/%s: it finished and no build holds %s",
                    namespace, meta.get("name"), source_hash[:12])
        kube.delete_job(namespace, str(meta.get("name")))
        swept += 1
    return swept


def sweep_workdir(settings: Settings) -> None:
    """Remove scratch dirs whose makers were killed, or older than any build may run."""
    from workers.sources.base import scratch_orphaned

    root = settings.workdir
    if not root.is_dir():
        return
    horizon = time.time() - settings.build_timeout * 2
    for entry in root.iterdir():
        try:
            if entry.is_dir() and (entry.stat().st_mtime < horizon or scratch_orphaned(entry)):
                shutil.rmtree(entry, ignore_errors=True)
        except FileNotFoundError:
            continue


def parse_listen(value: str) -> tuple[str, int]:
    """``PORT`` (all interfaces, as in a container) or ``ADDRESS:PORT``."""
    address, _, port = value.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ServiceError(f"--metrics-port {value!r} is not PORT or ADDRESS:PORT.",
                           "Write --metrics-port 9808 or --metrics-port 127.0.0.1:9808.")
    return address.strip("[]"), int(port)


def worker_hostname(pool: str, name: str | None) -> str:
    """The Celery node name: ``-n`` with ``%h``/``%n``/``%d`` expanded, else a unique default."""
    from celery.utils.nodenames import default_nodename, host_format

    if name:
        return str(host_format(default_nodename(name)))
    return f"{pool}-{os.getpid()}-{uuid.uuid4().hex[:4]}@{socket.gethostname()}"


def run_worker(pool: str, settings: Settings, concurrency: int | None = None,
               loglevel: str = "INFO", *, metrics_port: str | None = None,
               json_logs: bool = False, hostname: str | None = None) -> None:
    from workers.logs import install_celery_hook, setup_logging

    setup_logging(json_logs, loglevel)
    install_celery_hook()
    metrics_dir: str | None = None
    listen: tuple[str, int] | None = None
    try:
        if metrics_port is not None:
            listen = parse_listen(metrics_port)
            # Private to this worker: another worker's (or a dead run's) files would add
            # their counts to ours. Removed when the worker stops.
            metrics_dir = tempfile.mkdtemp(prefix="buildq-metrics-")
            metrics.enable(pool, metrics_dir, heartbeat_limit=_health_limit(settings))
        _run_worker(pool, settings, concurrency, loglevel, listen, hostname, quiet=json_logs)
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _health_limit(settings: Settings) -> float:
    # Several missed watchdog ticks (each at most 10 s apart) before /healthz says unhealthy.
    return max(30.0, 6 * min(10.0, settings.lock_lease / 3))


def _run_worker(pool: str, settings: Settings, concurrency: int | None, loglevel: str,
                listen: tuple[str, int] | None, name: str | None, quiet: bool = False) -> None:
    from tasks.app import POOL_QUEUES, app, configure
    from tasks.connection import check_redis

    if pool not in POOLS:
        raise ServiceError(f"unknown pool {pool!r}.", f"Choose one of {', '.join(POOLS)}.")
    if settings.embedded:
        raise ServiceError("a worker needs a broker, and BUILDQ_REDIS_URL is not set.",
                           "Set BUILDQ_REDIS_URL=redis://host:6379/0 (the same for every worker"
                           " and client).")
    check_redis(settings)
    check_pool_can_start(pool)
    configure(settings)
    import tasks.stages  # noqa: F401 - registers the stage tasks

    hostname = worker_hostname(pool, name)
    if listen is not None:
        from tasks.connection import redis_client

        metrics.start_server(listen[1], listen[0], redis_client(settings))
    watchdog = Watchdog(settings, pool, hostname)
    watchdog.start()
    worker = app.Worker(
        hostname=hostname,
        queues=list(POOL_QUEUES[pool]),
        concurrency=concurrency or (os.cpu_count() or 2),
        loglevel=loglevel,
        send_events=True,
        prefetch_multiplier=1,
        without_gossip=True,
        without_mingle=True,
        # The startup banner is prose on stdout; with JSON logs every line must parse.
        quiet=quiet,
    )
    try:
        worker.start()
    finally:
        watchdog.stopping.set()
    raise SystemExit(worker.exitcode or 0)
