"""The pieces that clean up after a killed worker, against a real Redis and real processes:
the scratch-dir sweep and the reclaim of requests that died before taking a lock."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import redis

from config.settings import Settings
from tasks.inflight import reclaim_orphans, register, tracked
from tasks.keys import INFLIGHT, lease_key
from tasks.state import BuildState
from workers.sources.base import scratch_dir, scratch_orphaned, sweep_workdir


def test_sweep_removes_the_scratch_dir_of_a_dead_process_only(tmp_path: Path) -> None:
    made = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from workers.sources.base import scratch_dir; "
         "print(scratch_dir(Path(sys.argv[1]), 'git'))", str(tmp_path)],
        check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    dead = Path(made.stdout.strip())
    # Its maker exited, but its maker's parent (this test) lives: kept.
    assert dead.is_dir() and not scratch_orphaned(dead)
    # A maker whose parent is gone too: a killed worker's (pids that cannot exist here).
    orphan = tmp_path / f"{dead.name.rsplit('.', 2)[0]}.4194304.4194303-abcd1234"
    orphan.mkdir()
    mine = scratch_dir(tmp_path, "archive")
    other_host = tmp_path / "buildq-git-otherhost.4194304.4194303-abcd1234"
    other_host.mkdir()
    unknown = tmp_path / "someone-elses"
    unknown.mkdir()

    sweep_workdir(Settings(workdir=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [dead.name, mine.name, other_host.name, unknown.name])


def test_request_lost_before_the_lock_is_reclaimed_once(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    state = BuildState(request_id="req-1", source={"kind": "git", "location": "file:///x"},
                       workdir="/tmp/on-a-dead-host", owned=True)
    register(client, state, 0.3)
    assert reclaim_orphans(client, 5.0) == []  # its worker is alive (the lease runs)
    time.sleep(0.4)
    (reclaimed,) = reclaim_orphans(client, 5.0)
    assert reclaimed["request_id"] == "req-1"
    assert reclaimed["workdir"] is None and reclaimed["owned"] is False
    # The restart holds a fresh lease: nobody else restarts it meanwhile.
    assert reclaim_orphans(client, 5.0) == []


def test_tracking_ends_once_the_request_has_a_hash_or_failed(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    fetched = BuildState(request_id="req-fetch", source={})
    with tracked(client, fetched, 5.0):
        pass  # fetch done, hash next: still tracked
    assert json.loads(str(client.hget(INFLIGHT, "req-fetch")))["request_id"] == "req-fetch"
    assert client.pttl(lease_key("req-fetch")) > 0

    hashed = BuildState(request_id="req-fetch", source={}, source_hash="ab" * 32)
    with tracked(client, hashed, 5.0):
        pass
    failed = BuildState(request_id="req-failed", source={})
    try:
        with tracked(client, failed, 5.0):
            raise RuntimeError("the stage broke")
    except RuntimeError:
        pass
    assert client.hlen(INFLIGHT) == 0
    assert not client.exists(lease_key("req-fetch")) and not client.exists(lease_key("req-failed"))
