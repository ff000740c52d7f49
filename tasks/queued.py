"""Where a request that no worker has taken yet waits: its pool queue in the broker."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

from tasks.app import POOL_QUEUES

#: Messages read per LRANGE while looking for a request in a queue.
QUEUE_CHUNK = 1000


@dataclass(frozen=True)
class Queued:
    """Where a request waits: its pool's queue, its place from the front, the queue's length."""

    pool: str
    position: int
    length: int

    def as_dict(self, request_id: str) -> dict[str, Any]:
        return {"id": request_id, "status": "queued", "queue": self.pool,
                "position": self.position, "queued": self.length}


def find_queued(client: redis.Redis, request_id: str) -> Queued | None:
    """The pool queue holding ``request_id``'s message, read from the broker's lists.

    Celery's Redis transport keeps each queue as a list named after it, pushed on the left
    and taken from the right; a chain handed to the next pool keeps the request's task id.
    """
    found: Queued | None = None
    # A build for a platform waits in that platform's queue (tasks.app.platform_queue).
    platform_queues = sorted(str(k) for k in client.scan_iter(match="docker.*", _type="list"))
    for pool, queues in POOL_QUEUES.items():
        for queue in [*queues, *(platform_queues if pool == "docker" else [])]:
            length = int(client.llen(queue))
            for start in range(0, length, QUEUE_CHUNK):
                chunk = client.lrange(queue, start, start + QUEUE_CHUNK - 1)
                for offset, raw in enumerate(chunk):
                    if request_id in str(raw) and _message_id(raw) == request_id:
                        # A chain restarted for its waiters queues the request again; the
                        # copy nearest the front is the one taken first.
                        here = Queued(pool, length - (start + offset), length)
                        if found is None or here.position < found.position:
                            found = here
    return found


def _message_id(raw: Any) -> str | None:
    try:
        message = json.loads(raw)
        return str(message["headers"]["id"])
    except (ValueError, KeyError, TypeError):
        return None
