"""A stage's companion threads start only when the stage outlives a moment."""

from __future__ import annotations

import os
import threading
import time

from tasks.background import START_AFTER, companion


def test_a_stage_that_outlives_the_delay_gets_its_companion_and_stops_it() -> None:
    started, stopped = threading.Event(), threading.Event()

    def target(stop: threading.Event) -> None:
        started.set()
        stop.wait()
        stopped.set()

    with companion(target, "test-companion", join_timeout=10):
        assert started.wait(30)
    assert stopped.is_set()


def test_a_stage_that_ends_at_once_starts_no_thread() -> None:
    started = threading.Event()

    def target(stop: threading.Event) -> None:
        started.set()

    with companion(target, "test-companion", join_timeout=10):
        pass
    # Past its start time: the starter has seen it, and found it ended.
    time.sleep(START_AFTER * 4)
    assert not started.is_set()
    assert not any(t.name == "test-companion" for t in threading.enumerate())


def test_a_forked_child_starts_companions_of_its_own() -> None:
    with companion(lambda stop: None, "test-companion", join_timeout=10):
        pass  # the parent's starter thread exists now
    pid = os.fork()
    if pid == 0:
        started = threading.Event()
        ok = False

        def target(stop: threading.Event) -> None:
            started.set()

        try:
            with companion(target, "test-companion", join_timeout=10):
                ok = started.wait(30)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
