"""The kaniko pool under faults: its worker SIGKILLed while it watches a Job, and the
Kubernetes API (the stand-in, behind a fault proxy) dropping, failing and stalling the
watch. Each build completes once and leaves no Job, pod, context or lock."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks import build_image
from tests import services
from tests.faults.conftest import (
    BUCKET,
    LEASE,
    PREFIX,
    FaultCluster,
    Gates,
    assert_nothing_left,
    assert_one_image,
    events,
    git_app,
    wait_quiet,
)
from tests.faults.proxy import FaultProxy
from tests.k8s_standin import KubeStandIn

pytestmark = pytest.mark.faults

NAMESPACE = "buildq-faults"


@dataclasses.dataclass
class KanikoPool:
    cluster: FaultCluster
    standin: KubeStandIn
    api: FaultProxy
    env: dict[str, str]

    def config(self, repository: str) -> dict[str, Any]:
        return {"builder": {"type": "kaniko",
                            "destination": f"{self.cluster.registry.host}/{repository}",
                            "build-context-store": f"s3://{BUCKET}/{PREFIX}"}}

    def start_worker(self) -> None:
        self.cluster.start_worker("kaniko", env=self.env)

    def worker_pid(self) -> int:
        (pid,) = [p.pid for p in self.cluster.alive("kaniko")]
        return pid

    def running_pod(self) -> bool:
        return any("running" in (s.get("state") or {})
                   for pod in self.standin.list("pods", NAMESPACE)
                   for s in (pod.get("status") or {}).get("containerStatuses") or [])

    def job_creates(self) -> list[int]:
        return [r.status for r in self.requests("POST") if "/jobs" in r.path]

    def requests(self, method: str) -> list[Any]:
        """Every ``method`` request the stand-in saw, in order."""
        with self.standin.cond:
            return [r for r in self.standin.requests if r.method == method]

    def assert_one_job_at_a_time(self) -> None:
        with self.standin.cond:
            calls = [(r.method, r.status) for r in self.standin.requests if "/jobs" in r.path
                     and r.method in ("POST", "DELETE")]
        live = 0
        for method, status in calls:
            if method == "POST" and status == 201:
                live += 1
            elif method == "DELETE" and status == 200:
                live -= 1
            assert live <= 1, calls

    def assert_no_jobs(self) -> None:
        assert self.standin.list("jobs", NAMESPACE) == []
        assert self.standin.list("pods", NAMESPACE) == []


@pytest.fixture(scope="module")
def kaniko_pool(fault_cluster: FaultCluster, kube_standin: KubeStandIn,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[KanikoPool]:
    root = tmp_path_factory.mktemp("faults-kaniko")
    host, port = kube_standin.url.rsplit("//", 1)[1].split(":")
    api = FaultProxy(host, int(port))
    # The kaniko worker reaches the API stand-in only through the proxy.
    kubeconfig = root / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "faults",
        "clusters": [{"name": "faults", "cluster": {"server": api.endpoint}}],
        "users": [{"name": "faults", "user": {"token": "faults-token"}}],
        "contexts": [{"name": "faults", "context": {"cluster": "faults", "user": "faults",
                                                    "namespace": NAMESPACE}}],
    }))
    env = {"KUBECONFIG": str(kubeconfig), "BUILDQ_KUBE_NAMESPACE": NAMESPACE,
           "AWS_DEFAULT_REGION": "us-east-1"}
    pool = KanikoPool(fault_cluster, kube_standin, api, env)
    pool.start_worker()
    try:
        yield pool
    finally:
        for proc in fault_cluster.alive("kaniko"):
            fault_cluster.kill_group(proc.pid)
        api.close()


@pytest.fixture
def kaniko(faults: FaultCluster, kaniko_pool: KanikoPool) -> Iterator[KanikoPool]:
    kaniko_pool.standin.reset()
    kaniko_pool.api.up()
    if not faults.alive("kaniko"):
        kaniko_pool.start_worker()
    yield kaniko_pool
    kaniko_pool.api.up()
    kaniko_pool.standin.reset()


def _wait(check: Any, timeout: float, what: str) -> None:
    services.wait_for(check, timeout, what)


def test_kaniko_worker_killed_while_watching_its_job_builds_once(
        kaniko: KanikoPool, tmp_path: Path, base_image: str) -> None:
    faults = kaniko.cluster
    marker = "ran-the-kaniko-build"
    # Long enough that the Job still runs when the lease has run out and a chain takes over.
    source = git_app(tmp_path, base_image, f"RUN echo {marker} && sleep 15\n")
    result = build_image.delay(source, builder="kaniko", config=kaniko.config("faults/kaniko-kill"))
    _wait(kaniko.running_pod, 90, "a running kaniko pod")
    faults.kill_group(kaniko.worker_pid())
    kaniko.start_worker()

    record = result.get(timeout=180)
    assert record["status"] == "built", record["error"]
    assert_one_image(faults, "faults/kaniko-kill", record)
    # The successor adopted the Job the dead worker created instead of starting another.
    assert kaniko.job_creates() in ([201], [201, 409]), kaniko.job_creates()
    wait_quiet(faults)
    kaniko.assert_no_jobs()
    assert_nothing_left(faults, record)
    assert [e["kind"] for e in events(faults.client(), result.id) if e["kind"] == "done"] == ["done"]


def test_kubernetes_api_dropping_failing_and_stalling_the_watch_is_survived(
        kaniko: KanikoPool, tmp_path: Path, base_image: str) -> None:
    faults = kaniko.cluster
    source = git_app(tmp_path, base_image, "RUN echo ran-through-api-faults && sleep 10\n")
    result = build_image.delay(source, builder="kaniko", config=kaniko.config("faults/kaniko-api"))
    _wait(kaniko.running_pod, 90, "a running kaniko pod")
    # The API server goes away (open watches reset, new connections refused) ...
    kaniko.api.down()
    time.sleep(3)
    refused = kaniko.api.refused
    # ... comes back answering 500 to the next requests ...
    kaniko.standin.fail_next(3, 500, method="GET")
    kaniko.api.up()
    _wait(lambda: sum(r.status == 500 for r in kaniko.requests("GET")) >= 3,
          30, "the 500s answered")
    # ... then hangs: connections stay open and nothing flows.
    kaniko.api.stall()
    time.sleep(5)
    kaniko.api.up()

    record = result.get(timeout=240)
    assert refused > 0, "nothing reached for the API while it was down"
    assert record["status"] == "built", record["error"]
    assert_one_image(faults, "faults/kaniko-api", record)
    # A watch that fails for good within one attempt of the stage gives its Job up (deleted)
    # before the stage's retry creates the next: never two kaniko builds at once.
    kaniko.assert_one_job_at_a_time()
    wait_quiet(faults)
    kaniko.assert_no_jobs()
    assert_nothing_left(faults, record)


def test_kaniko_worker_killed_after_its_job_pushed_leaves_no_job(
        kaniko: KanikoPool, tmp_path: Path, base_image: str) -> None:
    faults = kaniko.cluster
    source = git_app(tmp_path, base_image, "RUN echo ran-the-short-kaniko-build && sleep 2\n")
    result = build_image.delay(source, builder="kaniko",
                               config=kaniko.config("faults/kaniko-pushed"))
    _wait(lambda: kaniko.standin.list("jobs", NAMESPACE), 90, "a kaniko Job")
    faults.kill_group(kaniko.worker_pid())
    # The Job finishes and pushes before the lease runs out: the successor finds the image.
    kaniko.start_worker()

    record = result.get(timeout=180)
    assert record["status"] in ("built", "skipped"), record["error"]
    assert_one_image(faults, "faults/kaniko-pushed", record)
    wait_quiet(faults)
    # Nobody watches the dead worker's Job: the kaniko pool's watchdog deletes it once it
    # has been finished, unclaimed, for a lease (it looks once per lease).
    _wait(lambda: not kaniko.standin.list("jobs", NAMESPACE), 4 * LEASE + 5,
          "the orphaned Job deleted")
    kaniko.assert_no_jobs()
    assert_nothing_left(faults, record)


def test_kaniko_worker_killed_as_it_dispatches_builds_once(
        kaniko: KanikoPool, gates: Gates, tmp_path: Path, base_image: str) -> None:
    faults = kaniko.cluster
    gates.arm("kaniko")
    source = git_app(tmp_path, base_image, "RUN echo ran-the-dispatched-build\n")
    result = build_image.delay(source, builder="kaniko",
                               config=kaniko.config("faults/kaniko-dispatch"))
    faults.kill_group(gates.wait_held("kaniko"))
    gates.release("kaniko")
    kaniko.start_worker()

    record = result.get(timeout=180)
    assert record["status"] == "built", record["error"]
    assert_one_image(faults, "faults/kaniko-dispatch", record)
    assert kaniko.job_creates() == [201]
    wait_quiet(faults)
    kaniko.assert_no_jobs()
    assert_nothing_left(faults, record)
