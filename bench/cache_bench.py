"""Cross-host layer cache: a build host that never built a repository reuses the layers
another host pushed there.

Two Docker Engines stand in for two build hosts: the machine's own (host A) and, for each
measured build, a fresh second ``dockerd`` with its own data root, exec root, pid file and
socket (host B). Host A builds a Dockerfile whose RUN step is expensive (``sleep`` plus
file generation) and pushes it; the record stage notes the destination's last tag. Host B
then builds the same Dockerfile with one changed late layer, through a docker worker on
its engine:

- with the cache import: buildq passes ``--cache-from <destination>:<A's tag>``, whose
  inline cache came with A's push;
- baseline: the same change with no last tag in Redis (no ``--cache-from``), on another
  fresh engine, which is how every host built before.

The two orders alternate between repeats. Timed: the build stage of the record, and the
request from ``build_image.delay()`` to its record.

    python bench/cache_bench.py             # 3 repeats, sleep 5 s, 16 MiB generated
    python bench/cache_bench.py --quick     # 1 repeat

Prints a table and writes ``bench/out/cache.json``. Exits 1 if a build failed or a build
log contradicts the cache (B's expensive step not cached with the import, or cached
without it), 2 on an error.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import BenchResult, Cluster, Row, exit_on_sigterm, remove_images, table  # noqa: E402

from tests import services  # noqa: E402

#: The build's Dockerfile: an expensive step, then a cheap late one that each build changes.
DOCKERFILE = """FROM {base}
RUN echo {nonce} > /nonce && sleep {sleep} \\
    && dd if=/dev/urandom of=/generated bs=1M count={mb} 2>/dev/null && echo generated
COPY late.txt /late.txt
"""
#: Target: host B's build with the cache import this many times shorter than without.
TARGET = 3.0


def build(app: Path, dest: str) -> tuple[dict[str, Any], float]:
    from tasks import build_image

    started = time.monotonic()
    record = build_image.delay(str(app), destination=dest, builder="docker").get(timeout=900)
    return record, time.monotonic() - started


def expensive_step_cached(cluster: Cluster, record: dict[str, Any], nonce: str) -> bool:
    """Whether the build log shows the expensive RUN step taken from a cache."""
    import redis

    from workers.builders.buildkit import Progress

    assert cluster.redis is not None
    client = redis.Redis.from_url(cluster.redis.url, decode_responses=True)
    progress = Progress(lambda _: None)
    for _, fields in client.xrange(f"buildq:log:{record['source_hash']}"):
        progress.feed(fields.get("line", ""))
    client.close()
    return any(f"echo {nonce} > /nonce" in step for step in progress.cached_steps())


def host_b_build(cluster: Cluster, root: Path, app: Path, dest: str, nonce: str, label: str,
                 cache_tag: str | None) -> dict[str, Any]:
    """One build on a fresh engine; ``cache_tag`` None: no last tag, so no cache import."""
    import redis

    from tasks.keys import last_tag_key

    assert cluster.redis is not None
    engine = services.start_second_engine(root / f"host-b-{label}")
    try:
        services.copy_image(services.BASE_IMAGE, engine.socket)
        client = redis.Redis.from_url(cluster.redis.url)
        if cache_tag is None:
            client.delete(last_tag_key(dest))
        else:
            client.set(last_tag_key(dest), cache_tag)
        client.close()
        worker = cluster.start_worker("docker", 1, env=engine.env)
        try:
            (app / "late.txt").write_text(f"{label}\n")
            record, wall = build(app, dest)
        finally:
            cluster.stop_worker(worker)
    finally:
        engine.stop()
    return {"label": label, "status": record["status"], "frontend": record.get("frontend"),
            "tag": record["tag"], "build_s": record["stages"].get("build"),
            "push_s": record["stages"].get("push"), "wall_s": wall,
            "expensive_cached": expensive_step_cached(cluster, record, nonce)}


def repeat(cluster: Cluster, root: Path, index: int, sleep: float, mb: int) -> dict[str, Any]:
    assert cluster.registry is not None
    nonce = uuid.uuid4().hex[:10]
    app = root / f"app-{index}"
    app.mkdir()
    (app / "Dockerfile").write_text(DOCKERFILE.format(base=services.BASE_IMAGE, nonce=nonce,
                                                      sleep=sleep, mb=mb))
    (app / "late.txt").write_text("host A\n")
    dest = f"{cluster.registry.host}/bench/cache-{nonce}"

    host_a = cluster.start_worker("docker", 1)
    try:
        first, first_wall = build(app, dest)
    finally:
        cluster.stop_worker(host_a)
    out: dict[str, Any] = {"nonce": nonce, "host_a": {
        "status": first["status"], "build_s": first["stages"].get("build"), "wall_s": first_wall}}
    order = ("with", "without") if index % 2 == 0 else ("without", "with")
    for variant in order:
        out[variant] = host_b_build(cluster, root, app, dest, nonce, f"{variant}-{index}",
                                    first["tag"] if variant == "with" else None)
        print(f"  repeat {index + 1} host B {variant:7s} cache import: build "
              f"{out[variant]['build_s']:.2f} s, request {out[variant]['wall_s']:.2f} s, "
              f"expensive step cached: {out[variant]['expensive_cached']}", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat (a smoke test)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--sleep", type=float, default=5.0, help="seconds the expensive step sleeps")
    parser.add_argument("--mb", type=int, default=16, help="MiB the expensive step generates")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)

    exit_on_sigterm()
    result = BenchResult(
        "cache", "Cross-host layer cache: host B builds a change host A pushed before",
        baseline=("host B building the same change without the cache import (no last tag in "
                  "Redis, so no --cache-from), on an engine of its own that never saw the "
                  "repository either."),
        method=(f"Host A (this machine's Docker Engine) builds a Dockerfile whose RUN step "
                f"sleeps {args.sleep:g} s and writes {args.mb} MiB of random data, then pushes "
                "it to a local registry v2; host B is a fresh second dockerd (own data root, "
                "exec root, pid file and socket; --bridge=none) per build, with a docker "
                "worker on it, building the same Dockerfile with a changed last layer. "
                "BuildKit through the docker CLI on both; one control worker, one Redis. "
                f"{repeats} repeat(s), the order of the two host-B builds alternating; "
                "medians of the record's build stage and of the request time "
                "(build_image.delay() to record)."),
        quick=args.quick, params={"repeats": repeats, "sleep_s": args.sleep, "mb": args.mb})
    runs: list[dict[str, Any]] = []
    try:
        services.ensure_docker_engine()
        services.ensure_base_image()
        with tempfile.TemporaryDirectory(prefix="buildq-cache-") as tmp:
            root = Path(tmp)
            cluster = Cluster.start(root, [("control", 1)])
            try:
                cluster.use()
                for index in range(repeats):
                    runs.append(repeat(cluster, root, index, args.sleep, args.mb))
            finally:
                cluster.stop()
                if cluster.registry_host:
                    remove_images(f"{cluster.registry_host}/bench/cache-")
    except Exception:
        traceback.print_exc()
        result.write(error=traceback.format_exc())
        return 2

    def med(variant: str, key: str) -> float:
        return statistics.median(float(r[variant][key]) for r in runs)

    with_build, without_build = med("with", "build_s"), med("without", "build_s")
    with_wall, without_wall = med("with", "wall_s"), med("without", "wall_s")
    rows = [
        Row("host B build stage with the cache import (median)", with_build, "s",
            baseline=without_build, baseline_label="host B without the cache import",
            target=f">= {TARGET:g}x shorter", passed=without_build >= TARGET * with_build),
        Row("host B request, delay() to record (median)", with_wall, "s",
            baseline=without_wall, baseline_label="host B without the cache import"),
        Row("host A first build stage (median)", statistics.median(
            float(r["host_a"]["build_s"]) for r in runs), "s"),
    ]
    print()
    print(table(rows))
    invariants = {
        "every_build_built": all(r["host_a"]["status"] == "built" and r["with"]["status"] ==
                                 "built" and r["without"]["status"] == "built" for r in runs),
        "buildkit_built_on_host_b": all(r[v]["frontend"] == "buildkit" for r in runs
                                        for v in ("with", "without")),
        "host_b_log_shows_the_cached_step_with_the_import": all(r["with"]["expensive_cached"]
                                                                for r in runs),
        "host_b_runs_the_step_without_the_import": not any(r["without"]["expensive_cached"]
                                                           for r in runs),
    }
    notes = ["build stage per repeat, with / without the import: " + ", ".join(
        f"{r['with']['build_s']:.2f} s / {r['without']['build_s']:.2f} s" for r in runs),
             "push stage medians, with / without: "
             f"{med('with', 'push_s'):.2f} s / {med('without', 'push_s'):.2f} s (with the "
             "import the expensive layer is already in the registry)"]
    path = result.write(rows, {"runs": runs}, invariants, notes)
    print(f"wrote {path}")
    return 0 if all(invariants.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
