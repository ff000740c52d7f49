"""Orchestration overhead: one small real build through buildq against ``docker build &&
docker push`` of the same kind of context, in the same run.

Starts its own Redis, registry, one control worker (concurrency 2) and one docker worker
(concurrency 1), on the machine's Docker Engine. Each repeat makes two fresh contexts of
the same shape (a Dockerfile that copies 50 small files and one file with a nonce, so no
layer is cached): one goes through ``build_image.delay(...).get()`` (fetch, hash, exists,
upload, build, push, record, on remote workers), the other through the same docker CLI
and builder buildq uses (BuildKit), then ``docker push`` to the same registry. The order
alternates between repeats; the figure is the difference of the medians.

    python bench/overhead_bench.py            # 7 repeats
    python bench/overhead_bench.py --quick    # 3 repeats

Prints a table, writes ``bench/out/overhead.json``. Exits 1 if a build failed, 2 on a
setup error; a missed target is marked FAIL only.
"""

from __future__ import annotations

import argparse
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

from common import BenchResult, Cluster, Row, exit_on_sigterm, median, remove_images, table

#: Issue 17's target: buildq's extra wall time over docker build && docker push, median.
TARGET_OVERHEAD_MS = 100.0
#: Small files in each context, besides the Dockerfile and the nonce.
FILES = 50


def _log(msg: str) -> None:
    print(f"[overhead_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_context(root: Path, base: str) -> Path:
    ctx = root / f"ctx-{uuid.uuid4().hex[:12]}"
    (ctx / "src").mkdir(parents=True)
    (ctx / "Dockerfile").write_text(f"FROM {base}\nCOPY src /app/src\nCOPY nonce.txt /app/\n")
    for n in range(FILES):
        (ctx / "src" / f"m{n:02d}.py").write_text(f"VALUE_{n} = {n}\n" * 40)
    (ctx / "nonce.txt").write_text(f"{uuid.uuid4()}\n")
    return ctx


def through_buildq(ctx: Path, dest: str) -> tuple[float, dict[str, Any]]:
    from tasks import build_image

    started = time.perf_counter()
    record: dict[str, Any] = build_image.delay(str(ctx), destination=dest).get(timeout=600)
    return time.perf_counter() - started, record


def directly(ctx: Path, image: str, cli: Any) -> float:
    """The docker CLI buildq builds with: build (BuildKit), then push; wall seconds."""
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    build = [*cli.command, "--progress=plain", "--network", "none", "-t", image, str(ctx)]
    started = time.perf_counter()
    for argv in (build, [cli.path, "push", "-q", image]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:3])} failed:\n{done.stdout}\n{done.stderr}")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    parser.add_argument("--repeats", type=int)
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)

    from workers.builders.buildkit import find_cli

    exit_on_sigterm()
    result = BenchResult(
        "overhead", "Orchestration overhead: one small build through buildq vs docker build && push",
        baseline=("the same docker CLI and builder buildq uses (BuildKit, network none) building "
                  "a context of the same shape, then `docker push` to the same registry."),
        method=(f"own Redis, registry, 1 control worker (concurrency 2) and 1 docker worker; "
                f"{repeats} repeats, each with two fresh contexts ({FILES} small files and a "
                "nonce, so nothing is cached), one through `build_image.delay(...).get()`, one "
                "built and pushed directly; the order alternates; medians of the wall times."),
        quick=args.quick, params={"repeats": repeats, "files": FILES})
    root = Path(tempfile.mkdtemp(prefix="buildq-overhead-"))
    cluster: Cluster | None = None
    runs: list[dict[str, Any]] = []
    try:
        cli, why = find_cli()
        if cli is None:
            raise RuntimeError(f"no docker CLI with BuildKit: {why}")
        cluster = Cluster.start(root, [("control", 2), ("docker", 1)])
        cluster.use()
        assert cluster.registry is not None
        base = cluster.push_base("bench/overhead:base")
        dest = f"{cluster.registry.host}/bench/overhead"
        # A first build of each kind: the engine, the workers' connections and imports.
        through_buildq(make_context(root, base), dest)
        directly(make_context(root, base), f"{dest}-direct:warm", cli)
        for index in range(repeats):
            timings: dict[str, Any] = {}
            order = ("buildq", "direct") if index % 2 == 0 else ("direct", "buildq")
            for way in order:
                ctx = make_context(root, base)
                if way == "buildq":
                    seconds, record = through_buildq(ctx, dest)
                    timings.update(buildq_s=seconds, status=record["status"],
                                   stages=record["stages"])
                else:
                    timings["direct_s"] = directly(ctx, f"{dest}-direct:{index}", cli)
            runs.append(timings)
            _log(f"repeat {index + 1}: buildq {timings['buildq_s']:.2f} s ({timings['status']}), "
                 f"docker build && push {timings['direct_s']:.2f} s")
    except Exception:
        traceback.print_exc()
        result.write(error=traceback.format_exc())
        return 2
    finally:
        if cluster is not None:
            cluster.stop()
            if cluster.registry_host:
                remove_images(f"{cluster.registry_host}/bench/")
        shutil.rmtree(root, ignore_errors=True)

    buildq_s = median([r["buildq_s"] for r in runs])
    direct_s = median([r["direct_s"] for r in runs])
    overhead_ms = (buildq_s - direct_s) * 1000
    paired = [(r["buildq_s"] - r["direct_s"]) * 1000 for r in runs]
    stage_names = sorted({s for r in runs for s in r["stages"]})
    stages = {s: median([r["stages"][s] * 1000 for r in runs if s in r["stages"]])
              for s in stage_names}
    label = "docker build && docker push"
    rows = [
        Row("one small build through buildq: wall (median)", buildq_s, "s", direct_s,
            baseline_label=label),
        Row("  buildq's extra wall time (difference of the medians)", overhead_ms, "ms", None,
            f"<= {TARGET_OVERHEAD_MS:g} ms", overhead_ms <= TARGET_OVERHEAD_MS),
        Row("  the same, median of the paired differences", median(paired), "ms"),
    ]
    invariants = {"every_build_built": all(r["status"] == "built" for r in runs)}
    notes = ["buildq stage medians (ms): " + ", ".join(f"{s} {v:.0f}" for s, v in stages.items()),
             "per repeat, buildq / direct (s): " + ", ".join(
                 f"{r['buildq_s']:.2f} / {r['direct_s']:.2f}" for r in runs)]
    print()
    print(table(rows))
    print(notes[0])
    path = result.write(rows, {"runs": runs, "stage_median_ms": stages}, invariants, notes)
    print(f"wrote {path}")
    return 0 if all(invariants.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
