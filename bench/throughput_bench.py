"""Control-plane throughput: distinct requests answered per second by 1, 2 and 4 control
processes, sent by 16 concurrent clients.

Starts its own Redis, registry and two docker workers (concurrency 1), and for each count
of control processes a control worker with that concurrency (one prefork child per
process). 16 client processes each send a request, wait for its answer and send the
next, for a fixed time; the figure is answers per second. (Processes, not threads: Celery's
result backend serialises the threads of one process waiting for answers.)

- Cache hits: each request names one of many small distinct contexts whose image already
  exists (its tag, computed here as the workers compute it, is put in the registry
  beforehand, so every answer is ``skipped``): the whole control plane (queue, hash, lock,
  registry check, record, answer) and nothing else.
- New tiny builds: each request is a fresh context (``COPY`` of one small file) that the
  docker pool builds and pushes: where the queue, the lock and the record stop scaling,
  and the docker pool (one Engine on this machine) takes over.

Baselines, measured in the same run: for one control process, one client sending
sequentially; for two and four, one control process with 16 clients.

    python bench/throughput_bench.py            # 10 s per point
    python bench/throughput_bench.py --quick    # 3 s per point

Prints a table, writes ``bench/out/throughput.json``. Exits 1 if a request failed or a
cache hit was not skipped, 2 on a setup error; a missed target is marked FAIL only.
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
import traceback
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO,
    BenchResult,
    Cluster,
    Row,
    exit_on_sigterm,
    median,
    percentile,
    remove_images,
    table,
)

#: Issue 17's target: cache hits answered per second with two control processes.
TARGET_HITS_PER_S = 100.0
#: Concurrent clients.
CLIENTS = 16
#: Control processes per point of the curve.
CONTROL_COUNTS = (1, 2, 4)
#: Distinct cache-hit contexts (each hit names the next one, round robin).
CONTEXTS = 64
#: Files per cache-hit context.
FILES_PER_CONTEXT = 20
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"


def _log(msg: str) -> None:
    print(f"[throughput_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_hit_contexts(cluster: Cluster, root: Path, dest: str, base: str) -> list[Path]:
    """Small distinct contexts whose images the registry already has, by the workers' tag."""
    import requests

    from config.settings import Settings
    from tasks.operations import describe_request, hash_tree

    assert cluster.registry is not None
    settings = Settings.from_env(cluster.env)
    repository = dest.split("/", 1)[1]
    manifest = requests.get(f"{cluster.registry.url}/v2/{repository}/manifests/base",
                            headers={"Accept": MANIFEST_TYPE}, timeout=30)
    manifest.raise_for_status()
    contexts = []
    for index in range(CONTEXTS):
        ctx = root / f"hit-{index:03d}"
        (ctx / "src").mkdir(parents=True)
        (ctx / "Dockerfile").write_text(f"FROM {base}\nCOPY . /app\n")
        for n in range(FILES_PER_CONTEXT):
            (ctx / "src" / f"f{n:02d}.txt").write_text(f"{index} {n} {uuid.uuid4()}\n" * 20)
        state, _, _ = describe_request("bench", str(ctx), settings, destination=dest, ref=None,
                                       dockerfile=None, build_args=None, target=None,
                                       platform=None, config=None)
        hash_tree(state, ctx, settings)
        put = requests.put(f"{cluster.registry.url}/v2/{repository}/manifests/{state.tag}",
                           data=manifest.content, headers={"Content-Type": MANIFEST_TYPE},
                           timeout=30)
        put.raise_for_status()
        contexts.append(ctx)
    return contexts


def make_build_context(root: Path, base: str) -> Path:
    ctx = root / f"build-{uuid.uuid4().hex[:12]}"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {base}\nCOPY n.txt /n.txt\n")
    (ctx / "n.txt").write_text(f"{uuid.uuid4()}\n")
    return ctx


def client_loop(mode: str, index: int, root: Path, dest: str, base: str, seconds: float) -> None:
    """One client (``--client``): after "go" on stdin, send and wait until ``seconds`` pass;
    one JSON line per answer on stdout, then one with the CPU time the client spent."""
    from tasks import build_image, outcome

    hit_contexts = sorted(root.glob("hit-*"))
    print("ready", flush=True)
    sys.stdin.readline()
    stop_at = time.monotonic() + seconds
    cpu_at_start = time.process_time()
    sent_count = 0
    while time.monotonic() < stop_at:
        if mode == "hits":
            source = hit_contexts[(index + sent_count * CLIENTS) % len(hit_contexts)]
        else:
            source = make_build_context(root, base)
        sent_count += 1
        sent = time.monotonic()
        record = outcome(build_image.delay(str(source), destination=dest), timeout=600)
        print(json.dumps({"at": time.time(), "latency": time.monotonic() - sent,
                          "status": record.get("status"),
                          "stages": sum((record.get("stages") or {}).values())}), flush=True)
    print(json.dumps({"client_cpu_s": time.process_time() - cpu_at_start}), flush=True)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children (a worker's pool)."""
    total = 0.0
    try:
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                                  text=True, check=False).stdout.split()
        for each in [pid, *map(int, children)]:
            with open(f"/proc/{each}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return float("nan")
    return total


def run_clients(cluster: Cluster, clients: int, seconds: float, mode: str, root: Path,
                dest: str, base: str, control_pid: int | None = None) -> dict[str, Any]:
    """``clients`` client processes, started together, each for ``seconds``; with
    ``control_pid``, also the CPU time that control worker spent meanwhile."""
    procs = [subprocess.Popen(
        [sys.executable, __file__, "--client", mode, "--index", str(i), "--root", str(root),
         "--dest", dest, "--base", base, "--seconds", str(seconds)],
        env=cluster.env, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for i in range(clients)]
    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a client did not start")
        started = time.time()
        control_cpu = _cpu_seconds(control_pid) if control_pid else float("nan")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        answers = []
        for proc in procs:
            out, _ = proc.communicate(timeout=seconds + 900)
            answers += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        if control_pid:
            control_cpu = _cpu_seconds(control_pid) - control_cpu
            if proc.returncode != 0:
                raise RuntimeError(f"a client failed (exit {proc.returncode})")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    client_cpu = sum(a["client_cpu_s"] for a in answers if "client_cpu_s" in a)
    answers = [a for a in answers if "at" in a]
    # Answers that came after the window are counted, over the time they took to come.
    elapsed = max(a["at"] for a in answers) - started if answers else seconds
    latencies = [a["latency"] * 1000 for a in answers]
    statuses: dict[str, int] = {}
    for answer in answers:
        statuses[str(answer["status"])] = statuses.get(str(answer["status"]), 0) + 1
    return {"clients": clients, "answers": len(answers), "seconds": elapsed,
            "client_cpu_s": client_cpu, "control_cpu_s": control_cpu,
            "per_s": len(answers) / elapsed, "latency_median_ms": median(latencies),
            "latency_p90_ms": percentile(latencies, 90), "statuses": statuses,
            # The time a worker spent in the stages, of the whole latency (queue waits).
            "stages_median_ms": median([a["stages"] * 1000 for a in answers])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s per point")
    parser.add_argument("--seconds", type=float, help="seconds per point (default 10)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (worker logs)")
    parser.add_argument("--client", choices=("hits", "builds"), help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dest", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    args = parser.parse_args()
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    if args.client:
        client_loop(args.client, args.index, args.root, args.dest, args.base, seconds)
        return 0

    exit_on_sigterm()
    result = BenchResult(
        "throughput", "Control-plane throughput: distinct requests answered per second",
        baseline=("for one control process, one client sending requests one after another; "
                  "for two and four, one control process with the same 16 clients."),
        method=(f"own Redis, registry and 2 docker workers (concurrency 1); a control worker "
                f"with concurrency 1, 2 and 4 in turn; {CLIENTS} client processes, "
                f"each sending `build_image.delay()` and waiting for the answer, for "
                f"{seconds:g} s per point. Cache hits: {CONTEXTS} distinct {FILES_PER_CONTEXT}-file "
                "contexts whose tags are in the registry (all answers `skipped`); new builds: "
                "a fresh one-file context per request (`COPY`), built and pushed by the docker "
                "pool."),
        quick=args.quick, params={"seconds": seconds, "clients": CLIENTS,
                                  "control_counts": list(CONTROL_COUNTS), "contexts": CONTEXTS,
                                  "docker_workers": 2})
    root = Path(tempfile.mkdtemp(prefix="buildq-throughput-"))
    cluster: Cluster | None = None
    points: dict[str, Any] = {"hits": {}, "builds": {}}
    try:
        cluster = Cluster.start(root, [("docker", 1), ("docker", 1)])
        cluster.use()
        assert cluster.registry is not None
        base = cluster.push_base("bench/tp:base")
        dest = f"{cluster.registry.host}/bench/tp"
        contexts = make_hit_contexts(cluster, root, dest, base)
        _log(f"{len(contexts)} cache-hit contexts ready")

        def run(clients: int, mode: str) -> dict[str, Any]:
            return run_clients(cluster, clients, seconds, mode, root, dest, base, worker.pid)

        # All the hit points first, then the build points: a build round leaves the Engine
        # and the registry busy for a while (pushes, cleanup), which would be counted
        # against the hits of the next point.
        for mode in ("hits", "builds"):
            for count in CONTROL_COUNTS:
                worker = cluster.start_worker("control", count)
                try:
                    # Every process answers a few first (imports, connections, its tree index).
                    run_clients(cluster, CLIENTS, 1.0, "hits", root, dest, base)
                    if count == 1:
                        points[f"{mode}_sequential"] = run(1, mode)
                        _log(f"1 control, 1 client: {points[f'{mode}_sequential']['per_s']:.2f} "
                             f"{mode}/s")
                    point = points[mode][count] = run(CLIENTS, mode)
                    _log(f"{count} control, {CLIENTS} clients: {point['per_s']:.2f} {mode}/s, "
                         f"latency median {point['latency_median_ms']:.0f} ms, p90 "
                         f"{point['latency_p90_ms']:.0f} ms; {point['statuses']}; CPU s: clients "
                         f"{point['client_cpu_s']:.1f}, control {point['control_cpu_s']:.1f} "
                         f"over {point['seconds']:.1f} s")
                finally:
                    cluster.stop_worker(worker)
    except Exception:
        traceback.print_exc()
        result.write(error=traceback.format_exc())
        return 2
    finally:
        if cluster is not None:
            cluster.stop()
            if cluster.registry_host:
                remove_images(f"{cluster.registry_host}/bench/")
        if args.keep:
            _log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    hits, builds = points["hits"], points["builds"]
    rows = [
        Row(f"cache hits answered/s, 1 control process, {CLIENTS} clients", hits[1]["per_s"],
            "req/s", points["hits_sequential"]["per_s"], baseline_label="1 client, sequential",
            higher_is_better=True),
        *[Row(f"  {n} control processes", hits[n]["per_s"], "req/s", hits[1]["per_s"],
              f">= {TARGET_HITS_PER_S:g} req/s" if n == 2 else "",
              hits[n]["per_s"] >= TARGET_HITS_PER_S if n == 2 else None,
              "1 control process", higher_is_better=True) for n in CONTROL_COUNTS[1:]],
        Row(f"new tiny builds answered/s, 1 control process, {CLIENTS} clients",
            builds[1]["per_s"], "req/s", points["builds_sequential"]["per_s"],
            baseline_label="1 client, sequential", higher_is_better=True),
        *[Row(f"  {n} control processes", builds[n]["per_s"], "req/s", builds[1]["per_s"],
              baseline_label="1 control process", higher_is_better=True)
          for n in CONTROL_COUNTS[1:]],
    ]
    invariants = {
        "every_hit_skipped": all(set(p["statuses"]) == {"skipped"}
                                 for p in [*hits.values(), points["hits_sequential"]]),
        "every_new_build_built": all(set(p["statuses"]) == {"built"}
                                     for p in [*builds.values(), points["builds_sequential"]]),
    }
    notes = [
        "cache-hit latency (median / p90 ms) per control count: " + ", ".join(
            f"{n}: {hits[n]['latency_median_ms']:.0f} / {hits[n]['latency_p90_ms']:.0f}"
            for n in CONTROL_COUNTS),
        "new-build latency (median ms) per control count: " + ", ".join(
            f"{n}: {builds[n]['latency_median_ms']:.0f}" for n in CONTROL_COUNTS),
        "the clients run on the same 2 cores as the workers, Redis and the registry; CPU "
        "seconds over each cache-hit window (clients / control worker / window x cores): " +
        ", ".join(f"{n} process(es): {hits[n]['client_cpu_s']:.1f} / {hits[n]['control_cpu_s']:.1f}"
                  f" / {hits[n]['seconds'] * (os.cpu_count() or 1):.1f}" for n in CONTROL_COUNTS),
    ]
    print()
    print(table(rows))
    path = result.write(rows, {k: {str(n): v for n, v in p.items()} if isinstance(p, dict)
                               and all(isinstance(n, int) for n in p) else p
                               for k, p in points.items()}, invariants, notes)
    print(f"wrote {path}")
    return 0 if all(invariants.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
