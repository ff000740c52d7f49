"""The lock's lease under slow and stalled holders, and a worker stopped gracefully."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tasks import build_image
from tasks.keys import lock_key
from tests.faults.conftest import (
    LEASE,
    FaultCluster,
    Gates,
    assert_nothing_left,
    assert_one_image,
    events,
    git_app,
    step_runs,
    wait_quiet,
)

pytestmark = pytest.mark.faults

#: How often a control worker's watchdog looks for dead holders (tasks/cli/pools.py).
WATCHDOG_INTERVAL = max(0.5, min(10.0, LEASE / 3))


def _build_runs(faults: FaultCluster, source_hash: str, marker: str) -> int:
    return step_runs(faults.client(), source_hash, marker)


def _wait_hash(faults: FaultCluster, request_id: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in events(faults.client(), request_id):
            if e.get("kind") == "hashed":
                return e["source_hash"]
        time.sleep(0.1)
    raise AssertionError("the request was never hashed")


def test_build_longer_than_the_lease_keeps_its_lock_and_runs_once(
        faults: FaultCluster, tmp_path: Path, base_image: str) -> None:
    marker = "ran-the-long-build"
    build_seconds = 3 * LEASE
    source = git_app(tmp_path, base_image, f"RUN echo {marker} && sleep {build_seconds:.0f}\n")
    dest = f"{faults.registry.host}/faults/long-build"
    first = build_image.delay(source, destination=dest)
    source_hash = _wait_hash(faults, first.id)
    client = faults.client()
    token = client.get(lock_key(source_hash))
    assert token is not None

    # While it builds, the lock stays with the first holder, never past one lease ahead,
    # and requests arriving meanwhile (one per lease) wait for it.
    later: list[Any] = []
    ttls: list[float] = []
    deadline = time.monotonic() + build_seconds + 120
    while not first.ready():
        assert time.monotonic() < deadline, "the long build never ended"
        if len(later) < 3 and time.monotonic() % LEASE < 0.2:
            later.append(build_image.delay(source, destination=dest))
        holder = client.get(lock_key(source_hash))
        if first.ready():
            break
        if holder is not None:
            assert holder == token
            ttls.append(client.pttl(lock_key(source_hash)) / 1000)
        time.sleep(0.1)
    record = first.get(timeout=10)
    records = [r.get(timeout=120) for r in later]

    assert record["status"] == "built" and not record["attached"], record["error"]
    assert record["stages"]["build"] > 2 * LEASE
    assert ttls and max(ttls) <= LEASE + 0.1 and min(ttls) > 0
    assert all(r["digest"] == record["digest"] for r in records)
    assert all(r["attached"] or r["status"] == "skipped" for r in records)
    assert _build_runs(faults, source_hash, marker) == 1
    assert_one_image(faults, "faults/long-build", record)
    wait_quiet(faults)
    assert_nothing_left(faults, record)


def test_frozen_holder_loses_the_lock_to_one_waiter_and_cannot_touch_it_after(
        faults: FaultCluster, gates: Gates, tmp_path: Path, base_image: str) -> None:
    marker = "ran-the-frozen-build"
    source = git_app(tmp_path, base_image, f"RUN echo {marker} && sleep 8\n")
    dest = f"{faults.registry.host}/faults/frozen"
    gates.arm("build")
    first = build_image.delay(source, destination=dest)
    pgid = gates.wait_held("build")
    source_hash = _wait_hash(faults, first.id)
    client = faults.client()
    frozen_token = client.get(lock_key(source_hash))
    os.killpg(pgid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        gates.release("build")
        waiters = [build_image.delay(source, destination=dest) for _ in range(3)]
        # One waiter takes over once the frozen holder's lease has run out.
        while client.get(lock_key(source_hash)) in (frozen_token, None):
            assert time.monotonic() - frozen_at <= LEASE + 2 * WATCHDOG_INTERVAL + 2, \
                "no takeover within the lease"
            time.sleep(0.1)
        successor = client.get(lock_key(source_hash))
        # Let the new holder start its build, then wake the frozen one up in the middle of it.
        while _build_runs(faults, source_hash, marker) < 1:
            assert time.monotonic() - frozen_at <= 120, "the successor never built"
            time.sleep(0.1)
    finally:
        os.killpg(pgid, signal.SIGCONT)
    # The woken holder must not release or overwrite the successor's lock meanwhile.
    deadline = time.monotonic() + 120
    while True:
        holder = client.get(lock_key(source_hash))
        if holder is None:
            break
        assert holder == successor
        assert time.monotonic() < deadline, "the successor never released its lock"
        time.sleep(0.05)

    record = first.get(timeout=120)
    others = [w.get(timeout=60) for w in waiters]
    wait_quiet(faults, timeout=60)
    assert record["status"] == "built", record["error"]
    assert {r["digest"] for r in others} == {record["digest"]}
    assert_one_image(faults, "faults/frozen", record)
    # One record for the request, written by the successor's chain.
    assert [e["status"] for e in events(client, first.id) if e.get("kind") == "done"] == ["built"]
    assert_nothing_left(faults, record)
    assert client.get(lock_key(source_hash)) is None


def test_worker_stopped_gracefully_mid_build_finishes_its_build(
        faults: FaultCluster, gates: Gates, tmp_path: Path, base_image: str) -> None:
    marker = "ran-the-sigterm-build"
    source = git_app(tmp_path, base_image, f"RUN echo {marker} && sleep 2\n")
    gates.arm("build")
    result = build_image.delay(source, destination=f"{faults.registry.host}/faults/sigterm")
    pgid = gates.wait_held("build")
    proc = faults.workers[pgid][1]
    # As `docker stop` or the kubelet would: SIGTERM to the worker's main process.
    os.kill(pgid, signal.SIGTERM)
    time.sleep(1)
    gates.release("build")

    record = result.get(timeout=120)
    assert proc.wait(60) == 0
    assert record["status"] == "built", record["error"]
    assert_one_image(faults, "faults/sigterm", record)
    assert _build_runs(faults, record["source_hash"], marker) == 1
    wait_quiet(faults)
    assert_nothing_left(faults, record)
