"""Prometheus metrics of a worker, and the hooks the stages call when something ends.

A Celery prefork worker runs its tasks in child processes, so counters live in
prometheus_client's multiprocess mode: every process writes its own mmap files in
a directory private to this worker (made and removed by :func:`tasks.cli.pools.run_worker`),
and the worker's main process sums them when scraped. Queue depth is read from
Redis at scrape time, not kept in a process.

Without ``--metrics-port`` nothing is counted and prometheus_client is never
imported; the stage hooks still write their log event.

Metrics (every one labelled with the ``pool`` of the worker that reports it):

- ``buildq_builds_total{builder,outcome}``: one per answered request, counted where
  the record is written; outcome is ``built``, ``skipped``, ``failed``, or ``attached``
  (served by an identical build another request started).
- ``buildq_stage_duration_seconds{stage,builder}``: histogram per finished stage.
- ``buildq_build_duration_seconds{builder,outcome}``: request to record, for holders.
- ``buildq_lock_wait_seconds``: histogram of how long attached requests waited for
  the holder's record (its ``_count`` is the number of lock waits).
- ``buildq_lock_takeovers_total``: builds restarted for waiters after a holder died.
- ``buildq_context_bytes_uploaded_total{scheme}``: compressed build-context bytes.
- ``buildq_queue_depth{queue}``: messages waiting in each pool's queue.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from workers.logs import stage_event

log = logging.getLogger("buildq.metrics")

#: Seconds: from a cache hit's registry check to an hour-long build.
STAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: Queues whose depth is exported; kombu's Redis transport keeps each as a list.
QUEUES = ("control", "docker", "kaniko")
#: kombu stores priority levels of a queue in sibling lists named queue + this + level.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_LEVELS = (3, 6, 9)


@dataclass
class _Process:
    enabled: bool = False
    pool: str = "embedded"
    #: monotonic time of the watchdog's last successful tick; /healthz reads it.
    last_heartbeat: float = 0.0
    heartbeat_limit: float = 60.0


_process = _Process()
_metrics: dict[str, Any] = {}
_metrics_lock = threading.Lock()


def enable(pool: str, multiproc_dir: str, heartbeat_limit: float = 60.0) -> None:
    """Count from now on, in ``multiproc_dir`` (which must be empty and private to this worker).

    Must run before the worker forks its pool, so every child inherits it.
    """
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir
    from prometheus_client import values

    # prometheus_client picks its value class when first imported; if anything imported
    # it before the directory was known, switch now (no metric exists yet).
    values.ValueClass = values.MultiProcessValue()
    _process.enabled = True
    _process.pool = pool
    _process.heartbeat_limit = heartbeat_limit


def _get() -> dict[str, Any]:
    """The metric objects, made on first use (after :func:`enable` chose multiprocess mode)."""
    if _metrics:
        return _metrics
    with _metrics_lock:
        if _metrics:
            return _metrics
        from prometheus_client import Counter, Histogram

        made = {
            "builds": Counter("buildq_builds", "Requests answered, by outcome.",
                              ["pool", "builder", "outcome"]),
            "stage": Histogram("buildq_stage_duration_seconds", "Duration of finished stages.",
                               ["pool", "stage", "builder"], buckets=STAGE_BUCKETS),
            "build": Histogram("buildq_build_duration_seconds",
                               "From request to record, for the request that ran the build.",
                               ["pool", "builder", "outcome"], buckets=STAGE_BUCKETS),
            "lock_wait": Histogram("buildq_lock_wait_seconds",
                                   "How long a request attached to an identical build waited.",
                                   ["pool"], buckets=STAGE_BUCKETS),
            "takeovers": Counter("buildq_lock_takeovers",
                                 "Builds restarted for waiting requests after the holder died.",
                                 ["pool"]),
            "context_bytes": Counter("buildq_context_bytes_uploaded",
                                     "Compressed build-context bytes uploaded to a context store.",
                                     ["pool", "scheme"]),
            "notifications": Counter("buildq_notifications",
                                     "Notifications of ended requests, by outcome (delivered, "
                                     "retried, failed).", ["pool", "outcome"]),
        }
        _metrics.update(made)
    return _metrics


# --- hooks: called from tasks/stages.py and tasks/cli/pools.py ------------------------------


def stage_finished(stage: str, seconds: float, state: Any, task_id: str | None) -> None:
    """A stage ended (whatever its outcome): log its event and time it."""
    stage_event(stage, seconds, task_id=task_id, request_id=state.request_id,
                source_hash=state.source_hash, status=state.status, builder=state.builder,
                pool=_process.pool)
    if not _process.enabled:
        return
    try:
        m = _get()
        m["stage"].labels(_process.pool, stage, state.builder or "none").observe(seconds)
        if stage == "upload" and state.context_bytes:
            # Only the upload stage writes context_bytes; later stages carry the same number.
            scheme = (state.context_store or "").partition("://")[0] or "file"
            m["context_bytes"].labels(_process.pool, scheme).inc(state.context_bytes)
    except Exception:
        # Metrics must never fail a build.
        log.warning("could not record stage metrics", exc_info=True)


def build_finished(state: Any, waiting: dict[str, dict[str, Any]] | None) -> None:
    """The record was written; ``waiting`` holds every request it answers (None: no lock taken).

    Each request counts once, as its record says: the one the chain ran for gets the
    build's status, the others ``attached``. A watchdog-restarted chain's own task id
    is not a request, so only the waiting map is counted when there is one.
    """
    if not _process.enabled:
        return
    try:
        m = _get()
        builder = state.builder or "none"
        status = state.status or "failed"
        now = time.time()
        requests = waiting if waiting is not None else {state.request_id: {}}
        for request_id, request in requests.items():
            if request_id == state.request_id:
                m["builds"].labels(_process.pool, builder, status).inc()
                m["build"].labels(_process.pool, builder, status).observe(
                    max(0.0, now - float(state.created_at)))
            else:
                m["builds"].labels(_process.pool, builder, "attached").inc()
                created = float(request.get("created_at") or now)
                m["lock_wait"].labels(_process.pool).observe(max(0.0, now - created))
    except Exception:
        log.warning("could not record build metrics", exc_info=True)


def takeover() -> None:
    if _process.enabled:
        _get()["takeovers"].labels(_process.pool).inc()


def notification(outcome: str) -> None:
    """A notification was delivered, will be retried, or was given up."""
    if not _process.enabled:
        return
    try:
        _get()["notifications"].labels(_process.pool, outcome).inc()
    except Exception:
        log.warning("could not record notification metrics", exc_info=True)


def heartbeat() -> None:
    """The worker's watchdog reached Redis: what /healthz reports."""
    _process.last_heartbeat = time.monotonic()


# --- the scrape endpoint --------------------------------------------------------------------


class QueueDepthCollector:
    """``buildq_queue_depth{queue}``: LLEN of each pool's queue in the broker, at scrape time."""

    def __init__(self, client: Any, queues: Iterable[str] = QUEUES) -> None:
        self.client = client
        self.queues = tuple(queues)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily("buildq_queue_depth", "Messages waiting in each pool's queue.",
                                   labels=["queue"])
        try:
            pipe = self.client.pipeline(transaction=False)
            for queue in self.queues:
                pipe.llen(queue)
                for level in _PRIORITY_LEVELS:
                    pipe.llen(f"{queue}{_PRIORITY_SEP}{level}")
            lengths = pipe.execute()
        except Exception:
            # No sample is better than a wrong zero while Redis is away.
            log.warning("queue depth unavailable", exc_info=True)
            return
        per_queue = 1 + len(_PRIORITY_LEVELS)
        for i, queue in enumerate(self.queues):
            family.add_metric([queue], float(sum(lengths[i * per_queue:(i + 1) * per_queue])))
        yield family


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        # Scrapes every few seconds would drown the worker's own log.
        pass


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


def make_app(registry: Any) -> Any:
    """Prometheus text on every path but ``/healthz`` (liveness for compose and kubelet)."""
    from prometheus_client import make_wsgi_app

    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            age = time.monotonic() - _process.last_heartbeat
            healthy = _process.last_heartbeat > 0 and age < _process.heartbeat_limit
            body = (b"ok\n" if healthy else
                    f"watchdog silent for {age:.0f}s (Redis unreachable or worker stuck)\n".encode())
            start_response("200 OK" if healthy else "503 Service Unavailable",
                           [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
            return [body]
        return metrics_app(environ, start_response)

    return app


def start_server(port: int, address: str, redis_client: Any) -> WSGIServer:
    """Serve this worker's metrics (all its processes, summed) from a daemon thread."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(QueueDepthCollector(redis_client))
    server = make_server(address, port, make_app(registry), _ThreadingServer, _QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="buildq-metrics", daemon=True)
    thread.start()
    log.info("metrics on http://%s:%d/metrics", address or "0.0.0.0", server.server_port)
    return server
