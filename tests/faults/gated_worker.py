"""``buildq worker`` with fault gates: a test can stop a chain at a chosen stage event.

Run as ``python -m tests.faults.gated_worker worker POOL ...`` (the same arguments as
``buildq``). Every stage of a chain emits ``stage`` events (``started`` before its
body, ``done`` after it); this wrapper holds the stage right after such an event when
the test has armed a gate for it, so the test can SIGKILL the worker, stop a service
or freeze the process at a known point, then let it go. Nothing here is in the
product: it wraps the ``emit`` the stage tasks call.

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


if __name__ == "__main__":
    install()
    from tasks.cli import main

    main()
