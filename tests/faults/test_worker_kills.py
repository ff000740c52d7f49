"""A worker SIGKILLed in each stage of the chain: the build completes exactly once, the
lock outlives its holder by at most the lease, and nothing is left behind."""

from __future__ import annotations

import time
from pathlib import Path

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

#: Where each kill lands: the stage, and whether before its body ("started") or after it
#: ("done", its work finished but the next stage not yet queued).
KILLS = [
    ("fetch", "started"),   # control worker; no lock yet
    ("fetch", "done"),      # control worker; the clone is in the workdir, no lock yet
    ("hash", "started"),    # control worker; no lock yet
    ("exists", "started"),  # control worker; lock held
    ("upload", "done"),     # control worker; the context is in the store
    ("build", "started"),   # docker worker
    ("push", "started"),    # docker worker; the image is built, not pushed
    ("record", "started"),  # docker worker (record runs where the chain ends); pushed, unrecorded
]


def _hash_of(faults: FaultCluster, request_id: str) -> str | None:
    return next((e["source_hash"] for e in events(faults.client(), request_id)
                 if e.get("kind") == "hashed"), None)


@pytest.mark.parametrize(("stage", "event"), KILLS, ids=[f"{s}-{e}" for s, e in KILLS])
def test_worker_killed_in_stage_builds_once_and_leaves_nothing(
        faults: FaultCluster, gates: Gates, tmp_path: Path, base_image: str,
        stage: str, event: str) -> None:
    repository = f"faults/kill-{stage}-{event}"
    marker = f"ran-the-build-step-{stage}"
    source = git_app(tmp_path, base_image, f"RUN echo {marker}\n")
    gates.arm(stage, event)
    result = build_image.delay(source, destination=f"{faults.registry.host}/{repository}")

    pgid = gates.wait_held(stage, event)
    source_hash = _hash_of(faults, result.id)
    token = faults.client().get(lock_key(source_hash)) if source_hash else None
    faults.kill_group(pgid)
    killed_at = time.monotonic()
    gates.release(stage, event)
    faults.top_up()

    if token is not None:
        # The dead holder's claim runs out within its lease (renewed at most a lease ago).
        assert source_hash is not None
        client = faults.client()
        while client.get(lock_key(source_hash)) == token:
            assert time.monotonic() - killed_at <= LEASE + 0.5, "the lock outlived its lease"
            time.sleep(0.1)

    record = result.get(timeout=120)
    assert_one_image(faults, repository, record)
    # A restarted chain answers the request before it logs its own end: let it finish.
    wait_quiet(faults)
    client = faults.client()
    # Exactly one record was written for the request, and the build step ran once
    # (a rebuild after the kill reuses the engine's cache and prints nothing).
    assert [e["status"] for e in events(client, result.id) if e.get("kind") == "done"] \
        == [record["status"]]
    assert step_runs(client, record["source_hash"], marker) == 1
    assert_nothing_left(faults, record)

    again = build_image.delay(source, destination=f"{faults.registry.host}/{repository}")
    second = again.get(timeout=60)
    assert second["status"] == "skipped" and second["digest"] == record["digest"]
