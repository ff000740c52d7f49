"""buildq cancel / tasks.cancel: a request stops wherever it is — queued, hashing, building
on the docker pool — answers ``cancelled``, leaves nothing behind, and the same request
asked again builds once.

The kaniko pool's place in the chain waits for a real Kubernetes control plane (the
Kubernetes issue); it is not tested here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks import build_image, cancel, outcome
from tasks.failures import BuildCancelled
from tasks.keys import INFLIGHT, events_key, lock_key, log_key, pending_key, request_hash_key
from tasks.queued import find_queued
from tests import services
from tests.faults.conftest import Gates
from tests.tasks.conftest import REPO, Cluster, make_cluster, tiny_app, use_cluster


class GatedCluster(Cluster):
    # Workers that a test can hold at a stage event (see tests/faults/gated_worker.py).
    worker_module = "tests.faults.gated_worker"


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory, docker_engine: str,
          registry: services.RegistryServer) -> Iterator[Cluster]:
    plain = make_cluster(tmp_path_factory.mktemp("cancel"), registry, lease=6)
    c = GatedCluster(plain.redis, plain.registry, plain.root, plain.env)
    # One slot per pool: a request held at a stage keeps the next one queued.
    c.start_worker("control", concurrency=1)
    c.start_worker("docker", concurrency=1)
    use_cluster(c)
    yield c
    c.stop_all()
    c.redis.stop()


@pytest.fixture
def gates(gated: Cluster) -> Iterator[Gates]:
    g = Gates(gated.client())
    yield g
    g.clear()


def _app(tmp_path: Path, base: str, name: str, step: str = "") -> Path:
    return tiny_app(tmp_path, base, name, step)


def buildq(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tasks.cli", *args], cwd=REPO, env=cluster.env,
                          capture_output=True, text=True, timeout=120)


def _assert_cancelled(record: dict, request_id: str) -> None:
    assert record["status"] == "cancelled" and record["error_kind"] == "cancelled", record
    assert record["id"] == request_id and record["digest"] is None
    assert record["cancelled_by"] and "@" in record["cancelled_by"]
    assert abs(record["cancelled_at"] - time.time()) < 600
    assert "cancelled by" in record["error"]


def _nothing_left(cluster: Cluster, request_id: str, repo: str) -> None:
    """No lock, pending entry, in-flight entry, context object, scratch directory or tag."""
    client = cluster.client()
    source_hash = client.get(request_hash_key(request_id))

    def clean() -> bool:
        return (not client.hexists(INFLIGHT, request_id)
                and not (source_hash and (client.exists(lock_key(source_hash))
                                          or client.hexists(pending_key(source_hash), request_id)))
                and not list((cluster.root / "contexts").rglob("*.tar.gz"))
                and not any((cluster.root / "work").iterdir()))

    # The answer comes first; the worker cleans up at its next look (half a second) or
    # stage boundary.
    services.wait_for(clean, 60, "the cancelled request's state to be cleaned up")
    assert cluster.registry.tags(repo) == []


def test_cancel_without_an_id_or_with_an_unknown_one_is_refused(gated: Cluster) -> None:
    missing = buildq(gated, "cancel")
    assert missing.returncode == 2 and "request-id | source-hash | tag" in missing.stderr
    unknown = buildq(gated, "cancel", "no-such-request")
    assert unknown.returncode == 2, unknown.stderr
    assert "no-such-request" in unknown.stderr and "request-id | source-hash | tag" in unknown.stderr
    assert "Traceback" not in missing.stderr + unknown.stderr


def test_a_queued_request_never_starts(gated: Cluster, gates: Gates, tmp_path: Path,
                                       base_image: str) -> None:
    dest = f"{gated.registry.host}/cancel/queued"
    gates.arm("fetch")
    first = build_image.delay(str(_app(tmp_path, base_image, "first")), destination=dest)
    gates.wait_held("fetch")
    queued_app = _app(tmp_path, base_image, "queued")
    queued = build_image.delay(str(queued_app), destination=f"{dest}-2")
    services.wait_for(lambda: find_queued(gated.client(), queued.id) is not None, 30,
                      "the second request in the control queue")

    done = buildq(gated, "cancel", queued.id)
    assert done.returncode == 0, done.stderr
    assert f"{queued.id}: cancelled" in done.stdout
    with pytest.raises(BuildCancelled) as raised:
        queued.get(timeout=10)
    _assert_cancelled(raised.value.record, queued.id)
    shown = json.loads(buildq(gated, "status", queued.id).stdout)
    assert shown["status"] == "cancelled"

    gates.release("fetch")
    assert first.get(timeout=180)["status"] == "built"
    client = gated.client()
    # The control worker takes the cancelled request's message next and drops it at once.
    services.wait_for(lambda: client.llen("control") == 0 and client.hlen("unacked") == 0, 60,
                      "the control queue to drain")
    kinds = [f.get("kind") for _, f in client.xrange(events_key(queued.id))]
    assert "stage" not in kinds and kinds.count("done") == 1, kinds
    assert queued.state == "FAILURE"
    _nothing_left(gated, queued.id, "cancel/queued-2")
    again = buildq(gated, "cancel", queued.id)
    assert again.returncode == 0 and "already finished (cancelled)" in again.stdout

    rebuilt = build_image.delay(str(queued_app), destination=f"{dest}-2").get(timeout=180)
    assert rebuilt["status"] == "built" and rebuilt["builds"] == 1, rebuilt


def test_a_request_cancelled_while_hashing_stops_and_cleans_up(
        gated: Cluster, gates: Gates, tmp_path: Path, base_image: str) -> None:
    work = _app(tmp_path, base_image, "hashing")
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q", "-b", "main", str(work)], check=True)
    subprocess.run([*git, "-C", str(work), "add", "."], check=True)
    subprocess.run([*git, "-C", str(work), "commit", "-qm", "one"], check=True)
    source = work.as_uri()
    dest = f"{gated.registry.host}/cancel/hashing"
    gates.arm("hash")
    result = build_image.delay(source, destination=dest)
    gates.wait_held("hash")
    # The clone is on disk, in the worker's scratch space.
    assert any((gated.root / "work").iterdir())

    done = cancel(result.id)
    assert not done.finished
    _assert_cancelled(done.record, result.id)
    gates.release("hash")
    _assert_cancelled(outcome(result, timeout=30), result.id)
    _nothing_left(gated, result.id, "cancel/hashing")
    assert result.state == "FAILURE"

    rebuilt = build_image.delay(source, destination=dest).get(timeout=180)
    assert rebuilt["status"] == "built" and rebuilt["builds"] == 1, rebuilt


def test_a_docker_build_is_stopped_on_the_engine_and_nothing_is_pushed(
        gated: Cluster, tmp_path: Path, base_image: str) -> None:
    # The step runs until a wall-clock moment 40 s ahead: the first build is cancelled long
    # before it, and the same request asked again afterwards finishes at that moment.
    until = int(time.time()) + 40
    marker = f"cancel-me-{uuid.uuid4().hex[:8]}"
    step = (f"RUN echo {marker} && while [ $(date +%s) -lt {until} ]; do sleep 0.2; done\n")
    app = _app(tmp_path, base_image, "docker", step)
    dest = f"{gated.registry.host}/cancel/docker"
    result = build_image.delay(str(app), destination=dest)
    client = gated.client()

    def step_running() -> bool:
        source_hash = client.get(request_hash_key(result.id))
        lines = [f.get("line", "") for _, f in client.xrange(log_key(source_hash))] if source_hash else []
        return any(marker in line and "echo" not in line for line in lines)

    services.wait_for(step_running, 120, "the RUN step to start")
    running = subprocess.run(["pgrep", "-f", f"lt {until}"], capture_output=True, text=True)
    assert running.stdout.strip(), "the RUN step's process is not on this host"

    done = buildq(gated, "cancel", result.id)
    assert done.returncode == 0 and "cancelled" in done.stdout, done.stderr
    _assert_cancelled(outcome(result, timeout=30), result.id)
    # The step's processes go with the build (they would run until `until` otherwise).
    services.wait_for(lambda: subprocess.run(["pgrep", "-f", f"lt {until}"],
                                             capture_output=True).returncode == 1,
                      until - time.time() - 5, "the RUN step's processes to be killed")
    _nothing_left(gated, result.id, "cancel/docker")

    rebuilt = build_image.delay(str(app), destination=dest).get(timeout=180)
    assert rebuilt["status"] == "built" and rebuilt["builds"] == 1, rebuilt
    assert gated.registry.tags("cancel/docker") == [rebuilt["tag"]]


def test_cancelling_an_attached_request_leaves_the_build_to_the_others(
        gated: Cluster, gates: Gates, tmp_path: Path, base_image: str) -> None:
    app = _app(tmp_path, base_image, "attached")
    dest = f"{gated.registry.host}/cancel/attached"
    gates.arm("build")
    holder = build_image.delay(str(app), destination=dest)
    gates.wait_held("build")
    waiter = build_image.delay(str(app), destination=dest)
    client = gated.client()
    services.wait_for(lambda: any(f.get("kind") == "attached"
                                  for _, f in client.xrange(events_key(waiter.id))),
                      60, "the second request to attach")
    done = buildq(gated, "cancel", waiter.id)
    assert done.returncode == 0, done.stderr
    gates.release("build")
    _assert_cancelled(outcome(waiter, timeout=30), waiter.id)
    record = holder.get(timeout=180)
    assert record["status"] == "built", record

    # --all on the hash's tag cancels every request of a build.
    app2 = _app(tmp_path, base_image, "all")
    gates.arm("build")
    first = build_image.delay(str(app2), destination=dest)
    gates.wait_held("build")
    second = build_image.delay(str(app2), destination=dest)
    services.wait_for(lambda: any(f.get("kind") == "attached"
                                  for _, f in client.xrange(events_key(second.id))),
                      60, "the second request to attach")
    done = buildq(gated, "cancel", first.id, "--all")
    assert done.returncode == 0, done.stderr
    assert f"{first.id}: cancelled" in done.stdout and f"{second.id}: cancelled" in done.stdout
    gates.release("build")
    _assert_cancelled(outcome(first, timeout=60), first.id)
    _assert_cancelled(outcome(second, timeout=60), second.id)
    source_hash = client.get(request_hash_key(first.id))
    services.wait_for(lambda: not client.exists(lock_key(source_hash)), 60, "the lock to go")
    assert record["tag"] in gated.registry.tags("cancel/attached")
    assert client.get(request_hash_key(first.id)) != record["source_hash"]
    assert len(gated.registry.tags("cancel/attached")) == 1
