"""A horizontally scaled buildq on one machine: N control and M docker workers as separate
processes with their own node names and metrics ports, plus Flower. Used by the ops tests
and by bench/scale_bench.py."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from tests import services

REPO = Path(__file__).resolve().parents[2]
#: Flower's login in these tests (a throwaway, never a real credential).
FLOWER_LOGIN = ("ops", "ops-test-password")
#: Prometheus samples: (name, sorted labels) -> value.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Node:
    pool: str
    name: str
    metrics_port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


@dataclass
class OpsCluster:
    root: Path
    redis: services.RedisServer
    registry: services.RegistryServer
    env: dict[str, str]
    nodes: list[Node] = field(default_factory=list)
    flower_port: int = 0
    flower: subprocess.Popen[bytes] | None = None

    def start_worker(self, pool: str, name: str, concurrency: int = 1) -> Node:
        port = services.free_port()
        log = self.root / f"worker-{name}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "tasks.cli", "worker", pool, "-c", str(concurrency),
             "-n", f"{name}@ops", "--metrics-port", f"127.0.0.1:{port}", "--json-logs"],
            env=self.env, cwd=REPO, stdout=log.open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True)
        node = Node(pool, f"{name}@ops", port, proc, log)
        self.nodes.append(node)
        return node

    def wait_ready(self, timeout: float = 60) -> None:
        for node in self.nodes:
            services.wait_for(
                lambda n=node: requests.get(f"http://127.0.0.1:{n.metrics_port}/healthz",
                                            timeout=1).ok, timeout, f"worker {node.name}")

    def start_flower(self) -> None:
        self.flower_port = services.free_port()
        env = {**self.env, "BUILDQ_FLOWER_BASIC_AUTH": ":".join(FLOWER_LOGIN)}
        self.flower = subprocess.Popen(
            [sys.executable, "-m", "tasks.cli", "flower", "--port", str(self.flower_port),
             "--address", "127.0.0.1"],
            env=env, cwd=REPO, stdout=(self.root / "flower.log").open("ab"),
            stderr=subprocess.STDOUT, start_new_session=True)
        services.wait_for(lambda: requests.get(f"{self.flower_url}/healthcheck", timeout=1).ok,
                          30, "flower")

    @property
    def flower_url(self) -> str:
        return f"http://127.0.0.1:{self.flower_port}"

    @property
    def flower_auth_header(self) -> dict[str, str]:
        token = base64.b64encode(":".join(FLOWER_LOGIN).encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def flower_api(self, path: str, **params: Any) -> Any:
        r = requests.get(f"{self.flower_url}{path}", params=params, auth=FLOWER_LOGIN, timeout=30)
        r.raise_for_status()
        return r.json()

    def scrape_node(self, node: Node) -> Samples:
        from prometheus_client.parser import text_string_to_metric_families

        samples: Samples = {}
        text = requests.get(node.metrics_url, timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                samples[key] = samples.get(key, 0.0) + sample.value
        return samples

    def scrape(self, pool: str | None = None) -> Samples:
        """Every sample of every worker (of ``pool``), summed across workers."""
        totals: Samples = {}
        for node in self.nodes:
            if pool and node.pool != pool:
                continue
            for key, value in self.scrape_node(node).items():
                totals[key] = totals.get(key, 0.0) + value
        return totals

    def stop(self) -> None:
        procs = [n.process for n in self.nodes] + ([self.flower] if self.flower else [])
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.redis.stop()


def start_ops_cluster(root: Path, registry: services.RegistryServer, control: int = 2,
                      docker: int = 3, flower: bool = True) -> OpsCluster:
    root.mkdir(parents=True, exist_ok=True)
    red = services.start_redis(root)
    env = {
        **os.environ,
        "BUILDQ_REDIS_URL": red.url,
        "BUILDQ_WORKDIR": str(root / "work"),
        "BUILDQ_CONTEXT_STORE": (root / "contexts").as_uri(),
        # The engine has no bridge here: build containers get no network.
        "BUILDQ_NETWORK_MODE": "none",
        "BUILDQ_LOCK_LEASE": "20",
        "HOME": str(root / "home"),
        "PYTHONPATH": str(REPO),
        "BUILDQ_SOURCE_ROOTS": str(root.parent),
    }
    env.pop("BUILDQ_CONFIG", None)
    cluster = OpsCluster(root, red, registry, env)
    try:
        if flower:
            # First, so it sees every task event from the start.
            cluster.start_flower()
        for i in range(control):
            cluster.start_worker("control", f"control{i + 1}", concurrency=2)
        for i in range(docker):
            cluster.start_worker("docker", f"docker{i + 1}", concurrency=1)
        cluster.wait_ready()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def point_app_at(cluster: OpsCluster) -> None:
    """Make this process's Celery app a client of ``cluster`` (as a script would be)."""
    import threading

    from config.settings import Settings
    from tasks.app import app, configure

    configure(Settings.from_env(cluster.env))
    # Whatever the app cached came from an earlier configuration of this process.
    app._pool = None
    app._local = threading.local()
    app.amqp._producer_pool = None


def make_apps(root: Path, base_image: str, count: int) -> list[Path]:
    """``count`` tiny, distinct build contexts."""
    apps = []
    for i in range(count):
        app = root / f"app-{i:03d}"
        app.mkdir(parents=True, exist_ok=True)
        (app / "Dockerfile").write_text(f"FROM {base_image}\nCOPY msg.txt /msg.txt\n")
        (app / "msg.txt").write_text(f"app {i} {root.name} {time.time_ns()}\n")
        apps.append(app)
    return apps
