"""Helpers shared by the benchmarks in ``bench/``: a real buildq cluster, contexts, tables.

The cluster is the same shape as ``tests/tasks/conftest.py`` builds for the end-to-end
tests (real Redis, a real registry v2, the Docker Engine, ``python -m tasks.cli worker``
subprocesses), without pytest. Everything started here is stopped by ``Cluster.stop``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests import services  # noqa: E402

# The benchmarks build on a local base no registry serves, hashed by its text, except
# where one pushes its base to measure resolution (chain_bench's cache hit).
os.environ.setdefault("BUILDQ_BASE_POLICY", "tag")

# --- numbers -------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    data = sorted(values)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- contexts ------------------------------------------------------------------------------

def generate_tree(root: Path, files: int, total_bytes: int, seed: int, salt: bytes = b"",
                  files_per_dir: int = 50) -> int:
    """``files`` files of mixed sizes summing to about ``total_bytes``; returns bytes written.

    Sizes are mostly small with a few large files carrying much of the volume, like a
    real repository. ``salt`` goes into every file so two runs never share a hash.
    """
    rng = random.Random(seed)
    big = max(1, files // 500)
    small = [int(2 ** rng.uniform(6, 14)) for _ in range(files - big)]  # 64 B .. 16 KiB
    rest = max(total_bytes - sum(small), big)
    weights = [rng.uniform(0.5, 1.5) for _ in range(big)]
    sizes = small + [int(w * rest / sum(weights)) for w in weights]
    rng.shuffle(sizes)
    block = rng.randbytes(1 << 20)
    written = 0
    for i, size in enumerate(sizes):
        d = root / f"d{i // (files_per_dir * 20):03d}" / f"s{(i // files_per_dir) % 20:02d}"
        d.mkdir(parents=True, exist_ok=True)
        head = salt + i.to_bytes(8, "little")
        with open(d / f"f{i:06d}.bin", "wb") as f:
            data = head[:size]
            f.write(data)
            left = size - len(data)
            while left > 0:
                chunk = block[: min(left, len(block))]
                f.write(chunk)
                left -= len(chunk)
        written += size
    return written


# --- the cluster ---------------------------------------------------------------------------

@dataclass
class Cluster:
    """Redis + registry + buildq workers, all subprocesses of this script."""

    root: Path
    redis: services.RedisServer | None = None
    registry: services.RegistryServer | None = None
    env: dict[str, str] = field(default_factory=dict)
    workers: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    #: The registry's host:port, kept after ``stop`` so its images can be cleaned up.
    registry_host: str = ""

    @classmethod
    def start(cls, root: Path, workers: Iterable[tuple[str, int]], lease: float = 60) -> Cluster:
        c = cls(root)
        try:
            services.ensure_docker_engine()
            services.ensure_base_image()
            (root / "redis").mkdir(parents=True, exist_ok=True)
            c.redis = services.start_redis(root / "redis")
            c.registry = services.start_registry(root / "registry")
            c.registry_host = c.registry.host
            c.env = {
                **os.environ,
                "BUILDQ_REDIS_URL": c.redis.url,
                "BUILDQ_LOCK_LEASE": str(lease),
                "BUILDQ_WORKDIR": str(root / "work"),
                "BUILDQ_CONTEXT_STORE": (root / "contexts").as_uri(),
                "BUILDQ_NETWORK_MODE": "none",
                "BUILDQ_RETRY_BASE": "0.5",
                "BUILDQ_MAX_RETRIES": "3",
                "HOME": str(root / "home"),
                "PYTHONPATH": str(REPO),
                # The benchmarks' sources live under root: the workers (and this client,
                # which checks requests before sending them) may read them there.
                "BUILDQ_SOURCE_ROOTS": str(root),
            }
            c.env.pop("BUILDQ_CONFIG", None)
            for pool, concurrency in workers:
                c.start_worker(pool, concurrency)
        except BaseException:
            c.stop()
            raise
        return c

    def start_worker(self, pool: str, concurrency: int, env: dict[str, str] | None = None,
                     entry: list[str] | None = None) -> subprocess.Popen[bytes]:
        """A worker process; ``env`` adds to the cluster's (e.g. DOCKER_HOST: another engine),
        ``entry`` replaces ``-m tasks.cli`` (a wrapper taking buildq's arguments)."""
        import redis

        assert self.redis is not None
        log = open(self.root / f"worker-{pool}-{len(self.workers)}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, *(entry or ["-m", "tasks.cli"]), "worker", pool, "--concurrency",
             str(concurrency), "--loglevel", "INFO"],
            env={**self.env, **(env or {})}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.workers.append((pool, proc))
        client = redis.Redis.from_url(self.redis.url)
        try:
            services.wait_for(
                lambda: any(f"-{proc.pid}-".encode() in k
                            for k in client.scan_iter(match=f"buildq:pool:{pool}:*")),
                60, f"{pool} worker (log: {log.name})")
        finally:
            client.close()
        return proc

    def push_base(self, repository: str) -> str:
        """The local base image pushed to this cluster's registry; its reference there."""
        assert self.registry is not None
        ref = f"{self.registry.host}/{repository}"
        for command in (["docker", "tag", services.BASE_IMAGE, ref], ["docker", "push", "-q", ref]):
            subprocess.run(command, check=True, capture_output=True, timeout=120)
        return ref

    def stop_worker(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop one worker (SIGTERM, then SIGKILL) and forget it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        self.workers = [(pool, p) for pool, p in self.workers if p is not proc]

    def use(self) -> None:
        """Point this process's Celery app at the cluster (as a client script would)."""
        for key in ("BUILDQ_REDIS_URL", "BUILDQ_NETWORK_MODE", "BUILDQ_CONTEXT_STORE",
                    "BUILDQ_WORKDIR", "BUILDQ_LOCK_LEASE"):
            os.environ[key] = self.env[key]
        os.environ.pop("BUILDQ_CONFIG", None)
        import threading

        from config.settings import Settings
        from tasks.app import app, configure

        configure(Settings.from_env(self.env))
        # Anything cached before came from whatever configuration the import saw.
        app._pool = None
        app._local = threading.local()
        app.amqp._producer_pool = None

    def stop(self) -> None:
        for _, proc in self.workers:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, proc in self.workers:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self.workers.clear()
        if self.registry is not None:
            self.registry.stop()
            self.registry = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


def remove_images(prefix: str) -> int:
    """Remove every local image whose repository starts with ``prefix``; returns the count."""
    import docker

    client = docker.DockerClient(base_url=f"unix://{services.DOCKER_SOCKET}")
    removed = 0
    try:
        for image in client.images.list():
            for tag in image.tags:
                if tag.startswith(prefix):
                    try:
                        client.images.remove(tag, noprune=False)
                        removed += 1
                    except docker.errors.APIError:
                        pass
    finally:
        client.close()
    return removed


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks clean up."""
    def _raise(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)


# --- output --------------------------------------------------------------------------------

@dataclass
class Row:
    """One figure of a benchmark: buildq's value beside the baseline measured in the same run."""

    figure: str
    value: float
    unit: str
    baseline: float | None = None
    target: str = ""
    passed: bool | None = None
    #: What the baseline is ("tar -cf - DIR | sha256sum"): rows of one benchmark can have
    #: different baselines, and a bare number in the report would not say which.
    baseline_label: str = ""
    #: Throughputs are better when high, times when low. The ratio follows, so that above
    #: 1 always means buildq did better than the baseline, whatever the unit.
    higher_is_better: bool = False

    @property
    def ratio(self) -> float | None:
        if self.baseline is None:
            return None
        num, den = (self.value, self.baseline) if self.higher_is_better else (self.baseline, self.value)
        if not den:
            return None
        return num / den

    def to_dict(self) -> dict[str, Any]:
        return {"figure": self.figure, "value": self.value, "unit": self.unit,
                "baseline": self.baseline, "baseline_label": self.baseline_label,
                "ratio": self.ratio, "higher_is_better": self.higher_is_better,
                "target": self.target, "pass": self.passed}


def fmt(value: float | None, unit: str = "") -> str:
    """A figure for a table: thousands separators; one decimal, two below 10 (but not for ms)."""
    if value is None:
        return "-"
    if (isinstance(value, float) and value != int(value)) or unit in ("ms", "s"):
        text = f"{value:,.1f}" if abs(value) < 1000 else f"{value:,.0f}"
        if abs(value) < 10 and unit not in ("ms",):
            # Small seconds and megabytes lose too much at one decimal (0.4 s vs 0.44 s).
            text = f"{value:,.2f}"
    else:
        text = f"{int(value):,}"
    return f"{text} {unit}".strip()


def fmt_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.0f}x"


def fmt_pass(passed: bool | None) -> str:
    return "-" if passed is None else ("PASS" if passed else "FAIL")


def table(rows: Sequence[Row]) -> str:
    """Rows as an aligned plain-text table, for a benchmark's own output."""
    head = ["figure", "buildq", "baseline", "ratio (>1: buildq better)", "target", "pass"]
    body = [[r.figure, fmt(r.value, r.unit), fmt(r.baseline, r.unit), fmt_ratio(r.ratio),
             r.target or "-", fmt_pass(r.passed)] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def write_json(name: str, data: dict[str, Any]) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def cpu_ticks() -> tuple[int, int] | None:
    """(all CPU time, time stolen by the hypervisor) since boot, in ticks, from /proc/stat;
    None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(ticks), ticks[7]


def host_snapshot() -> dict[str, Any]:
    """What the machine was doing when a benchmark started: a busy machine explains a slow figure."""
    import platform

    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "load_avg_at_start": list(os.getloadavg()), "cpu_ticks_at_start": cpu_ticks()}


def steal_share(start: Sequence[int] | None, end: Sequence[int] | None) -> float | None:
    """The share of CPU time the hypervisor took from this machine between two
    :func:`cpu_ticks` readings: on a shared host, the virtual CPUs' own slowness."""
    if not start or not end or end[0] <= start[0]:
        return None
    return (end[1] - start[1]) / (end[0] - start[0])


@dataclass
class BenchResult:
    """One benchmark's ``bench/out/<name>.json``, the file ``bench/report.py`` reads.

    ``baseline`` and ``method`` are the sentences the report prints under the benchmark's
    table, so a reader knows what was compared without opening the script.
    """

    name: str
    title: str
    baseline: str
    method: str
    quick: bool
    params: dict[str, Any]
    started_at: float = field(default_factory=time.time)
    host: dict[str, Any] = field(default_factory=host_snapshot)

    def write(self, rows: Sequence[Row] = (), figures: dict[str, Any] | None = None,
              invariants: dict[str, bool] | None = None, notes: Sequence[str] = (),
              error: str | None = None) -> Path:
        """Write the JSON; ``ok`` is false on an error or a broken invariant (not a missed target)."""
        invariants = dict(invariants or {})
        data = {
            "bench": self.name, "title": self.title, "baseline": self.baseline,
            "method": self.method, "quick": self.quick, "params": self.params,
            "argv": sys.argv[1:],
            "host": {**self.host, "steal_share": steal_share(self.host.get("cpu_ticks_at_start"),
                                                             cpu_ticks())},
            "started_at": self.started_at, "finished_at": time.time(),
            "figures": figures or {}, "rows": [r.to_dict() for r in rows],
            "invariants": invariants, "notes": list(notes), "error": error,
            "ok": error is None and all(invariants.values()),
        }
        return write_json(f"{self.name}.json", data)
