"""Threads that keep a stage company (lease renewal, the cancel watch), started only once
the stage has run a moment.

Each stage used to start and join two such threads; a cache hit's stages end in a few
milliseconds, before any of them would have done anything, and starting and joining a
thread costs ~0.1 ms, up to ~1 ms on a busy host, four stages over. One starter thread
per process starts a companion when its stage outlives :data:`START_AFTER`; a stage that
ends sooner never has one. The starter only starts threads, never waits on Redis, so a
stuck companion cannot hold up another one.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

#: How long a stage runs before its companions start: far below any of their intervals
#: (the cancel watch looks every 0.5 s, lease renewals come every third of a lease).
START_AFTER = 0.05


class _Companion:
    """One companion thread: waiting to start, started, or not needed any more. Its fields
    change under the starter's lock."""

    __slots__ = ("ended", "name", "stop", "target", "thread")

    def __init__(self, target: Callable[[threading.Event], None], name: str) -> None:
        self.target = target
        self.name = name
        self.stop: threading.Event | None = None
        self.thread: threading.Thread | None = None
        self.ended = False


class _Starter:
    """The process's one starter thread and its queue of companions by start time."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.queue: list[tuple[float, int, _Companion]] = []
        self.order = itertools.count()
        self.pid = 0

    def add(self, companion: _Companion) -> None:
        with self.cond:
            if self.pid != os.getpid():
                # First use in this process (a forked worker child inherits no threads).
                self.pid = os.getpid()
                self.queue.clear()
                threading.Thread(target=self._run, name="stage-companions", daemon=True).start()
            heapq.heappush(self.queue, (time.monotonic() + START_AFTER, next(self.order), companion))
            # Entries come in start-time order: only one that heads the queue (it was empty)
            # changes when the starter must wake. A wake-up per stage would cost a thread
            # switch each, on a host busy with cache hits.
            if self.queue[0][2] is companion:
                self.cond.notify()

    def end(self, companion: _Companion, join_timeout: float) -> None:
        with self.cond:
            companion.ended = True
            thread, stop = companion.thread, companion.stop
        if thread is not None and stop is not None:
            stop.set()
            thread.join(timeout=join_timeout)

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queue or self.queue[0][0] > time.monotonic():
                    self.cond.wait(self.queue[0][0] - time.monotonic() if self.queue else None)
                _, _, due = heapq.heappop(self.queue)
                # The ones behind it whose stages ended meanwhile go now, not at a wake-up
                # each: most stages end long before their companion's start time.
                while self.queue and self.queue[0][2].ended:
                    heapq.heappop(self.queue)
                if due.ended:
                    continue
                # Started under the lock, so that ``end`` never finds a thread not started.
                due.stop = threading.Event()
                due.thread = threading.Thread(target=due.target, args=(due.stop,),
                                              name=due.name, daemon=True)
                due.thread.start()


_starter = _Starter()


def _after_fork_in_child() -> None:
    # The parent's lock may have been held by one of its threads at the fork.
    global _starter
    _starter = _Starter()


os.register_at_fork(after_in_child=_after_fork_in_child)


@contextmanager
def companion(target: Callable[[threading.Event], None], name: str,
              join_timeout: float) -> Iterator[None]:
    """Run ``target(stop)`` on a thread of its own while the block runs, from
    :data:`START_AFTER` into it; ``stop`` is set when the block ends, and the thread is
    waited for up to ``join_timeout``. A block that ends sooner starts no thread."""
    entry = _Companion(target, name)
    starter = _starter
    starter.add(entry)
    try:
        yield
    finally:
        starter.end(entry, join_timeout)
