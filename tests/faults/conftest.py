"""A buildq cluster for fault injection: its own Redis (append-only, restartable on the
same port), its own registry (stoppable), real workers started through
tests/faults/gated_worker.py so a test can hold a chain at a chosen stage, and checks
for everything a fault could leave behind."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from tasks.keys import INFLIGHT, PENDING_INDEX, lock_key, pending_key
from tests import services
from tests.conftest import AWS_ENV
from tests.faults.proxy import FaultProxy
from tests.tasks.conftest import REPO, Cluster, point_app_at, use_cluster

#: The lock lease of the fault cluster, seconds (as tests/tasks uses).
LEASE = 6.0
#: Retry schedule of the fault cluster: full-jitter backoff from 1 s, six retries, so a
#: transient fault is retried for 31.5 s to 63 s in all before the build fails.
RETRY_BASE, MAX_RETRIES = 1.0, 6
#: How many workers of each pool every test starts with.
POOLS = {"control": 2, "docker": 2}


def retry_budget() -> float:
    """The most the backoff of one stage can add up to (each pause is at most base * 2**n)."""
    return sum(RETRY_BASE * 2 ** n for n in range(MAX_RETRIES))


#: The S3 bucket and prefix of the fault cluster's context store (moto).
BUCKET, PREFIX = "buildq-faults", "contexts"


def s3(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"])


@dataclass
class FaultCluster(Cluster):
    store_proxy: FaultProxy | None = None
    s3_endpoint: str = ""

    def store_objects(self) -> list[str]:
        """Objects and unfinished multipart uploads in the context store (moto, directly)."""
        client = s3(self.s3_endpoint)
        listed = client.list_objects_v2(Bucket=BUCKET).get("Contents") or []
        uploads = client.list_multipart_uploads(Bucket=BUCKET).get("Uploads") or []
        return sorted([o["Key"] for o in listed] + [f"multipart:{u['Key']}" for u in uploads])

    worker_module = "tests.faults.gated_worker"

    def alive(self, pool: str) -> list[subprocess.Popen[bytes]]:
        return [p for name, p in self.workers.values() if name == pool and p.poll() is None]

    def top_up(self) -> None:
        """Back to the standard pools: replace what a test killed or stopped."""
        for pid, (_, proc) in list(self.workers.items()):
            if proc.poll() is not None:
                self.workers.pop(pid)
        for pool, count in POOLS.items():
            for _ in range(count - len(self.alive(pool))):
                self.start_worker(pool)

    def kill_group(self, pgid: int) -> None:
        """SIGKILL a worker, its pool processes and whatever they run (git, uploads)."""
        os.killpg(pgid, signal.SIGKILL)
        proc = self.workers.pop(pgid)[1]
        proc.wait(10)

    def restart_redis(self) -> None:
        """Stop Redis cleanly (it writes its append-only file) and start it on the same port."""
        self.redis.stop()
        self.redis = services.start_redis(self.redis.directory, appendonly=True,
                                          port=self.redis.port)

    def crash_redis(self, down_for: float, tail: AofTail | None = None,
                    appendonly: bool = True) -> None:
        """SIGKILL Redis, keep it down ``down_for`` seconds, start it on the same port and dir.

        A killed process loses no write it acknowledged (its append-only file is written
        before each reply; fsync only guards against the machine going down). With ``tail``,
        the file also loses what ``tail`` says the last second added, as a crash of the
        machine with ``appendfsync everysec`` would.
        """
        self.redis.process.kill()
        self.redis.process.wait(10)
        if tail is not None:
            tail.cut()
        time.sleep(down_for)
        self.redis = services.start_redis(self.redis.directory, appendonly=appendonly,
                                          port=self.redis.port)

    def restart_registry(self) -> None:
        self.registry.start()

    @property
    def workdir(self) -> Path:
        return self.root / "work"



class AofTail:
    """Watches Redis's append-only file, to cut it back to what it held ``lose`` seconds ago.

    Redis 7 writes the file in parts listed by a manifest; writes go to the last ``incr``
    part. Redis loads a file whose last command was cut (``aof-load-truncated yes``, the
    default) up to the last whole command, and drops a transaction cut in the middle.
    """

    def __init__(self, directory: Path, lose: float = 1.0) -> None:
        self.directory = directory / "appendonlydir"
        self.lose = lose
        self.sizes: list[tuple[float, Path, int]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="aof-tail", daemon=True)
        self.thread.start()

    def current(self) -> Path:
        manifest = next(self.directory.glob("*.manifest")).read_text().splitlines()
        incr = [line.split()[1] for line in manifest if line.split()[-1] == "i"]
        return self.directory / incr[-1]

    def _watch(self) -> None:
        while not self.stopping.wait(0.02):
            with contextlib.suppress(OSError, StopIteration, IndexError):
                part = self.current()
                self.sizes.append((time.monotonic(), part, part.stat().st_size))

    def cut(self) -> int:
        """Truncate the file to its size ``lose`` seconds ago; returns the bytes dropped."""
        self.stopping.set()
        self.thread.join(5)
        part = self.current()
        before = time.monotonic() - self.lose
        kept = [size for at, p, size in self.sizes if p == part and at <= before]
        keep = kept[-1] if kept else 0
        dropped = part.stat().st_size - keep
        with part.open("r+b") as f:
            f.truncate(keep)
        return dropped


class BuildCounter:
    """Counts the real runs of build steps: a RUN that fetches ``url(marker)`` (the build's
    network being the host's) hits this server once per run, not on a cache hit, and a
    Redis crash cannot lose the count.

    Each run names itself with a nonce and tries up to three times, so a connection reset
    on a loaded machine (seen once: the RUN failed and so did its build) neither fails the
    step nor counts a run twice: the count is of distinct nonces.
    """

    def __init__(self) -> None:
        runs: dict[str, set[str]] = {}
        lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                marker, _, nonce = self.path.strip("/").partition("/")
                with lock:
                    runs.setdefault(marker, set()).add(nonce)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.runs_of = runs
        self.lock = lock
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def step(self, marker: str) -> str:
        """A shell command (busybox) that reports one run of ``marker``."""
        url = f"http://127.0.0.1:{self.server.server_address[1]}/{marker}/$n"
        fetch = f"busybox wget -q -O /dev/null {url}"
        return (f"n=$(cat /proc/sys/kernel/random/uuid) && "
                f"{{ {fetch} || {{ sleep 1; {fetch}; }} || {{ sleep 2; {fetch}; }}; }}")

    def runs(self, marker: str) -> int:
        with self.lock:
            return len(self.runs_of.get(marker, ()))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Gates:
    """Hold a chain at a stage event (see tests/faults/gated_worker.py)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def arm(self, stage: str, event: str = "started") -> None:
        self.client.set(f"buildq:fault:arm:{stage}:{event}", "1")

    def wait_held(self, stage: str, event: str = "started", timeout: float = 120) -> int:
        """Wait until a chain is held there; returns the process group of its worker."""
        key = f"buildq:fault:held:{stage}:{event}"
        services.wait_for(lambda: self.client.exists(key), timeout, f"a chain held at {stage}:{event}")
        return int(str(self.client.get(key)).split()[0])

    def release(self, stage: str, event: str = "started") -> None:
        self.client.delete(f"buildq:fault:held:{stage}:{event}")

    def clear(self) -> None:
        for key in self.client.scan_iter(match="buildq:fault:*"):
            self.client.delete(key)


@pytest.fixture(scope="session")
def fault_cluster(tmp_path_factory: pytest.TempPathFactory, docker_engine: str,
                  moto_server: services.StandIn) -> Iterator[FaultCluster]:
    root = tmp_path_factory.mktemp("faults")
    (root / "redis").mkdir()
    red = services.start_redis(root / "redis", appendonly=True)
    # A registry of its own: tests stop it, and the session's shared one must stay up.
    registry = services.start_registry(root / "registry")
    # Contexts go to moto's S3 through a proxy a test can take down.
    store_proxy = FaultProxy("127.0.0.1", moto_server.port)
    s3(moto_server.endpoint).create_bucket(Bucket=BUCKET)
    env = {
        **os.environ,
        **AWS_ENV,
        "BUILDQ_REDIS_URL": red.url,
        "BUILDQ_LOCK_LEASE": str(LEASE),
        "BUILDQ_WORKDIR": str(root / "work"),
        "BUILDQ_CONTEXT_STORE": f"s3://{BUCKET}/{PREFIX}",
        "BUILDQ_S3_ENDPOINT_URL": store_proxy.endpoint,
        "BUILDQ_NETWORK_MODE": "none",
        "BUILDQ_RETRY_BASE": str(RETRY_BASE),
        "BUILDQ_MAX_RETRIES": str(MAX_RETRIES),
        "HOME": str(root / "home"),
        "PYTHONPATH": str(REPO),
        "BUILDQ_SOURCE_ROOTS": str(root.parent),
    }
    env.pop("BUILDQ_CONFIG", None)
    (root / "work").mkdir()
    cluster = FaultCluster(red, registry, root, env)
    cluster.store_proxy = store_proxy
    cluster.s3_endpoint = moto_server.endpoint
    cluster.top_up()
    use_cluster(cluster)
    yield cluster
    cluster.stop_all()
    cluster.redis.stop()
    registry.stop()
    store_proxy.close()


@pytest.fixture
def faults(fault_cluster: FaultCluster) -> Iterator[FaultCluster]:
    """The cluster with its standard pools, gates cleared; restored after the test."""
    import tasks.app

    # Other suites' clusters share this process's Celery app: hand it back afterwards.
    previous = tasks.app.settings()
    use_cluster(fault_cluster)
    Gates(fault_cluster.client()).clear()
    fault_cluster.top_up()
    # Whatever a failed test left running must not take this test's gates.
    wait_quiet(fault_cluster, timeout=180)
    yield fault_cluster
    Gates(fault_cluster.client()).clear()
    if fault_cluster.registry.process is None:
        fault_cluster.restart_registry()
    fault_cluster.top_up()
    point_app_at(previous)


@pytest.fixture
def gates(faults: FaultCluster) -> Gates:
    return Gates(faults.client())


# --- sources and what a build must not leave behind ---------------------------------------


def git_app(tmp_path: Path, base: str, extra: str = "") -> str:
    """A bare git repository (file://): fetching it makes a temp clone in the workdir."""
    work = tmp_path / f"app-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    (work / "Dockerfile").write_text(f"FROM {base}\nCOPY msg.txt /msg.txt\n{extra}")
    (work / "msg.txt").write_text(f"fault {uuid.uuid4()}\n")
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q", "-b", "main", str(work)], check=True)
    subprocess.run([*git, "-C", str(work), "add", "."], check=True)
    subprocess.run([*git, "-C", str(work), "commit", "-qm", "app"], check=True)
    bare = tmp_path / f"{work.name}.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    return bare.as_uri()


def events(client: redis.Redis, request_id: str) -> list[dict[str, str]]:
    entries: Any = client.xrange(f"buildq:events:{request_id}")
    return [{str(k): str(v) for k, v in fields.items()} for _, fields in entries]


#: BuildKit's prefix of a line a build step printed: the step's number and its second.
BUILDKIT_OUTPUT = re.compile(r"^#\d+ \d+\.\d+ ")


def step_runs(client: redis.Redis, source_hash: str, marker: str) -> int:
    """How many times a build step of the hash printed the line ``marker``, in its build log.

    The legacy builder logs the line as printed, BuildKit after ``#<step> <seconds> ``; a
    step's own header (``#5 [2/3] RUN echo <marker>``) is not its output. A cached step
    prints nothing.
    """
    entries: Any = client.xrange(f"buildq:log:{source_hash}")
    lines = [BUILDKIT_OUTPUT.sub("", str(fields["line"])).strip() for _, fields in entries]
    return sum(line == marker for line in lines)


def wait_quiet(cluster: FaultCluster, timeout: float = 30) -> None:
    """Wait until no buildq task runs or waits anywhere (queues empty, nothing active)."""
    from tasks.app import app

    def quiet() -> bool:
        client = cluster.client()
        if any(client.llen(q) for q in ("control", "docker", "kaniko")):
            return False
        active = app.control.inspect(timeout=1).active() or {}
        return not any(active.values())

    services.wait_for(quiet, timeout, "an idle cluster")


def assert_nothing_left(cluster: FaultCluster, record: dict[str, Any]) -> None:
    """No lock, no waiters, no scratch dirs, no contexts, no unfinished uploads."""
    client = cluster.client()
    source_hash = record["source_hash"]
    assert client.get(lock_key(source_hash)) is None
    assert not client.exists(pending_key(source_hash))
    assert not client.sismember(PENDING_INDEX, source_hash)
    assert not client.hexists(INFLIGHT, record["id"])
    assert sorted(p.name for p in cluster.workdir.iterdir()) == []
    assert cluster.store_objects() == []
    # The record stored under the hash is this build's.
    stored = json.loads(str(client.get(f"buildq:record:{source_hash}")))
    assert stored["status"] == record["status"] and stored["digest"] == record["digest"]


def assert_one_image(cluster: FaultCluster, repository: str, record: dict[str, Any]) -> None:
    assert record["status"] in ("built", "skipped"), record["error"]
    assert cluster.registry.tags(repository) == [record["tag"]]
    assert cluster.registry.digest(repository, record["tag"]) == record["digest"]
