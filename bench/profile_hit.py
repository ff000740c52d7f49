"""Where a cache hit's time goes: cProfile of the control worker and of the client.

Starts Redis and a registry (as the benchmarks do), builds a generated context once with a
docker worker, then serves N cache hits with a control worker that runs the stages in its
own main thread (Celery's solo pool, so one profiler sees every stage) under cProfile,
while this process profiles the client's ``build_image.delay(...).get()``. Prints the top
functions of each by own time and by cumulative time, and the record's stage medians.

    python bench/profile_hit.py                 # 5,000 files / 50 MiB, 30 hits
    python bench/profile_hit.py --files 500 --mb 5 -n 10

Not part of ``bench/run``: a profile is for reading, not a figure with a target.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, Cluster, generate_tree, median, percentile

#: The control worker under cProfile: a solo pool, so the stages run in this thread.
_WORKER = """
import cProfile, os, signal, sys
from config.settings import Settings
from tasks.app import POOL_QUEUES, app, configure
from tasks.presence import announce
from tasks.connection import redis_client
settings = Settings.from_env()
configure(settings)
hostname = f"control-{os.getpid()}-prof@localhost"
announce(redis_client(settings), "control", hostname)
worker = app.Worker(hostname=hostname, queues=list(POOL_QUEUES["control"]), pool_cls="solo",
                    concurrency=1, loglevel="WARNING", prefetch_multiplier=1,
                    without_gossip=True, without_mingle=True, without_heartbeat=True, quiet=True)
profile = cProfile.Profile()
profile.enable()
try:
    worker.start()
finally:
    profile.disable()
    profile.dump_stats(sys.argv[1])
"""


def _top(stats: pstats.Stats, key: str, limit: int) -> str:
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats(key).print_stats(limit)
    return out.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("-n", type=int, default=30)
    parser.add_argument("--limit", type=int, default=30, help="functions shown per table")
    parser.add_argument("--save", type=Path, help="write worker.prof and client.prof here")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="buildq-profile-"))
    cluster = Cluster.start(root, [("docker", 1)])
    worker: subprocess.Popen[bytes] | None = None
    try:
        cluster.use()
        from tasks import build_image

        assert cluster.registry is not None
        ctx = root / "ctx"
        ctx.mkdir()
        base = cluster.push_base("bench/busybox:base")
        (ctx / "Dockerfile").write_text(f"FROM {base}\nCOPY . /app\n")
        generate_tree(ctx, args.files, args.mb << 20, seed=11, salt=uuid.uuid4().bytes)
        dest = f"{cluster.registry.host}/bench/profile"
        stats_path = root / "worker.prof"
        log = open(root / "worker-prof.log", "ab")  # noqa: SIM115
        worker = subprocess.Popen([sys.executable, "-c", _WORKER, str(stats_path)],
                                  env=cluster.env, cwd=REPO, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)

        def request() -> dict[str, Any]:
            result = build_image.delay(str(ctx), destination=dest, base_policy="digest")
            record: dict[str, Any] = result.get(timeout=600)
            return record

        first = request()
        if first["status"] != "built":
            raise SystemExit(f"the first build did not build: {first}")
        request()  # warms what the worker remembers (the tree, the base digest)
        client_profile = cProfile.Profile()
        latencies, records = [], []
        for _ in range(args.n):
            started = time.perf_counter()
            client_profile.enable()
            record = request()
            client_profile.disable()
            latencies.append((time.perf_counter() - started) * 1000)
            records.append(record)
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(60)
        worker = None

        stages = sorted({s for r in records for s in r["stages"]})
        print(f"{args.n} cache hits of {args.files:,} files / {args.mb} MiB: median "
              f"{median(latencies):.1f} ms, p90 {percentile(latencies, 90):.1f} ms "
              f"(the profilers slow both sides down)")
        print("stage medians (ms): " + ", ".join(
            f"{s} {median([r['stages'][s] * 1000 for r in records if s in r['stages']]):.1f}"
            for s in stages))
        outside = [lat - sum(r["stages"].values()) * 1000 for lat, r in zip(latencies, records,
                                                                            strict=True)]
        print(f"outside the stages: median {median(outside):.1f} ms")
        worker_stats = pstats.Stats(str(stats_path))
        client_stats = pstats.Stats(client_profile)
        if args.save is not None:
            args.save.mkdir(parents=True, exist_ok=True)
            shutil.copy(stats_path, args.save / "worker.prof")
            client_stats.dump_stats(str(args.save / "client.prof"))
        for name, stats in (("control worker", worker_stats), ("client", client_stats)):
            print(f"\n=== {name}: by own time ===")
            print(_top(stats, "tottime", args.limit))
            print(f"=== {name}: by cumulative time ===")
            print(_top(stats, "cumulative", args.limit))
    finally:
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
