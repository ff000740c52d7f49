"""Worker logging: readable lines by default, one JSON object per line with ``--json-logs``.

Log collectors (Loki, CloudWatch, Cloud Logging) index JSON fields without a parser,
so the stage events carry their facts as fields (``source_hash``, ``task_id``,
``stage``, ``duration``) rather than only inside the message text.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

#: The logger of the per-stage events (one per finished stage).
STAGE_LOGGER = "buildq.stage"

#: Attributes every LogRecord has; anything else was passed with ``extra=`` and is a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime",
                                                                         "taskName"}

#: Fields of Celery's task-trace ``data`` worth a JSON field.
_CELERY_DATA = {"id", "name", "hostname", "runtime", "description", "exc", "internal", "eta"}

PLAIN_FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, process, and the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.processName,
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        data = entry.get("data")
        if isinstance(data, dict):
            # Celery's task-trace records repeat the message and add the whole argument and
            # result reprs (the build state, kilobytes each): keep only the identifying fields.
            entry["data"] = {k: v for k, v in data.items() if k in _CELERY_DATA}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: a stray non-JSON value must not lose the whole line.
        return json.dumps(entry, default=str, ensure_ascii=False)


_configured: dict[str, Any] = {}


def setup_logging(json_logs: bool = False, level: str | int = "INFO") -> None:
    """Send every logger (ours and Celery's) to stderr in the chosen format.

    Idempotent: Celery's prefork children call it again through the ``setup_logging``
    signal, and must end up with the same single handler.
    """
    root = logging.getLogger()
    old = _configured.get("handler")
    if old is not None:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs else logging.Formatter(PLAIN_FORMAT))
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    _configured.update(handler=handler, json=json_logs, level=level)


def install_celery_hook() -> None:
    """Make Celery keep our handler: a ``setup_logging`` receiver replaces its own setup."""
    from celery.signals import setup_logging as celery_setup_logging

    def _receiver(loglevel: Any = None, **_: Any) -> None:
        setup_logging(bool(_configured.get("json")), _configured.get("level") or loglevel or "INFO")

    # weak=False: the receiver is a closure that nothing else holds on to.
    celery_setup_logging.connect(_receiver, weak=False)


def stage_event(stage: str, seconds: float, *, task_id: str | None, request_id: str,
                source_hash: str | None, status: str | None, builder: str | None,
                pool: str) -> None:
    """One log event per finished stage."""
    logging.getLogger(STAGE_LOGGER).info(
        "stage %s done in %.3fs hash=%s task=%s request=%s%s", stage, seconds,
        (source_hash or "-")[:12], task_id or "-", request_id,
        f" status={status}" if status else "",
        extra={"event": "stage", "stage": stage, "duration": round(seconds, 4),
               "task_id": task_id, "request_id": request_id, "source_hash": source_hash,
               "status": status, "builder": builder, "pool": pool})
