"""``buildq worker`` with fault gates: a test can stop a chain at a chosen stage event.

Run as ``python -m tests.faults.gated_worker worker POOL ...`` (the same arguments as
``buildq``). Every stage of a chain emits ``stage`` events (``started`` before its
body, ``done`` after it); this wrapper holds the stage right after such an event when
the test has armed a gate for it, so the test can SIGKILL the worker, stop a service
or freeze the process at a known point, then let it go. Nothing here is in the
product: it wraps the ``emit`` the stage tasks call and, for the events sent with other
commands in one round trip, the stage task's ``_enter`` (a stage's started event, and the
done events before it) and ``finish`` (the record stage's done event); the gate then holds
the chain right after that call (a quick boundary's events wait for a later round trip,
but the chain is held at the same point).

Protocol (Redis keys, see :class:`Gates` in tests/faults/conftest.py):

- the test sets ``buildq:fault:arm:<stage>:<started|done>``;
- the first stage that reaches that event takes the arm (``GETDEL``, so exactly one
  chain stops), writes ``buildq:fault:held:<stage>:<event>`` = ``<worker pid> <pid>``
  and waits while that key exists;
- the test deletes the held key to let the stage go on (or kills the worker).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

import redis

#: Longest a gate holds a stage if the test never lets it go (a test bug, not a hang).
MAX_HOLD = 300.0


def _gate(client: Any, stage: str, event: str) -> None:
    name = f"{stage}:{event}"
    if client.getdel(f"buildq:fault:arm:{name}") is None:
        return
    held = f"buildq:fault:held:{name}"
    # The worker's main process leads its process group (the fixture starts a session).
    client.set(held, f"{os.getpgid(0)} {os.getpid()}", ex=int(MAX_HOLD))
    deadline = time.monotonic() + MAX_HOLD
    while client.exists(held) and time.monotonic() < deadline:
        time.sleep(0.05)


def install() -> None:
    import tasks.stages as stages

    real_emit = stages.emit

    def emit(client: Any, request_id: str, kind: str, **data: Any) -> None:
        real_emit(client, request_id, kind, **data)
        if kind == "stage" and data.get("state") in ("started", "done"):
            # Like emit itself, the gate must survive Redis going away (the restart test).
            with contextlib.suppress(redis.RedisError):
                _gate(client, str(data.get("stage")), str(data["state"]))

    stages.emit = emit
    real_emit_stages = stages.emit_stages

    def emit_stages(client: Any, request_id: str, unsent: list[dict[str, str]],
                    *more: tuple[str, dict[str, Any]]) -> None:
        sent = list(unsent)
        real_emit_stages(client, request_id, unsent, *more)
        if threading.current_thread() is threading.main_thread():
            # A chain handed over (or retried) after its stage: held right after the round
            # trip that carried that stage's done event. Not on a stage's watcher thread,
            # which sends the events of a long stage while the chain goes on.
            _done(client, sent)

    stages.emit_stages = emit_stages

    task = stages.StageTask
    real_enter, real_finish = task._enter, task.finish

    def _done(client: Any, events: list[dict[str, str]]) -> None:
        # The done event of the stage just before (earlier ones were gated at their turn).
        done = [e for e in events if e.get("state") == "done"]
        if done:
            with contextlib.suppress(redis.RedisError):
                _gate(client, done[-1]["stage"], "done")

    def enter(self: Any, stage: str, state: Any, cfg: Any, client: Any,
              unsent: list[dict[str, str]], look: bool = True, quick: bool = False) -> Any:
        # A quick boundary sends nothing and keeps its events for the next round trip; the
        # gates still hold here, where the chain is.
        before = list(unsent)
        entered = real_enter(self, stage, state, cfg, client, unsent, look, quick)
        _done(client, before)
        with contextlib.suppress(redis.RedisError):
            _gate(client, entered[0], "started")
        return entered

    def finish(self: Any, state: Any, client: Any, attempt: str,
               unsent: list[dict[str, str]] | None = None) -> Any:
        if unsent:
            # The events left (the record stage's done event among them) go with finish's
            # first round trip: send them alone here so the gate holds the chain before the
            # record is written.
            sent = list(unsent)
            real_emit_stages(client, state.request_id, unsent)
            _done(client, sent)
        return real_finish(self, state, client, attempt, [])

    task._enter = enter  # type: ignore[method-assign]
    task.finish = finish  # type: ignore[method-assign]


if __name__ == "__main__":
    install()
    from tasks.cli import main

    main()
