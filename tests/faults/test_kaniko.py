"""The kaniko pool under faults, on the real control plane (tests/kube) with the real kaniko
executor: its worker SIGKILLed while it watches a Job, and the Kubernetes API (the real
kube-apiserver, reached through a TCP fault proxy) dropping and stalling the watch. Each
build completes once and leaves no Job, pod, context or lock. An API server answering 500
is not here: the real one cannot be made to, and the proxy speaks TCP, not HTTP; that case
is tests/workers/test_kaniko_job.py's, on the stand-in."""

from __future__ import annotations

import base64
import dataclasses
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks import build_image
from tests import services
from tests.conftest import AWS_ENV
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
from tests.kube.cluster import ControlPlane
from tests.kube.jobs import JobEvents

pytestmark = pytest.mark.faults

#: A Secret with the dummy AWS keys kaniko signs its S3 requests with (moto checks none).
AWS_KEYS_SECRET = "aws-standin-keys"


@dataclasses.dataclass
class KanikoPool:
    cluster: FaultCluster
    kube: ControlPlane
    namespace: str
    api: FaultProxy
    env: dict[str, str]
    executor: str
    base: str
    jobs: JobEvents | None = None

    def config(self, repository: str) -> dict[str, Any]:
        return {"builder": {"type": "kaniko",
                            "destination": f"{self.cluster.registry.host}/{repository}",
                            "build-context-store": f"s3://{BUCKET}/{PREFIX}",
                            "kaniko-image": self.executor,
                            "kaniko-config": {"spec": {"template": {"spec": {"containers": [
                                {"envFrom": [{"secretRef": {"name": AWS_KEYS_SECRET}}]}]}}}}}}

    def start_worker(self) -> None:
        self.cluster.start_worker("kaniko", env=self.env)

    def worker_pid(self) -> int:
        (pid,) = [p.pid for p in self.cluster.alive("kaniko")]
        return pid

    def _listed(self, kind: str, path: str = "{.items[*].metadata.name}") -> list[str]:
        shown = self.kube.kubectl("get", kind, "-n", self.namespace, "-o", f"jsonpath={path}")
        assert shown.returncode == 0, shown.stderr
        return shown.stdout.split()

    def running_pod(self) -> bool:
        return "Running" in self._listed("pods", "{.items[*].status.phase}")

    def job_exists(self) -> bool:
        return bool(self._listed("jobs"))

    def created(self) -> int:
        """Jobs the API server admitted during the test."""
        assert self.jobs is not None
        return len(self.jobs.added)

    def assert_one_job_at_a_time(self) -> None:
        assert self.jobs is not None
        assert self.jobs.most_at_once() <= 1, [(k, j["metadata"]["uid"]) for k, j in self.jobs.events]

    def assert_no_jobs(self) -> None:
        # Deleted with propagationPolicy Background: the real garbage collector takes the pod.
        services.wait_for(lambda: not self._listed("jobs") and not self._listed("pods"), 60,
                          "no Job or pod left")


@pytest.fixture(scope="module")
def kaniko_pool(fault_cluster: FaultCluster, kube: ControlPlane,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[KanikoPool]:
    from tests.kube import kaniko

    root = tmp_path_factory.mktemp("faults-kaniko")
    namespace = kube.create_namespace("faults")
    keys = {k: base64.b64encode(AWS_ENV[k].encode()).decode()
            for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    created = kube.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": AWS_KEYS_SECRET}, "data": keys}))
    assert created.returncode == 0, created.stderr
    executor = kaniko.push_image(fault_cluster.registry.host, say=lambda _line: None)
    base = f"{fault_cluster.registry.host}/kaniko-base/busybox:base"
    for args in (("tag", services.ensure_base_image(), base), ("push", base)):
        subprocess.run(["docker", *args], check=True, capture_output=True, timeout=120)
    api = FaultProxy("127.0.0.1", kube.api_port)
    # The kaniko worker reaches kube-apiserver only through the proxy (TLS passes through:
    # the serving certificate names 127.0.0.1, whatever the port).
    config = yaml.safe_load(kube.kubeconfig.read_text())
    for cluster in config["clusters"]:
        cluster["cluster"]["server"] = api.endpoint.replace("http://", "https://")
    kubeconfig = root / "kubeconfig"
    kubeconfig.write_text(json.dumps(config))
    kubeconfig.chmod(0o600)
    env = {"KUBECONFIG": str(kubeconfig), "BUILDQ_KUBE_NAMESPACE": namespace,
           "AWS_DEFAULT_REGION": "us-east-1"}
    pool = KanikoPool(fault_cluster, kube, namespace, api, env, executor, base)
    pool.start_worker()
    try:
        yield pool
    finally:
        for proc in fault_cluster.alive("kaniko"):
            fault_cluster.kill_group(proc.pid)
        api.close()
        kube.kubectl("delete", "namespace", namespace, "--wait=false")


@pytest.fixture
def kaniko(faults: FaultCluster, kaniko_pool: KanikoPool) -> Iterator[KanikoPool]:
    kaniko_pool.api.up()
    if not faults.alive("kaniko"):
        kaniko_pool.start_worker()
    kaniko_pool.jobs = JobEvents(kaniko_pool.kube, kaniko_pool.namespace)
    yield kaniko_pool
    kaniko_pool.jobs.close()
    kaniko_pool.jobs = None
    kaniko_pool.api.up()


def _wait(check: Any, timeout: float, what: str) -> None:
    services.wait_for(check, timeout, what)


def test_kaniko_worker_killed_while_watching_its_job_builds_once(
        kaniko: KanikoPool, tmp_path: Path) -> None:
    faults = kaniko.cluster
    marker = "ran-the-kaniko-build"
    # Long enough that the Job still runs when the lease has run out and a chain takes over.
    source = git_app(tmp_path, kaniko.base, f"RUN echo {marker} && sleep 15\n")
    result = build_image.delay(source, builder="kaniko", config=kaniko.config("faults/kaniko-kill"))
    _wait(kaniko.running_pod, 90, "a running kaniko pod")
    faults.kill_group(kaniko.worker_pid())
    kaniko.start_worker()

    record = result.get(timeout=180)
    assert record["status"] == "built", record["error"]
    assert_one_image(faults, "faults/kaniko-kill", record)
    # The successor adopted the Job the dead worker created instead of starting another.
    assert kaniko.created() == 1, kaniko.jobs
    wait_quiet(faults)
    kaniko.assert_no_jobs()
    assert_nothing_left(faults, record)
    assert [e["kind"] for e in events(faults.client(), result.id) if e["kind"] == "done"] == ["done"]


def test_kubernetes_api_dropping_and_stalling_the_watch_is_survived(
        kaniko: KanikoPool, tmp_path: Path) -> None:
    faults = kaniko.cluster
    source = git_app(tmp_path, kaniko.base, "RUN echo ran-through-api-faults && sleep 10\n")
    result = build_image.delay(source, builder="kaniko", config=kaniko.config("faults/kaniko-api"))
    _wait(kaniko.running_pod, 90, "a running kaniko pod")
    # The API server goes away (open watches reset, new connections refused) ...
    kaniko.api.down()
    time.sleep(3)
    refused = kaniko.api.refused
    kaniko.api.up()
    time.sleep(2)
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
        kaniko: KanikoPool, tmp_path: Path) -> None:
    faults = kaniko.cluster
    source = git_app(tmp_path, kaniko.base, "RUN echo ran-the-short-kaniko-build && sleep 2\n")
    result = build_image.delay(source, builder="kaniko",
                               config=kaniko.config("faults/kaniko-pushed"))
    _wait(kaniko.job_exists, 90, "a kaniko Job")
    faults.kill_group(kaniko.worker_pid())
    # The Job finishes and pushes before the lease runs out: the successor finds the image.
    kaniko.start_worker()

    record = result.get(timeout=180)
    assert record["status"] in ("built", "skipped"), record["error"]
    assert_one_image(faults, "faults/kaniko-pushed", record)
    wait_quiet(faults)
    # Nobody watches the dead worker's Job: the kaniko pool's watchdog deletes it once it
    # has been finished, unclaimed, for a lease (it looks once per lease).
    _wait(lambda: not kaniko.job_exists(), 4 * LEASE + 5,
          "the orphaned Job deleted")
    kaniko.assert_no_jobs()
    assert_nothing_left(faults, record)


def test_kaniko_worker_killed_as_it_dispatches_builds_once(
        kaniko: KanikoPool, gates: Gates, tmp_path: Path) -> None:
    faults = kaniko.cluster
    gates.arm("kaniko")
    source = git_app(tmp_path, kaniko.base, "RUN echo ran-the-dispatched-build\n")
    result = build_image.delay(source, builder="kaniko",
                               config=kaniko.config("faults/kaniko-dispatch"))
    faults.kill_group(gates.wait_held("kaniko"))
    gates.release("kaniko")
    kaniko.start_worker()

    record = result.get(timeout=180)
    assert record["status"] == "built", record["error"]
    assert_one_image(faults, "faults/kaniko-dispatch", record)
    assert kaniko.created() == 1, kaniko.jobs
    wait_quiet(faults)
    kaniko.assert_no_jobs()
    assert_nothing_left(faults, record)
