"""The Celery app: broker, results and queues, with settings right for long builds."""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from config.settings import Settings
from tasks import broker, signing
from tasks.connection import redis_ssl_options

#: Queue of each stage: control hosts fetch, hash, check, upload and record;
#: build hosts build and push; the in-cluster pool dispatches Kaniko Jobs.
ROUTES: dict[str, str] = {
    "buildq.build_image": "control",
    "buildq.resume": "control",
    "buildq.hash": "control",
    "buildq.exists": "control",
    "buildq.upload": "control",
    "buildq.build": "docker",
    "buildq.push": "docker",
    "buildq.kaniko": "kaniko",
    "buildq.record": "control",
    # A multi-platform request waiting for its platforms, then pushing their index.
    "buildq.assemble": "control",
    # Notifications of ended requests (tasks/notifications.py).
    "buildq.notify": "control",
}

#: Queues each pool consumes.
POOL_QUEUES: dict[str, tuple[str, ...]] = {
    "control": ("control",),
    "docker": ("docker",),
    "kaniko": ("kaniko",),
}



def platform_queue(platform: str) -> str:
    """The queue of builds for ``platform``: each docker-pool worker consumes the queue of
    every platform its engine can build (natively or emulated), besides ``docker``."""
    from config.names import platform_key

    return "docker." + platform_key(platform).replace("/", ".")


#: ``include``: a worker imports the stage tasks when it boots, so they are registered
#: without the entry point importing them for that side effect.
app = Celery("buildq", include=["tasks.stages"])
_settings: Settings | None = None


def celery_config(settings: Settings) -> dict[str, Any]:
    transport = {
        # An unacked build is redelivered after this long: it must exceed the longest build.
        "visibility_timeout": settings.visibility_timeout,
    }
    base: dict[str, Any] = {
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_queues": [Queue(q) for q in ("control", "docker", "kaniko")],
        "task_default_queue": "control",
        "task_routes": {name: {"queue": q} for name, q in ROUTES.items()},
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_direct": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # No STARTED state in the result backend: it cost every task two Redis round trips
        # before its body; Flower learns it from the task-started event, and `buildq
        # status` from the request's stage events.
        "task_track_started": False,
        "result_extended": True,
        "result_expires": 7 * 24 * 3600,
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        # A result written while Redis restarts is retried rather than lost (and with it
        # the answer a caller waits for).
        "result_backend_always_retry": True,
        "result_backend_max_retries": 20,
        "worker_hijack_root_logger": False,
        # A stage past its soft limit fails its build with a record (and cleans up);
        # the hard limit only catches a stage that ignores it.
        # A docker-pool task builds and then pushes, so it may take two build timeouts.
        "task_soft_time_limit": int(2 * settings.build_timeout + 60),
        "task_time_limit": int(2 * settings.build_timeout + 300),
    }
    if settings.embedded:
        base.update(broker_url="memory://", result_backend="cache+memory://",
                    task_always_eager=True, task_eager_propagates=True)
    else:
        base.update(broker_url=settings.redis_url, result_backend=settings.redis_url,
                    task_always_eager=False, task_eager_propagates=False)
        tls = redis_ssl_options(settings.redis_url or "")
        if tls is not None:
            # Celery reads TLS apart from the URL: without these its broker speaks plain
            # text to a TLS port, and its backend refuses a rediss:// URL that omits
            # ssl_cert_reqs. Flower's broker view needs broker_use_ssl too.
            base.update(broker_use_ssl=tls, redis_backend_use_ssl=tls)
    base.update(signing.celery_options(settings))
    return base


def configure(settings: Settings) -> Celery:
    """Point the app at ``settings``; call before the first task is sent."""
    global _settings
    broker.install()
    if settings.signing:
        signing.enable(settings)
    _settings = settings
    app.conf.update(celery_config(settings))
    if app.finalized:
        # A task reads its serializer from the config once, when it is bound; signing
        # turned on (or off) afterwards must reach the next message it sends.
        for task in app.tasks.values():
            task.serializer = app.conf.task_serializer
            task._exec_options = None
    return app


def settings() -> Settings:
    if _settings is None:
        configure(Settings.from_env())
    assert _settings is not None
    return _settings


configure(Settings.from_env())
