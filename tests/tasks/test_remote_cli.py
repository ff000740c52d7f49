"""The CLI against running workers: shipping a local directory, status, history, image jobs."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

from tasks import build_image, outcome
from tests.services import free_port
from tests.tasks.conftest import REPO, Cluster


def buildq(cluster: Cluster, *args: str, env: dict[str, str] | None = None,
           timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tasks.cli", *args], cwd=REPO,
                          env=env or cluster.env, capture_output=True, text=True, timeout=timeout)


def _app(tmp_path: Path, base: str) -> Path:
    root = tmp_path / "app"
    root.mkdir()
    (root / "Dockerfile").write_text(f"FROM {base}\nCOPY msg.txt /msg.txt\n")
    (root / "msg.txt").write_text(f"remote {uuid.uuid4()}\n")
    return root


def test_local_directory_is_shipped_through_the_store_and_removed_after(
        cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    app = _app(tmp_path, base_image)
    dest = f"{cluster.registry.host}/remote/shipped"
    done = buildq(cluster, "build", str(app), "--destination", dest, "--json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["status"] == "built"
    assert record["source"]["kind"] == "archive"
    assert cluster.registry.digest("remote/shipped", record["tag"]) == record["digest"]
    # Same tag as hashing the directory locally: shipping changes nothing the build sees.
    local = buildq(cluster, "hash", str(app))
    assert local.stdout.strip() == record["tag"]
    assert not list((cluster.root / "contexts").rglob("buildq-upload-*"))
    assert "uploaded" in done.stderr and "✓" not in done.stdout


def test_status_and_history_show_the_record(cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    app = _app(tmp_path, base_image)
    result = build_image.delay(str(app), destination=f"{cluster.registry.host}/remote/status")
    record = result.get(timeout=120)

    for ident in (result.id, record["source_hash"], record["tag"]):
        shown = buildq(cluster, "status", ident)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["digest"] == record["digest"]
    listed = buildq(cluster, "history", "-n", "50", "--json")
    assert record["source_hash"] in [r["source_hash"] for r in json.loads(listed.stdout)]
    missing = buildq(cluster, "status", "no-such-build")
    assert missing.returncode == 2 and "no record" in missing.stderr


def test_no_wait_prints_the_request_id(cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    app = _app(tmp_path, base_image)
    queued = buildq(cluster, "build", str(app), "--destination",
                    f"{cluster.registry.host}/remote/nowait", "--no-wait")
    assert queued.returncode == 0, queued.stderr
    request_id = queued.stdout.strip().splitlines()[-1]
    from celery.result import AsyncResult

    record = AsyncResult(request_id).get(timeout=120)
    assert record["id"] == request_id and record["status"] == "built"


def test_image_job_reports_the_registry_digest_without_building(
        cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    app = _app(tmp_path, base_image)
    built = build_image.delay(str(app), destination=f"{cluster.registry.host}/remote/image").get(
        timeout=120)
    record = build_image.delay(f"image:{built['image']}").get(timeout=60)
    assert record["status"] == "skipped"
    assert record["digest"] == built["digest"]
    assert "build" not in record["stages"]

    missing = outcome(build_image.delay(f"image:{cluster.registry.host}/remote/image:nope"),
                      timeout=60)
    assert missing["status"] == "failed"
    assert "does not exist" in missing["error"]


def test_docker_pool_refuses_to_start_without_an_engine(cluster: Cluster) -> None:
    env = {**cluster.env, "DOCKER_HOST": f"unix:///tmp/no-engine-{uuid.uuid4().hex}.sock"}
    started = buildq(cluster, "worker", "docker", env=env, timeout=60)
    assert started.returncode == 2
    assert "Docker Engine" in started.stderr and "Traceback" not in started.stderr


def test_worker_needs_a_broker(cluster: Cluster) -> None:
    env = {k: v for k, v in cluster.env.items() if k != "BUILDQ_REDIS_URL"}
    started = buildq(cluster, "worker", "control", env=env, timeout=60)
    assert started.returncode == 2 and "BUILDQ_REDIS_URL" in started.stderr


def test_unreachable_redis_is_a_clear_error(cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    env = {**cluster.env, "BUILDQ_REDIS_URL": url}
    done = buildq(cluster, "build", str(_app(tmp_path, base_image)), "--destination",
                  f"{cluster.registry.host}/x", env=env, timeout=60)
    assert done.returncode == 2
    assert "cannot reach Redis" in done.stderr and url in done.stderr
    assert "Traceback" not in done.stderr


def test_bad_options_are_refused_before_anything_is_queued(
        cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    app = _app(tmp_path, base_image)
    client = cluster.client()
    queued_before = client.llen("control")
    cases = [
        (["--destination", f"{cluster.registry.host}/Team/App"], "lowercase"),
        (["--destination", f"{cluster.registry.host}/x", "--entrypoint", "python 'unclosed"],
         "--entrypoint"),
        (["--destination", f"{cluster.registry.host}/x", "--python", "three"], "--python"),
    ]
    for options, named in cases:
        done = buildq(cluster, "build", str(app), *options, timeout=60)
        assert done.returncode == 2, done.stdout + done.stderr
        assert named in done.stderr and "Traceback" not in done.stderr
        assert "request " not in done.stderr and "uploaded" not in done.stderr
    assert client.llen("control") == queued_before
    assert not list((cluster.root / "contexts").rglob("buildq-upload-*"))
