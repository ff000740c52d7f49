"""The chain with ``builder: kaniko``: real control and kaniko workers, the Kubernetes API
stand-in (reached by the kaniko worker through a kubeconfig), its docker kubelet, a
real registry and a file:// context store the kubelet reads as a ``tar://`` context."""

from __future__ import annotations

import dataclasses
import os
import signal
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tasks import build_image
from tests.k8s_standin import KubeStandIn
from tests.tasks.conftest import Cluster

NAMESPACE = "buildq-kaniko"


@dataclasses.dataclass
class KanikoPool:
    cluster: Cluster
    standin: KubeStandIn
    store: Path

    def config(self, repository: str) -> dict[str, Any]:
        return {"builder": {"type": "kaniko",
                            "destination": f"{self.cluster.registry.host}/{repository}",
                            "build-context-store": self.store.as_uri()}}


@pytest.fixture(scope="module")
def kaniko_pool(cluster: Cluster, kube_standin: KubeStandIn,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[KanikoPool]:
    root = tmp_path_factory.mktemp("kaniko-pool")
    kubeconfig = kube_standin.kubeconfig(root / "kubeconfig", NAMESPACE)
    store = root / "contexts"
    store.mkdir()
    # The kaniko worker finds the API through KUBECONFIG, as it would outside a cluster.
    env = {**cluster.env, "KUBECONFIG": str(kubeconfig), "BUILDQ_KUBE_NAMESPACE": NAMESPACE}
    proc = dataclasses.replace(cluster, env=env).start_worker("kaniko", concurrency=2)
    try:
        yield KanikoPool(cluster, kube_standin, store)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
        cluster.workers.pop(proc.pid, None)


@pytest.fixture
def pool(kaniko_pool: KanikoPool) -> Iterator[KanikoPool]:
    kaniko_pool.standin.reset()
    yield kaniko_pool
    kaniko_pool.standin.reset()


def _app(tmp_path: Path, base: str, extra: str = "") -> Path:
    root = tmp_path / f"app-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    (root / "Dockerfile").write_text(f"FROM {base}\nCOPY msg.txt /msg.txt\n{extra}")
    (root / "msg.txt").write_text(f"kaniko {uuid.uuid4()}\n")
    return root


def _nothing_left(pool: KanikoPool) -> None:
    assert pool.standin.list("jobs") == []
    assert pool.standin.list("pods") == []
    assert list(pool.store.glob("*.tar.gz")) == []


def test_kaniko_build_end_to_end(pool: KanikoPool, tmp_path: Path, base_image: str) -> None:
    app = _app(tmp_path, base_image, "RUN echo from-the-kaniko-pod\n")
    record = build_image.delay(str(app), builder="kaniko",
                               config=pool.config("kaniko/e2e")).get(timeout=180)
    assert record["status"] == "built", record
    assert record["digest"] == pool.cluster.registry.digest("kaniko/e2e", record["tag"])
    assert {"upload", "kaniko", "push"} <= set(record["stages"])
    (create,) = pool.standin.requests_for("POST")
    assert create.status == 201 and create.path == f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs"
    assert create.body["metadata"]["annotations"]["buildq/source-hash"] == record["source_hash"]
    _nothing_left(pool)
    # The pod's log went into the build log.
    logs = pool.cluster.client().xrange(f"buildq:log:{record['source_hash']}")
    assert any("from-the-kaniko-pod" in fields.get("line", "") for _, fields in logs)


def test_failed_kaniko_build_is_recorded_and_cleaned_up(pool: KanikoPool, tmp_path: Path,
                                                        base_image: str) -> None:
    app = _app(tmp_path, base_image, "RUN echo doomed && false\n")
    record = build_image.delay(str(app), builder="kaniko",
                               config=pool.config("kaniko/failing")).get(timeout=180)
    assert record["status"] == "failed", record
    assert "kaniko exited with code 1" in record["error"] and "doomed" in record["error"]
    _nothing_left(pool)


def test_ten_identical_requests_create_one_job(pool: KanikoPool, tmp_path: Path,
                                               base_image: str) -> None:
    app = _app(tmp_path, base_image, "RUN sleep 2\n")
    config = pool.config("kaniko/ten")
    results = [build_image.delay(str(app), builder="kaniko", config=config) for _ in range(10)]
    with ThreadPoolExecutor(10) as threads:
        records = list(threads.map(lambda r: r.get(timeout=240), results))
    assert {r["status"] for r in records} == {"built"}
    assert len({r["digest"] for r in records}) == 1
    creates = pool.standin.requests_for("POST")
    assert len(creates) == 1 and creates[0].status == 201
    _nothing_left(pool)
