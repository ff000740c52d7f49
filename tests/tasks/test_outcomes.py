"""A failed build ends its Celery task in FAILURE (Flower, task-failed events and scripts see
it); built and skipped requests stay SUCCESS; the CLI's exit codes do not change."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tasks import BuildFailed, build_image, cancel, outcome
from tasks.failures import BuildCancelled, FailedBuild, record_of
from tasks.keys import request_hash_key
from tests import services
from tests.tasks.conftest import REPO, Cluster, tiny_app

FLOWER_LOGIN = ("flower", "outcomes-test-password")


@pytest.fixture(scope="module")
def flower(shared_cluster: Cluster) -> Iterator[str]:
    """Flower on the cluster's Redis, started before the builds so it sees their events."""
    cluster = shared_cluster
    port = services.free_port()
    log = (cluster.root / f"flower-{port}.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasks.cli", "flower", "--port", str(port), "--address", "127.0.0.1"],
        env={**cluster.env, "BUILDQ_FLOWER_BASIC_AUTH": ":".join(FLOWER_LOGIN)}, cwd=REPO,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        services.wait_for(lambda: requests.get(f"{url}/healthcheck", timeout=1).ok, 60, "flower")
        yield url
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


def _app(tmp_path: Path, base: str, step: str, name: str) -> Path:
    return tiny_app(tmp_path, base, name, step)


def _flower_task(url: str, task_id: str, state: str) -> dict[str, Any]:
    """Flower's view of ``task_id`` once it shows ``state`` (events reach Flower a moment
    after the result does)."""
    seen: dict[str, Any] = {}

    def shown() -> bool:
        r = requests.get(f"{url}/api/task/info/{task_id}", auth=FLOWER_LOGIN, timeout=10)
        seen.clear()
        if r.ok:
            seen.update(r.json())
        return seen.get("state") == state

    try:
        services.wait_for(shown, 60, f"Flower to show {task_id} as {state}")
    except Exception:
        raise AssertionError(f"Flower shows {seen}") from None
    return seen


def test_failed_build_is_a_failure_in_celery_and_flower_with_its_record(
        cluster: Cluster, flower: str, tmp_path: Path, base_image: str) -> None:
    dest = f"{cluster.registry.host}/outcomes/app"
    failing = build_image.delay(str(_app(tmp_path, base_image, "RUN sh -c 'exit 3'\n", "failing")),
                                destination=dest)
    with pytest.raises(FailedBuild) as raised:
        failing.get(timeout=180)
    record = raised.value.record
    assert isinstance(raised.value, BuildFailed)
    assert record["status"] == "failed" and record["error_kind"] == "build", record
    assert record["id"] == failing.id and "exit code 3" in record["error"]
    assert failing.state == "FAILURE"
    # What the README promises a script: the record whatever the status, and the same
    # record inside what .get(propagate=False) returns.
    assert outcome(failing, timeout=10) == record
    assert record_of(failing.get(timeout=10, propagate=False)) == record

    built_app = _app(tmp_path, base_image, "", "fine")
    built = build_image.delay(str(built_app), destination=dest)
    assert built.get(timeout=180)["status"] == "built"
    skipped = build_image.delay(str(built_app), destination=dest)
    assert skipped.get(timeout=180)["status"] == "skipped"
    assert built.state == skipped.state == "SUCCESS"

    # Flower (through its API) lists the failing build as failed, naming the error kind.
    shown = _flower_task(flower, failing.id, "FAILURE")
    assert "FailedBuild" in shown["exception"] and "exit code 3" in shown["exception"], shown
    _flower_task(flower, built.id, "SUCCESS")
    _flower_task(flower, skipped.id, "SUCCESS")
    failed_ids = set(requests.get(f"{flower}/api/tasks", params={"state": "FAILURE"},
                                  auth=FLOWER_LOGIN, timeout=30).json())
    assert failing.id in failed_ids and built.id not in failed_ids

    # A cancelled build ends failed too, as BuildCancelled.
    until = int(time.time()) + 60
    long_app = _app(tmp_path, base_image,
                    f"RUN echo go && while [ $(date +%s) -lt {until} ]; do sleep 0.2; done\n",
                    "cancelled")
    running = build_image.delay(str(long_app), destination=dest)
    services.wait_for(lambda: cluster.client().exists(request_hash_key(running.id)), 60,
                      "the long build to be hashed")
    cancel(running.id)
    with pytest.raises(BuildCancelled):
        running.get(timeout=60)
    shown = _flower_task(flower, running.id, "FAILURE")
    assert "BuildCancelled" in shown["exception"] and "cancelled by" in shown["exception"], shown

    # And its task page, in a headless browser: the Failed filter lists it.
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "scripts/bootstrap installs Debian's chromium"
    user, password = FLOWER_LOGIN
    page = f"http://{user}:{password}@127.0.0.1:{flower.rpartition(':')[2]}/tasks?state=FAILURE"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--virtual-time-budget=15000", "--window-size=1600,1000"]
    dom = subprocess.run([*flags, f"--user-data-dir={tmp_path / 'dom'}", "--dump-dom", page],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert failing.id in dom.stdout and "FAILURE" in dom.stdout, dom.stdout[-3000:]
    shot = tmp_path / "flower-failed.png"
    taken = subprocess.run([*flags, f"--user-data-dir={tmp_path / 'shot'}", f"--screenshot={shot}",
                            page], capture_output=True, text=True, timeout=120)
    assert taken.returncode == 0 and shot.stat().st_size > 10_000, taken.stderr[-2000:]
    print(f"\nscreenshot: {shot}")


def test_the_exception_survives_the_json_result_serializer_without_buildq_imported(
        cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    failing = build_image.delay(str(_app(tmp_path, base_image, "RUN sh -c 'exit 4'\n", "plain")),
                                destination=f"{cluster.registry.host}/outcomes/plain")
    record = outcome(failing, timeout=180)
    assert record["status"] == "failed"
    # A script that never imported buildq's modules: Celery rebuilds a stand-in class of the
    # same name, and the record is still its one argument.
    script = (
        "import json, sys\n"
        "from celery import Celery\n"
        f"app = Celery(backend={cluster.redis.url!r}, broker={cluster.redis.url!r})\n"
        "app.conf.accept_content = ['json']; app.conf.result_serializer = 'json'\n"
        f"exc = app.AsyncResult({failing.id!r}).get(propagate=False, timeout=30)\n"
        "print(type(exc).__name__); print(json.dumps(exc.args[0]))\n")
    seen = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert seen.returncode == 0, seen.stderr
    name, raw = seen.stdout.strip().splitlines()
    assert name == "FailedBuild" and json.loads(raw) == record


def test_cli_exit_codes_are_unchanged(cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    app = _app(tmp_path, base_image, "RUN sh -c 'exit 5'\n", "cli")
    run = subprocess.run([sys.executable, "-m", "tasks.cli", "build", str(app), "--destination",
                          f"{cluster.registry.host}/outcomes/cli", "--json"], cwd=REPO,
                         env=cluster.env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    record = json.loads(run.stdout.strip().splitlines()[-1])
    assert record["status"] == "failed" and "exit code 5" in record["error"]
