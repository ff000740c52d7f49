"""Requests that hold no lock yet: restartable if the worker fetching or hashing them dies.

From the hash stage on, a request is in its source hash's pending map and the lock's
takeover restarts it when its holder dies (see :mod:`tasks.lock`). Before that (fetch,
and hash until it takes the lock) only the broker knows it, and an unacked task of a
SIGKILLed worker comes back only after the visibility timeout (hours, by design), or
never, when it sat in the dead worker's own queue. So those stages register the
request here under a short lease that a heartbeat renews; a control worker's watchdog
restarts (from fetch) any request whose lease ran out. A restarted request that turns
out to be alive after all meets itself at the lock, which lets one build run.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.client import Pipeline

from tasks.background import companion
from tasks.keys import INFLIGHT, SUBMITTED, lease_key, submitted_lease_key
from tasks.scripts import script
from tasks.state import BuildState


def submission(request_id: str, source: str, options: dict[str, Any], headers: dict[str, Any],
               lease_seconds: float) -> list[tuple[Any, ...]]:
    """The Redis commands that note a request about to be sent, as (method, *arguments), so
    that losing its message loses nothing. They ride ahead of the message, in the same
    round trip and on the same connection (see tasks/broker.py), so they land before it.

    Between the broker's list and a worker's first stage, a message can vanish: a Redis
    crash between the worker's pop and kombu's record of it as unacked drops it, and one
    recorded as unacked comes back only after the visibility timeout. Until a worker
    registers the request (below), a watchdog that finds it neither registered nor queued
    sends it again (see :func:`lost_submissions`).
    """
    note = json.dumps({"source": source, "options": options, "headers": headers})
    return [("hset", SUBMITTED, request_id, note),
            ("psetex", submitted_lease_key(request_id), int(lease_seconds * 1000), "1")]


def register(client: redis.Redis, state: BuildState, lease_seconds: float) -> None:
    """Make the request restartable (idempotent; renews its lease)."""
    pipe = client.pipeline(transaction=True)
    add_register(pipe, state, lease_seconds)
    pipe.execute()


def add_register(pipe: Pipeline, state: BuildState, lease_seconds: float) -> None:
    """Queue :func:`register`'s commands on ``pipe``, a transaction (they go together)."""
    # The state of the first stage is what a restart needs: no host's scratch dir in it.
    first = {**state.to_dict(), "workdir": None, "owned": False}
    pipe.hsetnx(INFLIGHT, state.request_id, json.dumps(first))
    pipe.set(lease_key(state.request_id), "1", px=int(lease_seconds * 1000))
    # A worker has it now: from here on, its lease above keeps it.
    pipe.hdel(SUBMITTED, state.request_id)
    pipe.delete(submitted_lease_key(state.request_id))


def taken(client: redis.Redis, request_id: str) -> None:
    """A worker has the request and keeps it by other means than this module's lease (a
    multi-platform request, answered once its platforms are): its submission note goes."""
    pipe = client.pipeline(transaction=True)
    pipe.hdel(SUBMITTED, request_id)
    pipe.delete(submitted_lease_key(request_id))
    pipe.execute()


def forget(client: redis.Redis, request_id: str) -> None:
    pipe = client.pipeline(transaction=True)
    pipe.hdel(INFLIGHT, request_id)
    pipe.delete(lease_key(request_id))
    pipe.execute()


@contextmanager
def tracked(client: redis.Redis, state: BuildState, lease_seconds: float,
            registered: bool = False) -> Iterator[None]:
    """Keep ``state`` restartable while a stage before the lock works on it.

    ``registered``: the caller registered it just before (its lease is fresh), so that
    round trip is not repeated. Afterwards the entry goes once the request is done or
    failed; a request that took its hash's lock left it already (the lock script moves a
    request from this map to the pending map, see tasks/acquire.lua); else (fetch handed
    it to hash) it stays, with at least nine tenths of a lease left for the next stage.
    """
    lease_ms = int(lease_seconds * 1000)
    if not registered:
        register(client, state, lease_seconds)
    renewed = time.monotonic()

    def beat(stop: threading.Event) -> None:
        while not stop.wait(lease_seconds / 3):
            try:
                client.set(lease_key(state.request_id), "1", px=lease_ms)
            except redis.RedisError:
                continue  # a blip must not kill the stage; the next beat tries again

    keep = moved = False
    try:
        with companion(beat, f"inflight-{state.request_id[:8]}", 5):
            yield
            keep = not (state.source_hash or state.done)
            moved = bool(state.source_hash and state.token)
    finally:
        if not moved:
            _settle(client, state.request_id, keep, time.monotonic() - renewed, lease_seconds)


def _settle(client: redis.Redis, request_id: str, keep: bool, age: float,
            lease_seconds: float) -> None:
    """The in-flight entry after its stage: kept for the next (``keep``), else forgotten.

    An error (a failed record follows), an attach (Ignore) or a hash: the request is
    accounted for elsewhere now. Through a short Redis outage: an entry left behind is
    restarted by the watchdog once its lease runs out, and that copy is stopped only when
    it reaches the lock or sees the request answered. The lease itself bounds how long
    this waits.
    """
    deadline = time.monotonic() + lease_seconds / 2
    pause = 0.1
    while True:
        try:
            if keep:
                # A lease this fresh (a cache hit's fetch takes a millisecond) has all but
                # a moment left: renewing it would be a round trip for nothing.
                if age >= lease_seconds / 10:
                    client.set(lease_key(request_id), "1", px=int(lease_seconds * 1000))
            else:
                forget(client, request_id)
            break
        except redis.RedisError:
            if time.monotonic() + pause > deadline:
                break
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


def reclaim_orphans(client: redis.Redis, lease_seconds: float) -> list[dict[str, Any]]:
    """Take the requests whose lease ran out: their states, each handed to one caller only."""
    reclaim = script(client, "reclaim")
    states = []
    for request_id in client.hkeys(INFLIGHT):
        if client.exists(lease_key(str(request_id))):
            continue
        raw = reclaim(keys=[INFLIGHT, lease_key(str(request_id))],
                     args=[str(request_id), int(lease_seconds * 1000)])
        if raw:
            states.append(dict(json.loads(str(raw))))
    return states


def lost_submissions(client: redis.Redis, queue: str,
                     lease_seconds: float) -> list[tuple[str, dict[str, Any]]]:
    """(request id, arguments) of each sent request that no worker took and ``queue`` no
    longer holds: its message was lost. Each is handed to one caller only; one still
    waiting in the queue gets a fresh lease."""
    expired = [str(r) for r in client.hkeys(SUBMITTED)
               if not client.exists(submitted_lease_key(str(r)))]
    if not expired:
        return []
    waiting = _queued_ids(client, queue)
    reclaim = script(client, "reclaim")
    lost = []
    for request_id in expired:
        raw = reclaim(keys=[SUBMITTED, submitted_lease_key(request_id)],
                      args=[request_id, int(lease_seconds * 1000)])
        if raw and request_id not in waiting:
            client.hdel(SUBMITTED, request_id)
            lost.append((request_id, dict(json.loads(str(raw)))))
    return lost


def _queued_ids(client: redis.Redis, queue: str) -> set[str]:
    """Task ids of the messages waiting in ``queue`` (kombu's Redis list of JSON envelopes)."""
    ids = set()
    for raw in client.lrange(queue, 0, -1):
        try:
            ids.add(str(json.loads(raw)["headers"]["id"]))
        except (ValueError, KeyError, TypeError):
            continue
    return ids
