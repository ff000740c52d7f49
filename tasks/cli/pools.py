"""Entry points of the three pools: ``buildq worker control|docker|kaniko``.

Each is a Celery worker bound to its pool's queues, with task events on for
Flower. Beside it runs a watchdog thread that renews the worker's presence; on
control workers it restarts builds whose holder died and sweeps scratch directories
nobody will use again, on kaniko workers it sweeps abandoned Jobs. What a tick does is
the build protocol's (:mod:`tasks.watchdog`); this module only runs it.
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

import redis

from config.errors import ConfigError, ServiceError
from config.settings import Settings
from tasks.app import POOL_QUEUES, app, configure, platform_queue
from tasks.connection import check_redis, redis_client
from tasks.presence import announce
from tasks.watchdog import restart_orphans, sweep_kaniko_jobs
from workers import metrics
from workers.sources.base import sweep_workdir

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
        #: What a docker-pool worker's engine builds, advertised with its presence.
        self.platforms: list[str] | None = None
        self.last_job_sweep = time.monotonic()
        if pool == "kaniko":
            # Imported here, before the pool forks: a fork while this thread held the
            # import lock (kubernetes takes a while to import) would deadlock the child.
            import workers.builders.kaniko
            import workers.kube  # noqa: F401

    def run(self) -> None:
        client = redis_client(self.settings)
        while True:
            try:
                self.tick(client)
            except Exception:
                log.warning("watchdog tick failed", exc_info=True)
            if self.stopping.wait(self.interval):
                return

    def tick(self, client: redis.Redis) -> None:
        announce(client, self.pool, self.hostname, self.platforms)
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
    if pool not in POOLS:
        raise ServiceError(f"unknown pool {pool!r}.", f"Choose one of {', '.join(POOLS)}.")
    if settings.embedded:
        raise ServiceError("a worker needs a broker, and BUILDQ_REDIS_URL is not set.",
                           "Set BUILDQ_REDIS_URL=redis://host:6379/0 (the same for every worker"
                           " and client).")
    check_redis(settings)
    check_pool_can_start(pool)
    if settings.signing and settings.signing_certs_dir is None:
        raise ConfigError("with message signing on, a worker needs BUILDQ_SIGNING_CERTS_DIR: "
                          "the certificates whose signatures it trusts.",
                          "Put every client's and worker's certificate (PEM) in one directory "
                          "and set BUILDQ_SIGNING_CERTS_DIR to it.")
    configure(settings)
    hostname = worker_hostname(pool, name)
    if listen is not None:
        metrics.start_server(listen[1], listen[0], redis_client(settings))
    watchdog = Watchdog(settings, pool, hostname)
    queues = list(POOL_QUEUES[pool])
    if pool == "docker":
        from config.names import platform_key
        from workers.platforms import engine_platforms

        # Read once at start: a handler registered later counts after a restart.
        watchdog.platforms = [platform_key(p) for p in settings.platforms] or engine_platforms()
        queues += [platform_queue(p) for p in watchdog.platforms]
        log.info("this engine builds %s", ", ".join(watchdog.platforms) or "no known platform")
    watchdog.start()
    worker = app.Worker(
        hostname=hostname,
        queues=queues,
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
