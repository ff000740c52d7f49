"""Cancelling a request: ``buildq cancel`` and ``tasks.cancel(request_id)``.

The canceller answers the request itself, at once, so a request no worker will ever take
(queued behind a dead pool) is answered too: a ``cancelled`` record (who and when),
claimed like every answer (one per request, see tasks/answer.lua), stored as the request's
Celery result (``FAILURE`` with :class:`~tasks.failures.BuildCancelled`), and the request
leaves its hash's pending map. It also leaves a flag (:func:`tasks.keys.cancel_key`) that
the chain reads at every stage boundary and, while a stage runs, from a watcher thread.

A chain whose request is cancelled, and whose build no other request waits for, stops:
before the lock it drops its fetched tree and ends; holding the lock it stops the running
build (the docker CLI's process group is killed, so the engine cancels the build and
nothing is pushed), deletes its context, writes the hash's record as cancelled and
releases the lock, so a later identical request builds. A queued request never starts:
the first stage that takes it finds the flag. A cancelled request that others are attached
to only leaves: the build goes on for them.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import redis
from celery import states

from config.errors import InputError
from tasks.app import app, settings
from tasks.background import companion
from tasks.connection import redis_client
from tasks.failures import BuildCancelled
from tasks.keys import (
    HISTORY,
    INFLIGHT,
    PENDING_INDEX,
    cancel_key,
    events_key,
    pending_key,
    record_key,
    request_hash_key,
    request_record_key,
)
from tasks.notifications import announce
from tasks.queued import find_queued
from tasks.records import OTHER, REQUEST_TTL, answered, claim_answer, find, make_record, store_unhashed
from tasks.requester import claimed
from tasks.state import BuildState

#: Seconds between two looks at the cancel flag while a stage runs.
WATCH_EVERY = 0.5


@dataclass(frozen=True)
class Cancelled:
    """What a cancel did: ``finished`` when the request had ended before (``record`` is then
    its answer), else ``record`` is the cancelled record it was answered with."""

    request_id: str
    record: dict[str, Any]
    finished: bool


def requests_of(client: redis.Redis, ident: str, everyone: bool = False) -> list[str]:
    """The request ids ``ident`` names: a request id (with ``everyone``, also every request
    attached to its build), or a source hash or tag (every request waiting on that build;
    the last one answered when none waits). Raises :class:`InputError` for an unknown id."""
    if _known_request(client, ident):
        ids = [ident]
        source_hash = client.get(request_hash_key(ident))
        if everyone and source_hash:
            ids += sorted(str(r) for r in client.hkeys(pending_key(str(source_hash)))
                          if str(r) != ident)
        return ids
    source_hash = _hash_of(client, ident)
    if source_hash is not None:
        waiting = sorted(str(r) for r in client.hkeys(pending_key(source_hash)))
        if waiting:
            return waiting
        raw = client.get(record_key(source_hash))
        if raw:
            return [str(json.loads(str(raw))["id"])]
    raise InputError(f"no request, source hash or tag {ident!r} is known.",
                     "Give a request id (printed by `buildq build` and `buildq build --detach`), "
                     "a source hash or a tag: buildq cancel <request-id | source-hash | tag> "
                     "[--all].")


def _known_request(client: redis.Redis, ident: str) -> bool:
    pipe = client.pipeline(transaction=False)
    for key in (request_hash_key(ident), request_record_key(ident), cancel_key(ident),
                events_key(ident)):
        pipe.exists(key)
    pipe.hexists(INFLIGHT, ident)
    if any(pipe.execute()) or answered(client, ident):
        return True
    return find_queued(client, ident) is not None


def _hash_of(client: redis.Redis, ident: str) -> str | None:
    if client.exists(record_key(ident)) or client.exists(pending_key(ident)):
        return ident
    if len(ident) < 8 or any(c not in "0123456789abcdef" for c in ident):
        return None
    for candidate in [*client.smembers(PENDING_INDEX), *client.zrevrange(HISTORY, 0, -1)]:
        if str(candidate).startswith(ident):
            return str(candidate)
    return None


def cancel(request_id: str, by: str | None = None) -> Cancelled:
    """Cancel ``request_id`` wherever it is (see the module's doc); returns what happened.

    Answers at once; the worker running the request stops within a second or at its next
    stage boundary, cleans up and releases the lock.
    """
    client = redis_client(settings())
    if answered(client, request_id):
        return Cancelled(request_id, _answer_of(client, request_id), finished=True)
    state = _state_of(client, request_id)
    canceller, at = by or claimed(), time.time()
    flag = {"by": canceller, "at": at}
    state.cancel(canceller, at)
    record = make_record(state)
    # The flag first: a chain that sees the answer claimed also finds why.
    client.set(cancel_key(request_id), json.dumps(flag), ex=REQUEST_TTL)
    if claim_answer(client, request_id, f"cancel:{uuid.uuid4().hex}", done="cancelled") == OTHER:
        # It ended meanwhile: its answer stands.
        client.delete(cancel_key(request_id))
        return Cancelled(request_id, _answer_of(client, request_id), finished=True)
    store_unhashed(client, record)
    if state.source_hash:
        client.hdel(pending_key(state.source_hash), request_id)
    app.backend.store_result(request_id, BuildCancelled(record), states.FAILURE)
    # To BUILDQ_NOTIFY_URL as the workers have it, and to the request's own receiver.
    announce(record, state.notify, settings(), everyone=True)
    return Cancelled(request_id, record, finished=False)


def _answer_of(client: redis.Redis, request_id: str) -> dict[str, Any]:
    found = find(client, request_id)
    return found if found is not None else {"id": request_id, "status": "unknown"}


def _state_of(client: redis.Redis, request_id: str) -> BuildState:
    """What is known of the request: its pending entry (hashed), its in-flight entry
    (fetching or hashing), else only its id (queued)."""
    source_hash = client.get(request_hash_key(request_id))
    raw = client.hget(pending_key(str(source_hash)), request_id) if source_hash else None
    raw = raw or client.hget(INFLIGHT, request_id)
    state = BuildState(request_id=request_id, source={})
    if raw:
        with contextlib.suppress(ValueError, TypeError):
            state = BuildState.from_dict(dict(json.loads(str(raw))))
            state.status = None
    if source_hash:
        state.source_hash = str(source_hash)
    return state


def cancelled(client: redis.Redis, request_id: str) -> dict[str, Any] | None:
    """The cancel flag of ``request_id`` (``by``, ``at``), or None."""
    raw = client.get(cancel_key(request_id))
    return dict(json.loads(str(raw))) if raw else None


def abandoned(client: redis.Redis, state: BuildState) -> dict[str, Any] | None:
    """The cancel flag of the chain's request when nobody else waits for its build: the
    chain should stop. A holder whose hash has other pending requests builds on for them."""
    flag = cancelled(client, state.request_id)
    if flag is None:
        return None
    if state.source_hash and state.token:
        others = [r for r in client.hkeys(pending_key(state.source_hash))
                  if str(r) != state.request_id]
        if others:
            return None
    return flag


#: The stop event of the stage running in this context (see :func:`watch`).
_stop: ContextVar[threading.Event | None] = ContextVar("buildq_cancel_stop", default=None)


class Watch:
    """What :func:`watch` saw: ``event`` is set, and ``flag`` filled, once the chain should stop."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.flag: dict[str, Any] | None = None


@contextlib.contextmanager
def watch(client: redis.Redis, state: BuildState,
          on_start: Callable[[], None] | None = None) -> Iterator[Watch]:
    """Look for a cancel while a stage body runs; :func:`current_stop` hands its event to
    whatever can be interrupted (the docker build). ``on_start`` runs first on the
    watcher's thread, once the stage outlives a moment."""
    seen = Watch()

    def look(done: threading.Event) -> None:
        if on_start is not None:
            on_start()
        while not done.wait(WATCH_EVERY):
            try:
                flag = abandoned(client, state)
            except redis.RedisError:
                continue  # a blip: the stage boundary looks again
            if flag is not None:
                seen.flag = flag
                seen.event.set()
                return

    token = _stop.set(seen.event)
    try:
        # The watcher starts only if the stage outlives a moment (a cache hit's do not).
        with companion(look, f"cancel-{state.request_id[:8]}", 2 * WATCH_EVERY):
            yield seen
    finally:
        _stop.reset(token)


def current_stop() -> threading.Event | None:
    """The event set when the running stage's request is cancelled (None outside a stage)."""
    return _stop.get()
