"""Horizontal scale on one machine, seen through the records, Flower and our metrics."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tasks import build_image
from tests.ops.cluster import FLOWER_LOGIN, OpsCluster, make_apps

pytestmark = pytest.mark.slow


def _sample(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(v for (n, lbls), v in samples.items()
               if n == name and all(dict(lbls).get(k) == want for k, want in labels.items()))


def test_thirty_builds_sixty_requests_five_workers(ops_cluster: OpsCluster, tmp_path: Path,
                                                   base_image: str) -> None:
    dest = f"{ops_cluster.registry.host}/ops/scale-{tmp_path.name[-6:].lower()}"
    apps = make_apps(tmp_path, base_image, 30)
    started = time.monotonic()
    # Distinct builds first, then a duplicate of each: the duplicates attach to a running
    # build or, if it already finished, find the image and skip.
    results = [build_image.delay(str(app), destination=dest) for app in apps]
    results += [build_image.delay(str(app), destination=dest) for app in apps]
    with ThreadPoolExecutor(16) as pool:
        records = list(pool.map(lambda r: r.get(timeout=600), results))
    wall = time.monotonic() - started

    assert sorted(r["id"] for r in records) == sorted(r.id for r in results)
    assert not [r for r in records if r["status"] not in ("built", "skipped")], records
    ran = [r for r in records if r["status"] == "built" and not r["attached"]]
    assert len(ran) == 30, Counter((r["status"], r["attached"]) for r in records)
    assert len({r["source_hash"] for r in ran}) == 30
    by_hash: dict[str, list[dict]] = {}
    for r in records:
        by_hash.setdefault(r["source_hash"], []).append(r)
    assert len(by_hash) == 30 and all(len(v) == 2 for v in by_hash.values())
    repo = dest.split("/", 1)[1]
    for r in records:
        # Every record names the image the registry really holds.
        assert r["image"] == f"{dest}:{r['tag']}"
        assert r["digest"] == ops_cluster.registry.digest(repo, r["tag"]), r
    assert len(ops_cluster.registry.tags(repo)) == 30

    # Every worker is seen by Flower, under its own -n name.
    workers = ops_cluster.flower_api("/api/workers", refresh="true")
    assert {n.name for n in ops_cluster.nodes} <= set(workers), sorted(workers)
    # Flower's task API lists each request (a chain keeps its request's task id).
    deadline = time.monotonic() + 30
    while True:
        tasks = ops_cluster.flower_api("/api/tasks", limit=10000)
        missing = {r.id for r in results} - set(tasks)
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing, f"{len(missing)} requests not in Flower"
    # A row names the request and the stage it ended in (buildq.build_image:record, or :hash
    # when it attached). Flower lets a late task-sent event put back the bare stage task name
    # (buildq.record), so only the prefix is certain for every row.
    names = Counter(str(tasks[r.id].get("name")) for r in results)
    assert all(name.startswith("buildq.") for name in names), names
    assert sum(n for name, n in names.items() if name.startswith("buildq.build_image")) > 30, names

    # Our counters agree with the records.
    control = ops_cluster.scrape("control")
    docker = ops_cluster.scrape("docker")
    outcomes = Counter("attached" if r["attached"] else r["status"] for r in records)
    # A chain writes its record where it ends: control for a skip, docker after a build.
    def both(name: str, **labels: str) -> float:
        return _sample(control, name, **labels) + _sample(docker, name, **labels)

    for outcome in ("built", "skipped", "attached", "failed"):
        assert both("buildq_builds_total", outcome=outcome) == outcomes[outcome], outcome
    assert _sample(docker, "buildq_builds_total", outcome="built") == outcomes["built"]
    assert _sample(docker, "buildq_stage_duration_seconds_count", stage="build") == 30
    assert _sample(docker, "buildq_stage_duration_seconds_count", stage="push") == 30
    assert both("buildq_lock_wait_seconds_count") == outcomes["attached"]
    assert _sample(control, "buildq_context_bytes_uploaded_total") > 0
    assert _sample(control, "buildq_queue_depth", queue="docker") == 0
    # Work really spread: every docker worker built something.
    per_worker = [_sample(ops_cluster.scrape_node(n), "buildq_stage_duration_seconds_count",
                          stage="build") for n in ops_cluster.nodes if n.pool == "docker"]
    assert all(count > 0 for count in per_worker), per_worker
    print(f"\nscale: 60 requests, 30 builds in {wall:.1f}s ({30 / wall * 60:.0f} builds/min),"
          f" outcomes {dict(outcomes)}, builds per docker worker {per_worker}")


def test_json_logs_have_one_event_per_stage(ops_cluster: OpsCluster, tmp_path: Path,
                                            base_image: str) -> None:
    import json

    (app,) = make_apps(tmp_path, base_image, 1)
    record = build_image.delay(str(app), destination=f"{ops_cluster.registry.host}/ops/logs").get(
        timeout=120)
    assert record["status"] == "built"
    events = []
    for node in ops_cluster.nodes:
        for line in node.log.read_text().splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("event") == "stage" and entry.get("request_id") == record["id"]:
                    events.append(entry)
    assert sorted(e["stage"] for e in events) == sorted(record["stages"])
    for e in events:
        assert e["source_hash"] in (None, record["source_hash"])
        assert e["task_id"] == record["id"] and e["duration"] >= 0
    assert {e["source_hash"] for e in events if e["stage"] != "fetch"} == {record["source_hash"]}


def test_flower_tasks_page_in_headless_chromium(ops_cluster: OpsCluster, tmp_path: Path,
                                                base_image: str) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (scripts/bootstrap installs it)")
    (app,) = make_apps(tmp_path, base_image, 1)
    record = build_image.delay(str(app), destination=f"{ops_cluster.registry.host}/ops/ui").get(
        timeout=120)
    assert record["status"] == "built"
    user, password = FLOWER_LOGIN
    url = f"http://{user}:{password}@127.0.0.1:{ops_cluster.flower_port}/tasks"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-quic", "--no-first-run",
             "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
             # Let the page's scripts fetch the task table before the DOM is taken.
             "--virtual-time-budget=15000", "--window-size=1600,1000"]

    def run(*extra: str, profile: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*flags, f"--user-data-dir={tmp_path / profile}", *extra, url],
                              capture_output=True, text=True, timeout=120)

    dom = run("--dump-dom", profile="profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "buildq.build_image" in dom.stdout, dom.stdout[-3000:]
    assert record["id"] in dom.stdout
    shot = tmp_path / "flower-tasks.png"
    taken = run(f"--screenshot={shot}", profile="profile-shot")
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.stat().st_size > 10_000
    print(f"\nscreenshot: {shot}")
