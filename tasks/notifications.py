"""Telling a receiver (a chat bridge, a CI system) that a request ended.

When a request is answered — built, skipped, failed or cancelled — its record is POSTed to
``BUILDQ_NOTIFY_URL`` and to the request's own ``notify`` URL, each by a ``buildq.notify``
task on the control queue, sent after the record is written and the answer stored: a slow
or absent receiver never delays or fails the build. The delivering worker signs the body
with its own ``BUILDQ_NOTIFY_SECRET`` (never in a task's arguments) and retries a 5xx or an
unreachable receiver ``BUILDQ_NOTIFY_RETRIES`` times with exponential backoff, then logs
and counts it (``buildq_notifications_total{outcome="failed"}``).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import uuid
from typing import Any

from celery import Task

from config.settings import Settings
from tasks.app import app, settings
from workers import metrics
from workers.notify import NotifyError, TransientNotifyError, body_of, post

log = logging.getLogger("buildq.notify")

#: Longest wait between two tries of one delivery.
MAX_BACKOFF = 300.0


def _backoff(cfg: Settings, tries: int) -> float:
    return float(min(cfg.retry_base * 2 ** tries, MAX_BACKOFF))


def _try(record: dict[str, Any], url: str, cfg: Settings, delivery: str, tries: int) -> bool:
    """One POST; True when it is over (delivered or refused), False to try again."""
    try:
        post(url, body_of(record), cfg.notify_secret, delivery)
    except TransientNotifyError as exc:
        if tries >= cfg.notify_retries:
            log.warning("notification %s of request %s to %s given up after %d tries: %s",
                        delivery, record.get("id"), url, tries + 1, exc)
            metrics.notification("failed")
            return True
        metrics.notification("retried")
        return False
    except NotifyError as exc:
        log.warning("notification %s of request %s: %s", delivery, record.get("id"), exc)
        metrics.notification("failed")
        return True
    metrics.notification("delivered")
    return True


@app.task(name="buildq.notify", bind=True, acks_late=True, ignore_result=True, max_retries=None)
def notify(self: Task, record: dict[str, Any], url: str | None = None,
           delivery: str = "") -> None:
    """POST ``record`` to ``url`` (None: this worker's BUILDQ_NOTIFY_URL)."""
    cfg = settings()
    target = url or cfg.notify_url
    if not target:
        return
    tries = int(self.request.retries or 0)
    if not _try(record, target, cfg, delivery, tries):
        # Through the broker: the worker slot is free while the receiver recovers.
        raise self.retry(countdown=_backoff(cfg, tries))


def announce(record: dict[str, Any], url: str | None, cfg: Settings,
             everyone: bool = False) -> None:
    """Send the notifications of an answered request: to BUILDQ_NOTIFY_URL (when set here,
    or with ``everyone`` whatever the delivering worker has) and to the request's ``url``.
    Never raises: a notification must not fail the build."""
    targets: list[str | None] = []
    if cfg.notify_url or everyone:
        targets.append(None)
    if url and url != cfg.notify_url:
        targets.append(url)
    for target in targets:
        delivery = str(uuid.uuid4())
        try:
            if cfg.embedded:
                # No broker in-process: a thread delivers, the build's answer does not wait;
                # the process waits for it at exit, a little (EXIT_WAIT).
                thread = threading.Thread(target=_deliver_here, daemon=True,
                                          args=(record, target or cfg.notify_url, cfg, delivery),
                                          name=f"notify-{delivery[:8]}")
                thread.start()
                _in_process.append(thread)
            else:
                notify.apply_async(args=[record], kwargs={"url": target, "delivery": delivery})
        except Exception:
            log.warning("could not send the notification of request %s", record.get("id"),
                        exc_info=True)


#: Seconds an in-process build's CLI waits at exit for its notifications still on their way.
EXIT_WAIT = 15.0
_in_process: list[threading.Thread] = []


@atexit.register
def _wait_at_exit() -> None:
    deadline = time.monotonic() + EXIT_WAIT
    for thread in _in_process:
        thread.join(max(0.0, deadline - time.monotonic()))


def _deliver_here(record: dict[str, Any], url: str | None, cfg: Settings, delivery: str) -> None:
    if not url:
        return
    tries = 0
    while not _try(record, url, cfg, delivery, tries):
        time.sleep(_backoff(cfg, tries))
        tries += 1
