"""Horizontal scale on one machine: 2 control + 3 docker workers (separate processes) and
Flower, N distinct builds plus a duplicate of each, enqueued with ``build_image.delay()``.

Prints the total wall time, builds per minute and each stage's median (from the records),
beside a baseline measured in the same run: the same N builds one after another through
a single docker worker.

    python bench/scale_bench.py                 # 30 builds + 30 duplicates
    python bench/scale_bench.py --quick         # 6 builds + 6 duplicates
    python bench/scale_bench.py --builds 60 --control 2 --docker 4

Prints the figures and a table, writes ``bench/out/scale.json``. Exits 1 if the scaled run
did not build each source exactly once or a request failed, 2 on an error.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import BenchResult, Row, exit_on_sigterm, table  # noqa: E402 - after the path is set

from tests import services  # noqa: E402
from tests.ops.cluster import make_apps, point_app_at, start_ops_cluster  # noqa: E402


def run(root: Path, registry: services.RegistryServer, builds: int, control: int, docker: int,
        duplicates: bool, name: str) -> dict[str, Any]:
    from tasks import build_image, outcome

    cluster = start_ops_cluster(root / name, registry, control=control, docker=docker,
                                flower=duplicates)
    try:
        point_app_at(cluster)
        apps = make_apps(root / f"apps-{name}", services.BASE_IMAGE, builds)
        dest = f"{registry.host}/bench/{name}"
        started = time.monotonic()
        if duplicates:
            results = [build_image.delay(str(a), destination=dest) for a in apps]
            results += [build_image.delay(str(a), destination=dest) for a in apps]
        else:
            # The baseline: one build at a time.
            results = []
            for a in apps:
                r = build_image.delay(str(a), destination=dest)
                outcome(r, timeout=600)
                results.append(r)
        records = [outcome(r, timeout=900) for r in results]
        wall = time.monotonic() - started
    finally:
        cluster.stop()
    ran = [r for r in records if r["status"] == "built" and not r["attached"]]
    stages: dict[str, list[float]] = {}
    for r in ran:
        for stage, seconds in r["stages"].items():
            stages.setdefault(stage, []).append(seconds)
    return {
        "name": name, "requests": len(records), "builds": len(ran), "wall_s": wall,
        "builds_per_min": len(ran) / wall * 60,
        "failed": sum(r["status"] == "failed" for r in records),
        "attached": sum(bool(r["attached"]) for r in records),
        "skipped": sum(r["status"] == "skipped" for r in records),
        "distinct_tags": len({r.get("tag") for r in records}),
        "stage_median_s": {k: statistics.median(v) for k, v in sorted(stages.items())},
    }


def rows_for(builds: int, control: int, docker: int, scaled: dict[str, Any],
             serial: dict[str, Any] | None) -> list[Row]:
    label = "the same builds one at a time, 1 control + 1 docker worker"
    base = serial or {}
    return [
        Row(f"{builds} builds + {builds} duplicates on {control} control + {docker} docker workers: wall",
            scaled["wall_s"], "s", base.get("wall_s"), "", None, label),
        Row("  builds per minute", scaled["builds_per_min"], "/min", base.get("builds_per_min"), "", None,
            label, higher_is_better=True),
        Row("  builds run (not attached, not skipped)", scaled["builds"], "", None, f"== {builds}",
            scaled["builds"] == builds),
        Row("  duplicates answered without a build (attached + skipped)",
            scaled["attached"] + scaled["skipped"], "", None, f"== {builds}",
            scaled["attached"] + scaled["skipped"] == builds),
        Row("  failed requests", scaled["failed"], "", None, "== 0", scaled["failed"] == 0),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="6 builds + 6 duplicates")
    parser.add_argument("--builds", type=int, help="distinct builds (default 30)")
    parser.add_argument("--control", type=int, default=2)
    parser.add_argument("--docker", type=int, default=3)
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    builds = args.builds or (6 if args.quick else 30)

    exit_on_sigterm()
    result = BenchResult(
        "scale", "Horizontal scale: N builds + N duplicates over several workers",
        baseline="the same N builds sent one at a time (each awaited) through 1 control + 1 docker worker.",
        method=(f"{builds} tiny distinct busybox contexts (`COPY msg.txt`), each sent twice at once "
                "with `build_image.delay()` to separate worker processes (control concurrency 2, "
                "docker concurrency 1) and Flower, one Redis, one registry and one Docker Engine "
                "on this machine; wall time from the first send to the last record."),
        quick=args.quick, params={"builds": builds, "control": args.control, "docker": args.docker,
                                  "baseline": not args.no_baseline})
    try:
        services.ensure_docker_engine()
        services.ensure_base_image()
        with tempfile.TemporaryDirectory(prefix="buildq-scale-") as tmp:
            root = Path(tmp)
            registry = services.start_registry(root / "registry")
            try:
                figures = [run(root, registry, builds, args.control, args.docker, True, "scaled")]
                if not args.no_baseline:
                    figures.append(run(root, registry, builds, 1, 1, False, "serial"))
            finally:
                registry.stop()
    except Exception:
        traceback.print_exc()
        result.write(error=traceback.format_exc())
        return 2
    for f in figures:
        label = (f"scaled: {args.control} control + {args.docker} docker workers, {f['requests']} requests"
                 if f["name"] == "scaled"
                 else "baseline: 1 control + 1 docker worker, one request at a time")
        print(f"{label}\n  builds {f['builds']}  failed {f['failed']}  attached {f['attached']}"
              f"  wall {f['wall_s']:.1f}s  {f['builds_per_min']:.0f} builds/min")
        print("  stage medians: " + ", ".join(f"{k} {v * 1000:.0f} ms"
                                              for k, v in f["stage_median_s"].items()))
    scaled = figures[0]
    serial = figures[1] if len(figures) > 1 else None
    rows = rows_for(builds, args.control, args.docker, scaled, serial)
    print()
    print(table(rows))
    notes = [f"{'scaled' if f['name'] == 'scaled' else 'baseline'} stage medians (builds that ran): "
             + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in f["stage_median_s"].items())
             for f in figures]
    invariants = {"each_source_built_once": scaled["builds"] == builds,
                  "no_failed_request": scaled["failed"] == 0,
                  "one_tag_per_source": scaled["distinct_tags"] == builds}
    if serial is not None:
        # A baseline with failed builds would flatter the scaled run.
        invariants["baseline_no_failed_request"] = serial["failed"] == 0
    path = result.write(rows, {f["name"]: f for f in figures}, invariants, notes)
    print(f"wrote {path}")
    return 0 if all(invariants.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
