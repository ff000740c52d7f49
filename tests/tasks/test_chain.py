"""The whole chain through Redis, real workers, the Docker Engine and a registry."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tasks import build_image
from tasks.keys import INFLIGHT, events_key, lock_key
from tests.tasks.conftest import Cluster


def _app(tmp_path: Path, base: str, text: str, extra: str = "") -> Path:
    root = tmp_path / f"app-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    (root / "Dockerfile").write_text(f"FROM {base}\nCOPY msg.txt /msg.txt\n{extra}")
    (root / "msg.txt").write_text(text)
    return root


def test_build_then_rebuild_is_skipped_and_digest_matches_registry(
        cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    dest = f"{cluster.registry.host}/chain/rebuild"
    app = _app(tmp_path, base_image, f"first {uuid.uuid4()}\n")

    first = build_image.delay(str(app), destination=dest).get(timeout=120)
    assert first["status"] == "built", first
    assert first["attached"] is False
    assert first["digest"] == cluster.registry.digest("chain/rebuild", first["tag"])
    assert first["image"] == f"{dest}:{first['tag']}"
    assert len(first["tag"]) >= 16 and first["source_hash"].startswith(first["tag"])
    assert set(first["stages"]) >= {"fetch", "hash", "exists", "upload", "build", "push"}

    second = build_image.delay(str(app), destination=dest).get(timeout=60)
    assert second["status"] == "skipped", second
    assert second["digest"] == first["digest"]
    assert "build" not in second["stages"]

    (app / "msg.txt").write_text((app / "msg.txt").read_text() + "!")
    third = build_image.delay(str(app), destination=dest).get(timeout=120)
    assert third["status"] == "built"
    assert third["tag"] != first["tag"]
    assert cluster.registry.digest("chain/rebuild", third["tag"]) == third["digest"]
    # Contexts are deleted once the build ends, and the lock is free.
    assert not any((cluster.root / "contexts").glob("*.tar.gz"))
    assert cluster.client().get(lock_key(third["source_hash"])) is None


def test_twenty_identical_requests_cost_one_build(
        cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    dest = f"{cluster.registry.host}/chain/twenty"
    app = _app(tmp_path, base_image, f"twenty {uuid.uuid4()}\n", "RUN sleep 2\n")

    results = [build_image.delay(str(app), destination=dest) for _ in range(20)]
    with ThreadPoolExecutor(20) as pool:
        records = list(pool.map(lambda r: r.get(timeout=180), results))

    built = [r for r in records if r["status"] == "built" and not r["attached"]]
    assert len(built) == 1, [(r["status"], r["attached"]) for r in records]
    assert all(r["status"] in ("built", "skipped") for r in records)
    assert all(r["attached"] or r["status"] == "skipped" for r in records if r is not built[0])
    assert {r["digest"] for r in records} == {built[0]["digest"]}
    assert sorted(r["id"] for r in records) == sorted(r.id for r in results)
    assert cluster.registry.tags("chain/twenty") == [built[0]["tag"]]
    # One build ran: the log of this hash holds one docker build, not twenty.
    lines = [f["line"] for _, f in cluster.client().xrange(f"buildq:log:{built[0]['source_hash']}")]
    assert sum("RUN sleep 2" in line for line in lines) == 1, lines


def test_docker_worker_killed_mid_build_completes_exactly_once(
        cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    dest = f"{cluster.registry.host}/chain/killed"
    app = _app(tmp_path, base_image, f"killed {uuid.uuid4()}\n", "RUN sleep 6\n")
    result = build_image.delay(str(app), destination=dest)

    from tasks.app import app as celery_app

    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline:
        active = celery_app.control.inspect(timeout=0.5).active() or {}
        for hostname, running in active.items():
            # "name" is the display name (buildq.build_image:build); "type" the task itself.
            if any(t.get("type", t["name"]) == "buildq.build" for t in running):
                victim = cluster.workers[cluster.worker_pid(hostname)][1]
        time.sleep(0.2)
    assert victim is not None, "the build never started"
    time.sleep(1.5)  # mid-build
    killed_at = time.monotonic()
    cluster.kill(victim)
    replacement = cluster.start_worker("docker")
    try:
        record = result.get(timeout=120)
        elapsed = time.monotonic() - killed_at
        assert record["status"] == "built", record
        lease, build_time = 6, 6
        assert elapsed < lease + build_time + 20, elapsed
        assert cluster.registry.tags("chain/killed") == [record["tag"]]
        assert cluster.registry.digest("chain/killed", record["tag"]) == record["digest"]
        assert cluster.client().get(lock_key(record["source_hash"])) is None
        # A second request now is a plain skip: the first build was recorded once.
        again = build_image.delay(str(app), destination=dest).get(timeout=60)
        assert again["status"] == "skipped" and again["digest"] == record["digest"]
    finally:
        assert replacement.poll() is None


def test_git_source_by_tag_records_the_commit(
        cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    import subprocess

    work = _app(tmp_path, base_image, f"git {uuid.uuid4()}\n")
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q", "-b", "main", str(work)], check=True)
    subprocess.run([*git, "-C", str(work), "add", "."], check=True)
    subprocess.run([*git, "-C", str(work), "commit", "-qm", "one"], check=True)
    subprocess.run([*git, "-C", str(work), "tag", "v1"], check=True)
    sha = subprocess.run(["git", "-C", str(work), "rev-parse", "HEAD"], check=True,
                         capture_output=True, text=True).stdout.strip()
    bare = tmp_path / "repo.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)

    record = build_image.delay(bare.as_uri(), ref="v1",
                               destination=f"{cluster.registry.host}/chain/git").get(timeout=120)
    assert record["status"] == "built", record
    assert record["source"]["commit"] == sha
    assert record["source"]["ref"] == "v1"
    # The clone was a scratch dir: it is gone.
    assert not any((cluster.root / "work").iterdir())


def test_a_finished_request_restarted_by_the_watchdog_keeps_its_one_answer(
        cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    """A worker that lost Redis as it left the hash stage leaves its in-flight entry behind;
    the watchdog restarts that request although it finished. The copy must not answer again."""
    dest = f"{cluster.registry.host}/chain/answered"
    app = _app(tmp_path, base_image, f"answered {uuid.uuid4()}\n")
    result = build_image.delay(str(app), destination=dest)
    first = result.get(timeout=120)
    assert first["status"] == "built", first
    client = cluster.client()
    # What a lost `forget` leaves: the request's first state, and no lease.
    state = {"request_id": result.id, "source": first["source"], "destination": None,
             "ref": {"registry": cluster.registry.host, "repository": "chain/answered",
                     "tag": None, "digest": None},
             "builder": "docker", "config": {}}
    client.hset(INFLIGHT, result.id, json.dumps(state))

    deadline = time.monotonic() + 30
    while client.hexists(INFLIGHT, result.id):
        assert time.monotonic() < deadline, "the watchdog never took the entry"
        time.sleep(0.2)
    time.sleep(1)
    events = [f for _, f in client.xrange(events_key(result.id))]
    fetches = [e for e in events if e.get("stage") == "fetch" and e.get("state") == "started"]
    assert len(fetches) == 2, events  # the request's own chain, then the restarted copy
    assert [e["kind"] for e in events].count("done") == 1, events
    # The copy registered itself as it began; stopping, it leaves no entry to restart again.
    assert not client.hexists(INFLIGHT, result.id)
    again = build_image.AsyncResult(result.id).get(timeout=5)
    assert again == first


def _events(cluster: Cluster, request_id: str) -> list[str]:
    """A request's events as ``kind`` (``stage:state`` for a stage event)."""
    return [f"{f['stage']}:{f['state']}" if f.get("kind") == "stage" else f.get("kind", "")
            for _, f in cluster.client().xrange(events_key(request_id))]


def test_a_cache_hit_reports_every_stage_in_order(
        cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    # A hit's quick stages share their round trips: their events are sent later, never lost
    # and never out of order.
    dest = f"{cluster.registry.host}/chain/hit-events"
    app = _app(tmp_path, base_image, f"events {uuid.uuid4()}\n")
    assert build_image.delay(str(app), destination=dest).get(timeout=120)["status"] == "built"
    result = build_image.delay(str(app), destination=dest)
    assert result.get(timeout=60)["status"] == "skipped"
    events = _events(cluster, result.id)
    stages = [e for e in events if ":" in e]
    assert stages == [f"{s}:{state}" for s in ("fetch", "hash", "exists", "record")
                      for state in ("started", "done")], events
    assert events.index("hash:started") < events.index("hashed") < events.index("hash:done")
    assert events[-1] == "done", events


def test_a_long_stage_after_a_quick_one_is_seen_starting(
        cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    # The tag check follows a quick hash without a round trip of its own; when the registry
    # hangs, its started event must still reach a watcher while it runs.
    from tests.faults.proxy import FaultProxy

    host, port = cluster.registry.host.rsplit(":", 1)
    proxy = FaultProxy(host, int(port))
    try:
        dest = f"127.0.0.1:{proxy.port}/chain/long-exists"
        app = _app(tmp_path, base_image, f"long {uuid.uuid4()}\n")
        assert build_image.delay(str(app), destination=dest).get(timeout=120)["status"] == "built"
        proxy.stall()
        result = build_image.delay(str(app), destination=dest)
        deadline = time.monotonic() + 30
        while "exists:started" not in _events(cluster, result.id):
            assert time.monotonic() < deadline, _events(cluster, result.id)
            time.sleep(0.05)
        assert not result.ready()
        assert "exists:done" not in _events(cluster, result.id)
        proxy.up()
        assert result.get(timeout=60)["status"] == "skipped"
    finally:
        proxy.up()
        proxy.close()
