"""This checkout against another commit, in paired runs on the same host: cache-hit latency,
hit throughput and the CPU each process spends per hit.

The host's speed drifts (on these machines by up to half within an hour), so a figure of
one run is not compared with a figure of another run made at another time: each pair runs
the two checkouts one right after the other, in alternating order, and the summary is the
median over pairs of each side and of their ratio.

Each side starts its own Redis, registry, one docker worker (idle: every request is a
hit) and a control worker with two processes, from its own checkout (the other commit in
a temporary git worktree; the compiled stamp check is copied over when its source is the
same, else that side uses the Python check and the summary says so). Then:

- 16 client processes send distinct 20-file cache hits for ``--seconds``: hits answered
  per second, and the CPU seconds per hit of the control worker's main process, its two
  pool processes, Redis, the registry and the clients;
- one client sends ``--hits`` hits one after another: median and p90 latency.

    python bench/compare.py ff419e3              # 2 pairs
    python bench/compare.py ff419e3 --pairs 3

Not part of ``bench/run`` (it needs a second checkout). Prints a table, writes
``bench/out/compare.json``; exits 2 on a setup error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: The checkout this script belongs to ("head"); bench/common.py is imported only once
#: the side to measure is known, so that each side uses its own helpers and buildq.
HERE = Path(__file__).resolve().parent.parent

#: Figures each side reports, and whether more is better.
FIGURES = {
    "hits_per_s": True,
    "latency_median_ms": False,
    "latency_p90_ms": False,
    "cpu_ms_control_main": False,
    "cpu_ms_control_pool": False,
    "cpu_ms_redis": False,
    "cpu_ms_registry": False,
    "cpu_ms_clients": False,
    "cpu_ms_total": False,
}


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True, check=False).stdout
    return [int(p) for p in out.split()]


def measure_side(seconds: float, hits: int) -> dict[str, Any]:
    """One side's figures (``--side``: runs from the side's own checkout)."""
    import throughput_bench as tb
    from common import Cluster, median, percentile

    root = Path(tempfile.mkdtemp(prefix="buildq-compare-"))
    cluster = Cluster.start(root, [("docker", 1)])
    try:
        cluster.use()
        assert cluster.registry is not None and cluster.redis is not None
        base = cluster.push_base("bench/compare:base")
        dest = f"{cluster.registry.host}/bench/compare"
        contexts = tb.make_hit_contexts(cluster, root, dest, base)
        worker = cluster.start_worker("control", 2)
        tb.run_clients(cluster, tb.CLIENTS, 1.5, "hits", root, dest, base)  # warm up
        assert cluster.registry.process is not None
        groups = {"control_main": [worker.pid], "control_pool": _children(worker.pid),
                  "redis": [cluster.redis.process.pid],
                  "registry": [cluster.registry.process.pid]}
        before = {k: sum(map(_cpu_seconds, pids)) for k, pids in groups.items()}
        run = tb.run_clients(cluster, tb.CLIENTS, seconds, "hits", root, dest, base)
        after = {k: sum(map(_cpu_seconds, pids)) for k, pids in groups.items()}
        answered = run["answers"]
        if set(run["statuses"]) != {"skipped"}:
            # A failed request is answered fast: counted, it would pass for a faster side.
            raise RuntimeError(f"not every cache hit was skipped: {run['statuses']}")
        figures: dict[str, Any] = {"hits_per_s": run["per_s"]}
        for name in groups:
            figures[f"cpu_ms_{name}"] = (after[name] - before[name]) / answered * 1000
        figures["cpu_ms_clients"] = run["client_cpu_s"] / answered * 1000
        figures["cpu_ms_total"] = sum(v for k, v in figures.items() if k.startswith("cpu_ms_"))

        from tasks import build_image, outcome

        latencies = []
        for n in range(hits + 20):
            sent = time.monotonic()
            record = outcome(build_image.delay(str(contexts[n % len(contexts)]),
                                               destination=dest), timeout=60)
            if record.get("status") != "skipped":
                raise RuntimeError(f"a cache hit was not skipped: {record}")
            if n >= 20:  # the first ones warm this client up
                latencies.append((time.monotonic() - sent) * 1000)
        figures["latency_median_ms"] = median(latencies)
        figures["latency_p90_ms"] = percentile(latencies, 90)
        return figures
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _worktree(commit: str, into: Path) -> tuple[Path, bool]:
    """A checkout of ``commit``; and whether it has the compiled stamp check."""
    subprocess.run(["git", "-C", str(HERE), "worktree", "add", "--detach", "-q", str(into),
                    commit], check=True)
    same_c = subprocess.run(["git", "-C", str(HERE), "diff", "--quiet", commit, "--",
                             "workers/_stamps.c"], check=False).returncode == 0
    built = sorted((HERE / "workers").glob("_stamps.*.so"))
    if same_c and built:
        shutil.copy2(built[0], into / "workers" / built[0].name)
        return into, True
    return into, False


def _side(repo: Path, seconds: float, hits: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--side", str(repo), "--seconds",
         str(seconds), "--hits", str(hits)], cwd=repo, env=env, capture_output=True, text=True,
        check=False)
    for line in done.stdout.splitlines():
        if line.startswith("SIDE "):
            return dict(json.loads(line[5:]))
    raise RuntimeError(f"the {repo} side failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", nargs="?", help="the commit to compare this checkout with")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0, help="throughput window")
    parser.add_argument("--hits", type=int, default=200, help="sequential hits timed")
    parser.add_argument("--side", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        # Run from the side's checkout: its bench helpers, its buildq.
        sys.path.insert(0, str(args.side / "bench"))
        sys.path.insert(0, str(args.side))
        print("SIDE " + json.dumps(measure_side(args.seconds, args.hits)), flush=True)
        return 0
    if not args.base:
        parser.error("name the commit to compare with")
    sys.path.insert(0, str(HERE / "bench"))
    from common import OUT, REPO, median, write_json

    base_commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.base],
                                 capture_output=True, text=True, check=True).stdout.strip()
    head_commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    scratch = Path(tempfile.mkdtemp(prefix="buildq-compare-base-"))
    runs: list[dict[str, dict[str, Any]]] = []
    try:
        base_repo, native = _worktree(base_commit, scratch / "base")
        for pair in range(args.pairs):
            # Alternate which side goes first, so a drift of the host favours neither.
            order = [("base", base_repo), ("head", REPO)]
            if pair % 2:
                order.reverse()
            run = {name: _side(repo, args.seconds, args.hits) for name, repo in order}
            runs.append(run)
            print(f"pair {pair + 1}: " + "; ".join(
                f"{name} {run[name]['hits_per_s']:.1f} hits/s, median "
                f"{run[name]['latency_median_ms']:.1f} ms, CPU {run[name]['cpu_ms_total']:.1f} "
                "ms/hit" for name, _ in order), flush=True)
    except (subprocess.CalledProcessError, RuntimeError) as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                        str(scratch / "base")], check=False, capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)

    summary = {}
    print(f"\n{'figure':24} {'base ' + base_commit:>16} {'head ' + head_commit:>16} "
          f"{'head/base':>10}  per pair")
    for figure, higher_better in FIGURES.items():
        base_values = [r["base"][figure] for r in runs]
        head_values = [r["head"][figure] for r in runs]
        ratios = [h / b for h, b in zip(head_values, base_values, strict=True) if b]
        summary[figure] = {"base": median(base_values), "head": median(head_values),
                           "ratio": median(ratios), "higher_is_better": higher_better,
                           "pairs": [[b, h] for b, h in zip(base_values, head_values,
                                                            strict=True)]}
        print(f"{figure:24} {summary[figure]['base']:16.2f} {summary[figure]['head']:16.2f} "
              f"{summary[figure]['ratio']:10.3f}  " + ", ".join(f"{r:.3f}" for r in ratios))
    if not native:
        print(f"note: {base_commit} has another stamp check source; it ran the Python check")
    path = write_json("compare.json", {
        "bench": "compare", "base": base_commit, "head": head_commit, "pairs": args.pairs,
        "seconds": args.seconds, "hits": args.hits, "base_native_stamps": native,
        "summary": summary, "runs": runs, "finished_at": time.time()})
    print(f"wrote {path.relative_to(OUT.parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
