"""A running buildq cluster for end-to-end tests: Redis, registry, engine, real workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from config.settings import Settings
from tests import services

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Cluster:
    redis: services.RedisServer
    registry: services.RegistryServer
    root: Path
    env: dict[str, str]
    workers: dict[int, tuple[str, subprocess.Popen[bytes]]] = field(default_factory=dict)

    #: The module run as ``python -m MODULE worker POOL`` (the fault suite wraps the CLI).
    worker_module = "tasks.cli"

    def start_worker(self, pool: str, concurrency: int = 1,
                     env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        name = f"worker-{pool}-{len(self.workers)}-{uuid.uuid4().hex[:4]}.log"
        log = open(self.root / name, "ab")  # noqa: SIM115 - the worker holds it
        proc = subprocess.Popen(
            [sys.executable, "-m", self.worker_module, "worker", pool, "--concurrency",
             str(concurrency), "--loglevel", "INFO"],
            env={**self.env, **(env or {})}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.workers[proc.pid] = (pool, proc)
        client = redis.Redis.from_url(self.redis.url)
        services.wait_for(
            lambda: any(f"-{proc.pid}-".encode() in k
                        for k in client.scan_iter(match=f"buildq:pool:{pool}:*")),
            30, f"{pool} worker")
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        self.workers.pop(proc.pid, None)

    def stop_all(self) -> None:
        for _, proc in list(self.workers.values()):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, proc in list(self.workers.values()):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        self.workers.clear()

    def worker_pid(self, hostname: str) -> int:
        return int(hostname.split("@")[0].split("-")[1])

    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url, decode_responses=True)


def make_cluster(root: Path, registry: services.RegistryServer, lease: float) -> Cluster:
    red = services.start_redis(root)
    env = {
        **os.environ,
        "BUILDQ_REDIS_URL": red.url,
        "BUILDQ_LOCK_LEASE": str(lease),
        "BUILDQ_WORKDIR": str(root / "work"),
        "BUILDQ_CONTEXT_STORE": (root / "contexts").as_uri(),
        "BUILDQ_NETWORK_MODE": "none",
        "BUILDQ_RETRY_BASE": "0.5",
        "BUILDQ_MAX_RETRIES": "3",
        # Base digests are reused for a second only, so a test that moves a base's tag
        # sees it after a short wait rather than the default minute.
        "BUILDQ_BASE_TTL": "1",
        "HOME": str(root / "home"),
        "PYTHONPATH": str(REPO),
        # The tests' sources live beside the cluster's own directory (pytest's temporary
        # directories): the workers may read them there, as an operator opts in.
        "BUILDQ_SOURCE_ROOTS": str(root.parent),
    }
    for name in ("BUILDQ_CONFIG", "BUILDQ_ALLOWED_DESTINATIONS"):
        env.pop(name, None)
    return Cluster(red, registry, root, env)


def tiny_app(tmp_path: Path, base: str, name: str, step: str = "") -> Path:
    """A one-file app under ``tmp_path/name`` whose contents no other test has (a new tag)."""
    root = tmp_path / name
    root.mkdir()
    (root / "Dockerfile").write_text(f"FROM {base}\nCOPY msg.txt /msg.txt\n{step}")
    (root / "msg.txt").write_text(f"{name} {uuid.uuid4()}\n")
    return root


def use_cluster(cluster: Cluster) -> None:
    """Point this test process's Celery app at the cluster, as a script would."""
    point_app_at(cluster.settings())


def point_app_at(settings: Settings) -> None:
    from tasks.app import app, configure

    configure(settings)
    # Connections cached for the previous broker must not be reused.
    app._pool = None
    app._local = threading.local()
    app.amqp._producer_pool = None


@pytest.fixture(autouse=True)
def app_handed_back() -> Iterator[None]:
    """A test that points the app at a cluster of its own hands it back when it ends."""
    import tasks.app

    previous = tasks.app.settings()
    yield
    if tasks.app.settings() is not previous:
        point_app_at(previous)


@pytest.fixture(scope="session")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory, docker_engine: str,
                   registry: services.RegistryServer) -> Iterator[Cluster]:
    c = make_cluster(tmp_path_factory.mktemp("cluster"), registry, lease=6)
    c.start_worker("control", concurrency=2)
    c.start_worker("docker", concurrency=1)
    c.start_worker("docker", concurrency=1)
    yield c
    c.stop_all()
    c.redis.stop()


@pytest.fixture
def cluster(shared_cluster: Cluster) -> Cluster:
    """The session's cluster, with this process's app pointed at it again: a test with a
    cluster of its own (stopped when it ends) leaves the app pointing at that one."""
    use_cluster(shared_cluster)
    return shared_cluster
