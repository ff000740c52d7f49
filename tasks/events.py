"""Progress of a build, for whoever watches it: stage events and build log lines.

Both are Redis streams, so a watcher blocks on ``XREAD`` instead of polling. Stage
events go to the request's stream; build log lines to the source hash's stream,
which every request attached to that build can follow too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import redis
from redis.client import Pipeline

from tasks.keys import cancel_key, events_key, log_key
from tasks.scripts import add_script

#: Lines of build log kept per source hash.
LOG_MAXLEN = 100_000
#: Events kept per request.
EVENTS_MAXLEN = 1_000
#: How long streams live after their last write.
STREAM_TTL = 7 * 24 * 3600


def emit(client: redis.Redis, request_id: str, kind: str, **data: Any) -> None:
    """Publish one event; a watcher's absence, or Redis trouble, never fails a build."""
    emit_stages(client, request_id, [], (kind, data))


def emit_stages(client: redis.Redis, request_id: str, stages: list[dict[str, str]],
                *more: tuple[str, dict[str, Any]]) -> None:
    """Publish the unsent stage events ``stages`` (taken from that list, see
    :func:`add_unsent`) and ``more`` (kind, fields) in one round trip; as :func:`emit`,
    never failing a build."""
    try:
        pipe = client.pipeline(transaction=False)
        add_unsent(pipe, request_id, stages)
        for kind, fields in more:
            add_event(pipe, request_id, kind, **fields)
        if len(pipe):
            pipe.execute()
    except redis.RedisError:
        pass


#: The stage events a quick boundary left unsent (see StageTask._enter), while a stage body
#: runs: the first round trip the body makes for its request carries them first, so the
#: request's events stay in order.
unsent_stages: ContextVar[list[dict[str, str]] | None] = ContextVar("buildq_unsent_stages",
                                                                   default=None)
#: Held while events are taken from an unsent list: a stage body's thread and its watcher
#: may both send them.
_taking = threading.Lock()


def add_unsent(pipe: Pipeline, request_id: str,
               events: list[dict[str, str]] | None = None) -> None:
    """Queue the unsent stage events (``events``, else this context's) on ``pipe``, taking
    them from their list: sent once, whoever sends them."""
    events = unsent_stages.get() if events is None else events
    if not events:
        return
    with _taking:
        taken = events[:]
        # Not ``clear()``: one appended meanwhile (appends take no lock) stays for later.
        del events[:len(taken)]
    for fields in taken:
        add_event(pipe, request_id, "stage", **fields)


def add_event(pipe: Pipeline, request_id: str, kind: str, **data: Any) -> None:
    """Queue one event on ``pipe`` (two commands), to go with whatever else it carries: a
    cache hit emits about ten events, and each round trip saved is a fraction of it."""
    key = events_key(request_id)
    pipe.xadd(key, _fields(kind, data), maxlen=EVENTS_MAXLEN, approximate=True)  # type: ignore[arg-type]
    pipe.expire(key, STREAM_TTL)


def add_started(pipe: Pipeline, client: redis.Redis, request_id: str, stage: str, *,
                look: bool, lock: str = "", token: str = "") -> Callable[[Any], bool]:
    """Queue a stage's started event on ``pipe``, a transaction, to be written only if the
    stage is to run: its request not cancelled (``look``), and the ``lock`` held under
    ``token`` (see tasks/started.lua). Returns what reads whether it was written."""
    fields = _fields("stage", {"stage": stage, "state": "started"})
    # Without a token the script never reads the lock key; any key fills its place.
    read = add_script(pipe, client, "started",
                      [events_key(request_id), cancel_key(request_id), lock or events_key(request_id)],
                      [EVENTS_MAXLEN, STREAM_TTL, "1" if look else "0", token,
                       *(part for pair in fields.items() for part in pair)])
    return lambda reply: bool(read(reply))


def _fields(kind: str, data: dict[str, Any]) -> dict[str, str]:
    return {"kind": kind, **{k: "" if v is None else str(v) for k, v in data.items()}}


def progress_of(client: redis.Redis, request_id: str) -> dict[str, Any] | None:
    """Where a request without a record stands, read from its events (None: it has none).

    ``status`` is ``running`` until the request's ``done`` event, then that event's status;
    ``stages`` are those started and not yet done (several at once for a multi-platform
    request's platforms), oldest first.
    """
    entries: list[tuple[str, dict[str, str]]] = \
        client.xrange(events_key(request_id))  # type: ignore[assignment]
    if not entries:
        return None
    found: dict[str, Any] = {"id": request_id, "status": "running",
                             "started_at": int(str(entries[0][0]).split("-")[0]) / 1000}
    open_stages: dict[str, None] = {}
    for _, fields in entries:
        kind = fields.get("kind")
        if kind == "stage" and fields.get("state") == "done":
            open_stages.pop(fields.get("stage", ""), None)
        elif kind == "stage":
            open_stages[fields.get("stage", "")] = None
        elif kind == "hashed":
            found.update(source_hash=fields.get("source_hash"), tag=fields.get("tag"))
        elif kind == "attached":
            found["attached"] = True
        elif kind == "done":
            found["status"] = fields.get("status") or "ended"
    found["stages"] = list(open_stages) if found["status"] == "running" else []
    return found


#: Longest a build log line waits in a writer's buffer before it reaches the stream.
FLUSH_AFTER = 0.2


class LogWriter:
    """Appends build log lines to the hash's stream, batched to keep round trips few.

    A line never waits longer than FLUSH_AFTER: when no later line comes to flush it (a step
    that prints once, then works), a timer does, so a follower sees it as it is written.
    """

    def __init__(self, client: redis.Redis, source_hash: str) -> None:
        self.client = client
        self.key = log_key(source_hash)
        self.buffer: list[str] = []
        self.last_flush = time.monotonic()
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def __call__(self, line: str) -> None:
        with self._lock:
            self.buffer.append(line.rstrip("\n"))
            due = len(self.buffer) >= 50 or time.monotonic() - self.last_flush > FLUSH_AFTER
            if not due and self._timer is None:
                self._timer = threading.Timer(FLUSH_AFTER, self.flush)
                self._timer.daemon = True
                self._timer.start()
        if due:
            self.flush()

    def flush(self) -> None:
        # Under the lock throughout, so the timer's flush and the builder's never reorder lines.
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            lines, self.buffer = self.buffer, []
            self.last_flush = time.monotonic()
            if not lines:
                return
            try:
                pipe = self.client.pipeline(transaction=False)
                for line in lines:
                    pipe.xadd(self.key, {"line": line}, maxlen=LOG_MAXLEN, approximate=True)
                pipe.expire(self.key, STREAM_TTL)
                pipe.execute()
            except redis.RedisError:
                pass


def _order(entry_id: str, is_event: bool) -> tuple[int, bool, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), is_event, int(seq or 0)


def follow(client: redis.Redis, request_id: str, since_ms: int, finished: Callable[[], bool],
           block_ms: int | None = 300) -> Iterator[dict[str, str]]:
    """Yield the request's events and, once its hash is known, that build's log lines.

    Stops once ``finished()`` is true and everything written so far has been read.
    ``block_ms=None`` polls instead of blocking, for the in-process Redis, whose
    blocking reads miss entries written by another thread meanwhile.
    """
    cursors: dict[str, str] = {events_key(request_id): "0-0"}
    draining = False
    while True:
        if block_ms is None and not draining:
            time.sleep(0.05)
        reply = client.xread(cursors, block=None if draining else block_ms)  # type: ignore[arg-type]
        # Entries of both streams, in the order they were written.
        streams: list[tuple[str, list[tuple[str, dict[str, str]]]]] = reply or []  # type: ignore[assignment]
        # Within one millisecond, log lines go first: a stage's "done" follows its output.
        events = events_key(request_id)
        batch = sorted(
            (_order(str(entry_id), str(key) == events), str(key), str(entry_id), fields)
            for key, entries in streams for entry_id, fields in entries)
        for _, key, entry_id, fields in batch:
            cursors[key] = entry_id
            item = {str(k): str(v) for k, v in fields.items()}
            if "line" in item:
                item["kind"] = "log"
            elif item.get("kind") == "hashed" and item.get("source_hash"):
                cursors.setdefault(log_key(item["source_hash"]), f"{since_ms}-0")
            yield item
        if draining and not reply:
            return
        if not reply and finished():
            draining = True
