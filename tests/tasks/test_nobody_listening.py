"""Nobody listening: a request waits on a pool that has no live worker, and is told so.

End to end, with the real ``buildq`` command, its own Redis and workers started or not:
``buildq build`` says which pool is missing after 10 s (control, or docker once control
has handed the request over), keeps waiting until a worker comes, or stops at
``--timeout`` with exit 2 leaving the request queued; ``buildq status`` shows the queued
request and the same warning. The tracking itself (which pool a request waits on, across
handovers, retries and a restart) is checked against a real Redis with a stepped clock.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tasks.cli.lookout import NOTICE_AFTER, Lookout
from tasks.presence import announce
from tasks.queued import find_queued
from tests import services
from tests.tasks.conftest import REPO, Cluster, make_cluster

CONTROL_NOTICE = ("warning: no control worker has been seen for 10 s: "
                  "start one with buildq worker control")
DOCKER_NOTICE = ("warning: no docker worker has been seen for 10 s: "
                 "start one with buildq worker docker")


class Running:
    """``buildq ...`` in the background, its stderr lines stamped with when they came."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "tasks.cli", *args], cwd=REPO,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[tuple[float, str]] = []
        self.stdout: list[str] = []
        self.readers = [threading.Thread(target=self._read_err, daemon=True),
                        threading.Thread(target=self._read_out, daemon=True)]
        for reader in self.readers:
            reader.start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        self.stdout.extend(self.proc.stdout)

    def at(self, text: str) -> float | None:
        """When a stderr line starting with ``text`` came, else None."""
        return next((t for t, line in list(self.lines) if line.startswith(text)), None)

    def request_id(self) -> str:
        services.wait_for(lambda: self.at("request ") is not None, 60, "the request id")
        line = next(line for _, line in self.lines if line.startswith("request "))
        return line.split()[1]

    def finish(self, timeout: float) -> tuple[int, str, str]:
        code = self.proc.wait(timeout)
        for reader in self.readers:
            reader.join(10)
        return code, "".join(self.stdout), "\n".join(line for _, line in self.lines)


@pytest.fixture(scope="module")
def quiet(tmp_path_factory: pytest.TempPathFactory, docker_engine: str,
          registry: services.RegistryServer) -> Iterator[Cluster]:
    # A lease longer than any wait here: a request that sits in a queue past its lease is
    # restarted by a control worker's watchdog, which these tests are not about.
    cluster = make_cluster(tmp_path_factory.mktemp("nobody"), registry, lease=120)
    yield cluster
    cluster.stop_all()
    cluster.redis.stop()


@pytest.fixture
def nobody(quiet: Cluster) -> Iterator[Cluster]:
    """The cluster with no worker alive and nothing queued."""
    quiet.stop_all()
    quiet.client().flushall()
    yield quiet
    quiet.stop_all()


def _app(tmp_path: Path, base: str) -> Path:
    root = tmp_path / f"app-{uuid.uuid4().hex[:6]}"
    root.mkdir()
    (root / "Dockerfile").write_text(f"FROM {base}\nCOPY msg.txt /msg.txt\n")
    (root / "msg.txt").write_text(f"nobody {uuid.uuid4()}\n")
    return root


def buildq(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tasks.cli", *args], cwd=REPO, env=cluster.env,
                          capture_output=True, text=True, timeout=60)


def test_no_control_worker_is_said_after_10_s_and_timeout_leaves_the_request_queued(
        nobody: Cluster, tmp_path: Path, base_image: str) -> None:
    run = Running(nobody.env, "build", str(_app(tmp_path, base_image)), "--destination",
                  f"{nobody.registry.host}/nobody/control", "--timeout", "14")
    request_id = run.request_id()
    code, stdout, stderr = run.finish(60)
    assert code == 2, stderr
    queued_at, noticed_at = run.at("request "), run.at(CONTROL_NOTICE)
    assert queued_at is not None and noticed_at is not None, stderr
    # Said once, after about ten seconds of silence, not at once and not at the end.
    assert NOTICE_AFTER - 0.5 <= noticed_at - queued_at <= NOTICE_AFTER + 3, stderr
    assert stderr.count("no control worker has been seen") == 2  # the notice and the error
    error = next(line for line in stderr.splitlines() if line.startswith("error: "))
    assert re.match(rf"error: gave up waiting after 1[45] s: request {request_id} is still "
                    r"queued for a control worker \(no control worker has been seen for \d+ s\)\. "
                    r"It stays queued", error), error
    assert stderr.splitlines()[-1].startswith("hint: Start one with buildq worker control")
    assert "Traceback" not in stderr and "built" not in stdout
    # It did stay queued: its message is in the control queue.
    queued = find_queued(nobody.client(), request_id)
    assert queued is not None and (queued.pool, queued.position) == ("control", 1)

    # buildq status says the same of the queued request.
    shown = buildq(nobody, "status", request_id)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {"id": request_id, "status": "queued", "queue": "control",
                                        "position": 1, "queued": 1}
    assert shown.stderr.strip() == ("warning: no control worker has been seen for 30 s: "
                                    "start one with buildq worker control")


def test_without_timeout_build_keeps_waiting_and_finishes_once_workers_start(
        nobody: Cluster, tmp_path: Path, base_image: str) -> None:
    run = Running(nobody.env, "build", str(_app(tmp_path, base_image)), "--destination",
                  f"{nobody.registry.host}/nobody/later", "--json")
    services.wait_for(lambda: run.at(CONTROL_NOTICE) is not None, 30, "the notice")
    time.sleep(2)
    assert run.proc.poll() is None, "buildq build stopped waiting without --timeout"
    nobody.start_worker("control")
    nobody.start_worker("docker")
    code, stdout, stderr = run.finish(180)
    assert code == 0, stderr
    record = json.loads(stdout.strip().splitlines()[-1])
    assert record["status"] == "built"
    assert nobody.registry.digest("nobody/later", record["tag"]) == record["digest"]
    assert stderr.count("has been seen") == 1  # nothing more once workers came


def test_a_request_handed_to_an_absent_docker_pool_names_that_pool(
        nobody: Cluster, tmp_path: Path, base_image: str) -> None:
    nobody.start_worker("control")
    run = Running(nobody.env, "build", str(_app(tmp_path, base_image)), "--destination",
                  f"{nobody.registry.host}/nobody/docker", "--timeout", "16")
    request_id = run.request_id()
    code, _, stderr = run.finish(60)
    assert code == 2, stderr
    assert run.at(DOCKER_NOTICE) is not None, stderr
    assert "no control worker" not in stderr  # control was there, and did its part
    assert f"request {request_id} is still queued for a docker worker" in stderr
    shown = buildq(nobody, "status", request_id)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["queue"] == "docker"
    assert "no docker worker has been seen for 30 s: start one with buildq worker docker" \
        in shown.stderr


def test_no_wait_warns_at_once_and_timeout_is_refused_where_it_means_nothing(
        nobody: Cluster, tmp_path: Path, base_image: str) -> None:
    app = str(_app(tmp_path, base_image))
    dest = f"{nobody.registry.host}/nobody/nowait"
    queued = buildq(nobody, "build", app, "--destination", dest, "--no-wait")
    assert queued.returncode == 0, queued.stderr
    assert ("warning: no control worker has been seen for 30 s: start one with buildq worker "
            "control; the request waits in the queue until one does.") in queued.stderr
    assert find_queued(nobody.client(), queued.stdout.strip().splitlines()[-1]) is not None

    both = buildq(nobody, "build", app, "--destination", dest, "--no-wait", "--timeout", "5")
    assert both.returncode == 2 and "--timeout and --no-wait" in both.stderr
    embedded = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "build", app, "--destination", dest, "--timeout", "5"],
        cwd=REPO, env={k: v for k, v in nobody.env.items() if k != "BUILDQ_REDIS_URL"},
        capture_output=True, text=True, timeout=60)
    assert embedded.returncode == 2 and "BUILDQ_REDIS_URL" in embedded.stderr
    for done in (both, embedded):
        assert len(done.stderr.strip().splitlines()) == 2 and "Traceback" not in done.stderr
    zero = buildq(nobody, "build", app, "--destination", dest, "--timeout", "0")
    assert zero.returncode == 2 and "--timeout" in zero.stderr and "Traceback" not in zero.stderr


# -- which pool a request waits on, with a stepped clock --------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lookout(url: str, builder: str | None, timeout: float | None = None
             ) -> tuple[Lookout, Clock, list[str], redis.Redis]:
    client = redis.Redis.from_url(url, decode_responses=True)
    clock, said = Clock(), []
    return Lookout(client, builder, timeout, said.append, clock=clock), clock, said, client


def _wait(lookout: Lookout, clock: Clock, seconds: float) -> None:
    for _ in range(int(seconds)):
        clock.now += 1
        lookout.tick()


def _stage(name: str, state: str) -> dict[str, str]:
    return {"kind": "stage", "stage": name, "state": state}


@pytest.mark.parametrize(("builder", "next_pool"), [(None, "docker"), ("docker", "docker"),
                                                    ("kaniko", "kaniko")])
def test_after_the_upload_the_request_waits_on_its_builders_pool(
        redis_url: str, builder: str | None, next_pool: str) -> None:
    lookout, clock, said, client = _lookout(redis_url, builder)
    announce(client, "control", "control-1@host")
    _wait(lookout, clock, 30)
    assert said == []  # a control worker is there
    for stage in ("fetch", "hash", "exists", "upload"):
        lookout.saw(_stage(stage, "started"))
        _wait(lookout, clock, 12)
        assert said == []  # a worker is on it: nothing is waited for
        lookout.saw(_stage(stage, "done"))
    assert lookout.waiting_on == next_pool
    # Absence is timed from the first look that finds nobody.
    _wait(lookout, clock, NOTICE_AFTER)
    assert said == []
    _wait(lookout, clock, 1)
    assert said == [f"no {next_pool} worker has been seen for 10 s: "
                    f"start one with buildq worker {next_pool}"]
    _wait(lookout, clock, 60)
    assert len(said) == 1  # said once


def test_absence_is_timed_across_a_restart_through_control_and_reset_by_a_worker(
        redis_url: str) -> None:
    lookout, clock, said, client = _lookout(redis_url, "docker")
    announce(client, "control", "control-1@host")
    lookout.saw(_stage("upload", "done"))
    _wait(lookout, clock, 7)  # nobody since the first of these looks
    # The lease ran out in the docker queue: control runs the chain again meanwhile.
    lookout.saw(_stage("fetch", "started"))
    _wait(lookout, clock, 2)
    lookout.saw(_stage("upload", "done"))
    _wait(lookout, clock, 1)
    assert said == []
    _wait(lookout, clock, 1)
    assert said == ["no docker worker has been seen for 10 s: start one with buildq worker docker"]
    announce(client, "docker", "docker-1@host")
    _wait(lookout, clock, 20)
    assert len(said) == 1 and "docker" not in lookout.absent_since
    lookout.saw({"kind": "retry", "stage": "build", "countdown": "2"})
    assert lookout.waiting_on == "docker"
    lookout.saw({"kind": "attached", "source_hash": "x"})
    assert lookout.waiting_on is None


def test_timeout_message_says_queued_or_running(redis_url: str) -> None:
    lookout, clock, _, client = _lookout(redis_url, None, timeout=30)
    _wait(lookout, clock, 29)
    assert not lookout.expired
    _wait(lookout, clock, 1)
    assert lookout.expired
    message, hint = lookout.gave_up("req-1")
    assert message == ("gave up waiting after 30 s: request req-1 is still queued for a control "
                       "worker (no control worker has been seen for 29 s). It stays queued and "
                       "is built when one takes it.")
    assert hint == "Start one with buildq worker control; follow the request with buildq status req-1."
    lookout.saw(_stage("build", "started"))
    message, hint = lookout.gave_up("req-1")
    assert "still running (stage build); it goes on without you" in message
    assert "buildq logs req-1" in hint
    client.close()
