"""The per-source-hash build lock: one build per hash, however many requests.

A request takes the lock (``SET NX PX`` with a random token) or joins the hash's
pending map and lets its worker go. The token travels with the chain, so every
stage on any host can renew the lease while it works; a heartbeat thread does
that. Whoever finishes writes the record (a script that checks the token first),
answers every pending request, then releases the lock; until the release the
pending map stays, so a finisher cut off half-way is repeated or taken over and no
request is left without its answer. If a holder dies, the lease runs out and a
control worker's watchdog gives the lock to one of the pending requests (see
:func:`take_over`).

One lease epoch is the time one token holds the lock. A build stage notes its build
under the token before it starts, and a second one under the same token is refused,
so a stage delivered twice builds once; a build under a later token (the lease ran
out while the first still built) is allowed, and the record counts both.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.client import Pipeline

from tasks.background import companion
from tasks.keys import (
    HISTORY,
    INFLIGHT,
    PENDING_INDEX,
    answered_key,
    answering_key,
    builds_key,
    counted_builds_key,
    lease_key,
    lock_key,
    pending_key,
    record_key,
)
from tasks.scripts import add_script, script

#: How many hashes the history index keeps (and so how many hashes' records are kept).
HISTORY_SIZE = 10_000
#: How long the build notes a record counted are kept: a build that ends later than this
#: after its record (past any stage's time limit) is not looked for.
COUNTED_TTL_MS = 24 * 3600 * 1000


def new_token() -> str:
    return secrets.token_hex(16)


@dataclass
class Lease:
    """A claim on one source hash's lock, renewable from any process that has the token."""

    client: redis.Redis
    source_hash: str
    token: str
    lease_seconds: float
    request_id: str = ""
    #: The request's pending-map entry, to write back should Redis have lost it (crashed
    #: before its last writes reached the disk); empty: never written back.
    entry: dict[str, Any] | None = None
    lost: threading.Event = field(default_factory=threading.Event)

    @property
    def _lease_ms(self) -> int:
        return int(self.lease_seconds * 1000)

    def acquire(self, request: dict[str, Any]) -> bool:
        """Hold the lock, or register as a waiter; True when held. Either way the request
        leaves the in-flight map: the pending map keeps it restartable from here on."""
        return bool(script(self.client, "acquire")(*self._acquire_arguments(request)))

    def add_acquire(self, pipe: Pipeline, request: dict[str, Any]) -> Callable[[Any], bool]:
        """Queue :meth:`acquire` on ``pipe``; returns what reads its reply."""
        read = add_script(pipe, self.client, "acquire", *self._acquire_arguments(request))
        return lambda reply: bool(read(reply))

    def _acquire_arguments(self, request: dict[str, Any]) -> tuple[list[str], list[Any]]:
        return ([lock_key(self.source_hash), pending_key(self.source_hash), PENDING_INDEX,
                 INFLIGHT, lease_key(self.request_id)],
                [self.token, self._lease_ms, self.request_id, json.dumps(request),
                 self.source_hash])

    def extend(self, extra_seconds: float = 0.0) -> bool:
        """Renew (or, for a redelivered stage or a crashed Redis, retake) the lease; False
        when another owns it or the request was answered."""
        return self._held(script(self.client, "extend")(*self._extend_arguments(extra_seconds)))

    def add_extend(self, pipe: Pipeline) -> Callable[[Any], bool]:
        """Queue :meth:`extend` on ``pipe``; returns what reads its reply."""
        read = add_script(pipe, self.client, "extend", *self._extend_arguments(0.0))
        return lambda reply: self._held(read(reply))

    def _extend_arguments(self, extra_seconds: float) -> tuple[list[str], list[Any]]:
        return ([lock_key(self.source_hash), pending_key(self.source_hash),
                 answered_key(self.request_id), PENDING_INDEX],
                [self.token, int((self.lease_seconds + extra_seconds) * 1000), self.request_id,
                 json.dumps(self.entry) if self.entry else "", self.source_hash])

    def _held(self, reply: Any) -> bool:
        if not reply:
            self.lost.set()
        return bool(reply)

    def note_build(self, attempt: str, *, started: bool) -> bool:
        """Note a build by ``attempt`` (one run of a build stage), before (``started``) and
        after it. Before: False when it must not build (the lock is not ours, or this
        lease built already). After: False when the note came after the record counted
        the builds (see :func:`count_late_build`)."""
        noted = script(self.client, "build")(
            keys=[lock_key(self.source_hash), builds_key(self.source_hash),
                  pending_key(self.source_hash), counted_builds_key(self.source_hash)],
            args=[self.token, attempt, "start" if started else "end", COUNTED_TTL_MS],
        )
        return bool(noted)

    def forget_build(self, attempt: str) -> None:
        """Take back the note of a build that failed, so that its retry may build."""
        self.client.hdel(builds_key(self.source_hash), attempt)

    def build_notes(self) -> dict[str, str]:
        """Attempt → token of the builds made for the hash's pending requests so far."""
        return _notes(self.client.hgetall(builds_key(self.source_hash)))

    def survey(self, pipe: Pipeline) -> tuple[list[str], dict[str, str], str | None]:
        """What a finisher reads first, sent with whatever ``pipe`` carries already, in one
        round trip: the hash's pending requests, :meth:`build_notes`, and the attempt that
        answered this lease's own request (None: not answered)."""
        ours = len(pipe)
        pipe.hkeys(pending_key(self.source_hash))
        pipe.hgetall(builds_key(self.source_hash))
        pipe.get(answered_key(self.request_id))
        pending, notes, answered = pipe.execute()[ours:]
        return ([str(r) for r in pending], _notes(notes),
                str(answered) if answered is not None else None)

    def write_record(self, record: dict[str, Any], attempt: str, builds: int,
                     ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]] | str | None:
        """Store the record (the first one ``attempt`` writes stands) and keep the lock for
        the answers. Returns the stored record and the pending requests; None when the
        lock is not ours or another copy of this chain answers; ``"recount"`` when a build
        was noted since the caller counted ``builds``."""
        reply = script(self.client, "finish")(
            keys=[lock_key(self.source_hash), pending_key(self.source_hash),
                  record_key(self.source_hash), HISTORY, answering_key(self.source_hash),
                  builds_key(self.source_hash)],
            args=[self.token, json.dumps(record), self.source_hash, time.time(), HISTORY_SIZE,
                  attempt, self._lease_ms, builds, record_key("")],
        )
        if not reply:
            self.lost.set()
            return None
        if reply == ["recount"]:
            return "recount"
        stored, pairs = json.loads(reply[0]), reply[1:]
        return stored, {pairs[i]: json.loads(pairs[i + 1]) for i in range(0, len(pairs), 2)}

    def release(self, answered: list[str] | set[str]) -> bool:
        """Drop the answered requests and release the lock; False when it was not ours."""
        released = script(self.client, "release")(*self._release_arguments(answered))
        return bool(released)

    def add_release(self, pipe: Pipeline, answered: list[str] | set[str]) -> Callable[[Any], bool]:
        """Queue :meth:`release` on ``pipe`` behind the claims of the ``answered`` requests;
        returns what reads its reply. Should a claim not have run (see release.lua), the
        reader releases once more, so it must be called after the claims' readers."""
        read = add_script(pipe, self.client, "release",
                          *self._release_arguments(answered, claimed=True))

        def released(reply: Any) -> bool:
            result = read(reply)
            if result == -1:
                return self.release(answered)
            return bool(result)

        return released

    def _release_arguments(self, answered: list[str] | set[str], claimed: bool = False,
                           ) -> tuple[list[str], list[Any]]:
        ids = sorted(answered)
        return ([lock_key(self.source_hash), pending_key(self.source_hash), PENDING_INDEX,
                 answering_key(self.source_hash), builds_key(self.source_hash),
                 counted_builds_key(self.source_hash),
                 *(answered_key(r) for r in ids if claimed)],
                [self.token, self.source_hash, COUNTED_TTL_MS, *ids])

    def finish(self, record: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
        """Store the record and release at once; returns the pending requests, or None if
        the lock is not ours. For callers with nobody to answer in between."""
        attempt = new_token()
        while True:
            written = self.write_record(record, attempt, len(self.build_notes()))
            if written != "recount":
                break
        if written is None or isinstance(written, str):
            return None
        pending = written[1]
        self.release(set(pending))
        return pending

    def holder(self) -> str | None:
        value = self.client.get(lock_key(self.source_hash))
        return str(value) if value is not None else None

    @contextmanager
    def heartbeat(self) -> Iterator[Lease]:
        """Renew the lease every third of it while the block runs."""

        def beat(stop: threading.Event) -> None:
            while not stop.wait(self.lease_seconds / 3):
                try:
                    if not self.extend():
                        return
                except redis.RedisError:
                    # A blip must not kill the build; the next beat tries again.
                    continue

        with companion(beat, f"lease-{self.source_hash[:12]}", 5):
            yield self


def _notes(raw: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in raw.items()}


def take_over(client: redis.Redis, source_hash: str,
              lease_seconds: float) -> tuple[str, dict[str, dict[str, Any]]] | None:
    """If the hash's holder is gone and requests wait, take the lock for them.

    Returns the new token and the pending requests; the caller starts one chain
    with that token, which serves them all.
    """
    token = new_token()
    reply = script(client, "takeover")(
        keys=[lock_key(source_hash), pending_key(source_hash), PENDING_INDEX,
              answering_key(source_hash)],
        args=[token, int(lease_seconds * 1000), source_hash],
    )
    if not reply:
        return None
    pending = {reply[i]: json.loads(reply[i + 1]) for i in range(0, len(reply), 2)}
    # A holder that died while answering left some requests answered: they must not be
    # answered again, nor be the one the restarted chain runs for.
    answered = {r for r in pending if client.exists(answered_key(r))}
    if answered:
        pending = {r: v for r, v in pending.items() if r not in answered}
        if not pending:
            Lease(client, source_hash, token, lease_seconds).release(answered)
            return None
    return token, pending


def orphaned_hashes(client: redis.Redis) -> list[str]:
    """Hashes with pending requests whose lock is gone: candidates for a takeover."""
    hashes = sorted(str(h) for h in client.smembers(PENDING_INDEX))
    if not hashes:
        return []
    pipe = client.pipeline(transaction=False)
    for h in hashes:
        pipe.exists(lock_key(h))
    return [h for h, alive in zip(hashes, pipe.execute(), strict=True) if not alive]
