"""Whether anybody is listening: a request waiting on a pool that has no live worker.

``buildq build`` follows a request through its stages; when the pool the request waits on
(control first, then docker or kaniko after the upload) has shown no worker for a while,
it says so instead of waiting in silence, and it gives up at ``--timeout`` if one is
given. ``buildq status`` finds a queued request in its pool's queue and says the same.
Workers show they are alive by their presence keys (:mod:`tasks.presence`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from tasks.app import ROUTES
from tasks.presence import PRESENCE_TTL, pool_alive

#: Seconds a waiting request's pool may show no worker before the CLI says so.
NOTICE_AFTER = 10.0
#: Seconds between two looks at the presence keys.
LOOK_EVERY = 1.0


def nobody_notice(pool: str, seconds: float) -> str:
    return f"no {pool} worker has been seen for {seconds:.0f} s: start one with buildq worker {pool}"


def pool_of(stage: str, builder: str | None) -> str:
    """The pool that runs ``stage`` of a request built by ``builder``."""
    if stage == "push" and builder == "kaniko":
        # Kaniko pushed already; the in-cluster pool verifies the push.
        return "kaniko"
    return ROUTES.get(f"buildq.{stage}", "control")


class Lookout:
    """Tracks which pool a request waits on, from its events, and whether that pool is alive.

    A pool's absence is timed from the first look that found none of its workers until one
    is seen, whatever the request did meanwhile: a chain restarted for its waiters (its
    lease ran out while it sat in a queue) passes through control again before it waits on
    the same absent pool. ``say`` gets each notice, once per absence.
    """

    def __init__(self, client: redis.Redis, builder: str | None, timeout: float | None,
                 say: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.builder = builder
        self.say = say
        self.clock = clock
        self.started = clock()
        self.deadline = self.started + timeout if timeout else None
        #: The pool whose worker must pick the request up next; None while one works on it.
        self.waiting_on: str | None = "control"
        #: The stage a worker runs now, if any.
        self.stage: str | None = None
        #: Per pool: when a look first found no worker of it (cleared when one is seen).
        self.absent_since: dict[str, float] = {}
        self.noticed: set[str] = set()
        self.last_look = -LOOK_EVERY

    def saw(self, event: dict[str, str]) -> None:
        kind, stage = event.get("kind"), event.get("stage", "")
        if kind == "stage" and event.get("state") == "started":
            self.stage, self.waiting_on = stage, None
        elif kind == "stage" and event.get("state") == "done":
            self.stage = None
            # After the upload the request crosses to the builder's pool; every other stage
            # is followed by one of its own pool (record runs where the chain ends).
            after = ("kaniko" if self.builder == "kaniko" else "build") if stage == "upload" else stage
            self.waiting_on = pool_of(after, self.builder)
        elif kind == "retry":
            # Handed back to the broker to wait out the countdown, for the same pool.
            self.stage, self.waiting_on = None, pool_of(stage, self.builder)
        elif kind in ("attached", "done"):
            # Answered by an identical build's record, or answered: nothing to pick up.
            self.stage, self.waiting_on = None, None

    def tick(self) -> None:
        """Look at the presence of the pool waited on (at most once a second); say when it
        has shown no worker for NOTICE_AFTER seconds."""
        now = self.clock()
        pool = self.waiting_on
        if pool is None or now - self.last_look < LOOK_EVERY:
            return
        self.last_look = now
        if pool_alive(self.client, pool):
            self.absent_since.pop(pool, None)
            self.noticed.discard(pool)
            return
        since = self.absent_since.setdefault(pool, now)
        if pool not in self.noticed and now - since >= NOTICE_AFTER:
            self.noticed.add(pool)
            # The threshold, not the moment of this look: looks come about once a second.
            self.say(nobody_notice(pool, NOTICE_AFTER))

    @property
    def expired(self) -> bool:
        return self.deadline is not None and self.clock() >= self.deadline

    def gave_up(self, request_id: str) -> tuple[str, str]:
        """The message and hint of a ``--timeout`` that passed."""
        now = self.clock()
        waited = f"gave up waiting after {now - self.started:.0f} s"
        pool = self.waiting_on
        if pool is not None:
            since = self.absent_since.get(pool)
            who = (f"no {pool} worker has been seen for {now - since:.0f} s" if since is not None
                   else f"every {pool} worker is busy")
            return (f"{waited}: request {request_id} is still queued for a {pool} worker ({who}). "
                    "It stays queued and is built when one takes it.",
                    (f"Start one with buildq worker {pool}; " if since is not None else "")
                    + f"follow the request with buildq status {request_id}.")
        return (f"{waited}: request {request_id} is still running"
                + (f" (stage {self.stage})" if self.stage else "") + "; it goes on without you.",
                f"Follow it with buildq status {request_id} and buildq logs {request_id}.")


def pool_notice(client: redis.Redis, pool: str) -> str | None:
    """What to say when ``pool`` has no live worker now (none renewed its presence within
    PRESENCE_TTL seconds), else None."""
    return None if pool_alive(client, pool) else nobody_notice(pool, PRESENCE_TTL)
