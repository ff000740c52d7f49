"""Horizontal scale on one machine: 2 control + 3 docker workers (separate processes) and
Flower, N distinct builds plus a duplicate of each, enqueued with ``build_image.delay()``.

Prints the total wall time, builds per minute and each stage's median (from the records),
beside a baseline measured in the same run: the same N builds one after another through
a single docker worker.

    python bench/scale_bench.py                 # 30 builds + 30 duplicates
    python bench/scale_bench.py --builds 60 --control 2 --docker 4 --json bench/out/scale.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import services  # noqa: E402 - after the path is set
from tests.ops.cluster import make_apps, point_app_at, start_ops_cluster  # noqa: E402


def run(root: Path, registry: services.RegistryServer, builds: int, control: int, docker: int,
        duplicates: bool, name: str) -> dict[str, Any]:
    from tasks import build_image

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
                r.get(timeout=600)
                results.append(r)
        records = [r.get(timeout=900) for r in results]
        wall = time.monotonic() - started
    finally:
        cluster.stop()
    ran = [r for r in records if r["status"] == "built" and not r["attached"]]
    stages: dict[str, list[float]] = {}
    for r in ran:
        for stage, seconds in r["stages"].items():
            stages.setdefault(stage, []).append(seconds)
    return {
        "name": name, "requests": len(records), "builds": len(ran), "wall_s": round(wall, 2),
        "builds_per_min": round(len(ran) / wall * 60, 1),
        "failed": sum(r["status"] == "failed" for r in records),
        "attached": sum(bool(r["attached"]) for r in records),
        "stage_median_s": {k: round(statistics.median(v), 4) for k, v in sorted(stages.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--builds", type=int, default=30)
    parser.add_argument("--control", type=int, default=2)
    parser.add_argument("--docker", type=int, default=3)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args()

    services.ensure_docker_engine()
    services.ensure_base_image()
    with tempfile.TemporaryDirectory(prefix="buildq-scale-") as tmp:
        root = Path(tmp)
        registry = services.start_registry(root / "registry")
        try:
            figures = [run(root, registry, args.builds, args.control, args.docker, True, "scaled")]
            if not args.no_baseline:
                figures.append(run(root, registry, args.builds, 1, 1, False, "serial"))
        finally:
            registry.stop()
    for f in figures:
        label = (f"scaled: {args.control} control + {args.docker} docker workers, {f['requests']} requests"
                 if f["name"] == "scaled"
                 else "baseline: 1 control + 1 docker worker, one request at a time")
        print(f"{label}\n  builds {f['builds']}  failed {f['failed']}  attached {f['attached']}"
              f"  wall {f['wall_s']:.1f}s  {f['builds_per_min']:.0f} builds/min")
        print("  stage medians: " + ", ".join(f"{k} {v * 1000:.0f} ms"
                                              for k, v in f["stage_median_s"].items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
