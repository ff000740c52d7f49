"""The per-source-hash build lock: one build per hash, however many requests.

A request takes the lock (``SET NX PX`` with a random token) or joins the hash's
pending map and lets its worker go. The token travels with the chain, so every
stage on any host can renew the lease while it works; a heartbeat thread does
that. Whoever finishes writes the record, hands it to every pending request and
releases the lock, all in one script that checks the token first. If a holder
dies, the lease runs out and a control worker's watchdog gives the lock to one
of the pending requests (see :func:`take_over`).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis

from tasks.keys import HISTORY, PENDING_INDEX, lock_key, pending_key, record_key
from tasks.scripts import script

#: How many hashes the history index keeps.
HISTORY_SIZE = 10_000


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
    lost: threading.Event = field(default_factory=threading.Event)

    @property
    def _lease_ms(self) -> int:
        return int(self.lease_seconds * 1000)

    def acquire(self, request: dict[str, Any]) -> bool:
        """Hold the lock, or register as a waiter; True when held."""
        held = script(self.client, "acquire")(
            keys=[lock_key(self.source_hash), pending_key(self.source_hash), PENDING_INDEX],
            args=[self.token, self._lease_ms, self.request_id, json.dumps(request),
                  self.source_hash],
        )
        return bool(held)

    def extend(self, extra_seconds: float = 0.0) -> bool:
        """Renew (or, for a redelivered stage, retake) the lease; False when another owns it."""
        held = script(self.client, "extend")(
            keys=[lock_key(self.source_hash), pending_key(self.source_hash)],
            args=[self.token, int((self.lease_seconds + extra_seconds) * 1000), self.request_id],
        )
        if not held:
            self.lost.set()
        return bool(held)

    def finish(self, record: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
        """Store the record and release; returns the pending requests, or None if not ours."""
        reply = script(self.client, "finish")(
            keys=[lock_key(self.source_hash), pending_key(self.source_hash), PENDING_INDEX,
                  record_key(self.source_hash), HISTORY],
            args=[self.token, json.dumps(record), self.source_hash, time.time(), HISTORY_SIZE],
        )
        if not reply:
            self.lost.set()
            return None
        pairs = reply[1:]
        return {pairs[i]: json.loads(pairs[i + 1]) for i in range(0, len(pairs), 2)}

    def holder(self) -> str | None:
        value = self.client.get(lock_key(self.source_hash))
        return str(value) if value is not None else None

    @contextmanager
    def heartbeat(self) -> Iterator[Lease]:
        """Renew the lease every third of it while the block runs."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.lease_seconds / 3):
                try:
                    if not self.extend():
                        return
                except redis.RedisError:
                    # A blip must not kill the build; the next beat tries again.
                    continue

        thread = threading.Thread(target=beat, name=f"lease-{self.source_hash[:12]}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(timeout=5)


def take_over(client: redis.Redis, source_hash: str,
              lease_seconds: float) -> tuple[str, dict[str, dict[str, Any]]] | None:
    """If the hash's holder is gone and requests wait, take the lock for them.

    Returns the new token and the pending requests; the caller starts one chain
    with that token, which serves them all.
    """
    token = new_token()
    reply = script(client, "takeover")(
        keys=[lock_key(source_hash), pending_key(source_hash), PENDING_INDEX],
        args=[token, int(lease_seconds * 1000), source_hash],
    )
    if not reply:
        return None
    pending = {reply[i]: json.loads(reply[i + 1]) for i in range(0, len(reply), 2)}
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
