"""Source-hash throughput against ``tar -cf - DIR | sha256sum``.

Generates a tree once (default 20,000 files / 500 MB of mixed sizes), warms the page
cache, then times each contender in fresh processes, best of N. The hash runs in a
cold interpreter each time, so no in-process cache can help it.

    python bench/hash_bench.py                  # full size, temp dir
    python bench/hash_bench.py --files 2000 --mb 50 --dir /tmp/tree
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

#: Files per directory in the generated tree.
FILES_PER_DIR = 40

_CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from pathlib import Path
from workers.context import BuildInputs, source_hash
t1 = time.perf_counter()
digest = source_hash(Path(sys.argv[1]), BuildInputs())
t2 = time.perf_counter()
print(json.dumps({"hash": digest, "import_s": t1 - t0, "hash_s": t2 - t1,
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _sizes(files: int, total: int, rng: random.Random) -> list[int]:
    """Mostly small files, a few big ones carrying much of the bytes, like a real repo."""
    big = max(1, files // 1000)
    small = [int(2 ** rng.uniform(6, 17)) for _ in range(files - big)]  # 64 B .. 128 KiB
    rest = max(total - sum(small), big)
    weights = [rng.uniform(0.5, 1.5) for _ in range(big)]
    scale = rest / sum(weights)
    return small + [int(w * scale) for w in weights]


def generate(root: Path, files: int, mb: int, seed: int = 7) -> int:
    rng = random.Random(seed)
    sizes = _sizes(files, mb * 1024 * 1024, rng)
    rng.shuffle(sizes)
    root.mkdir(parents=True, exist_ok=True)
    (root / "Dockerfile").write_text("FROM scratch\nCOPY . /app\n")
    total = 0
    block = rng.randbytes(1 << 20)
    for i, size in enumerate(sizes):
        d = root / f"d{i // (FILES_PER_DIR * 25):03d}" / f"s{(i // FILES_PER_DIR) % 25:02d}"
        d.mkdir(parents=True, exist_ok=True)
        # Distinct contents (a per-file prefix) without paying for 500 MB of randomness.
        prefix = i.to_bytes(8, "little")
        with open(d / f"f{i:06d}.bin", "wb") as f:
            left = size
            f.write(prefix[:left])
            left -= min(left, len(prefix))
            while left > 0:
                chunk = block[: min(left, len(block))]
                f.write(chunk)
                left -= len(chunk)
        total += size
    (root / ".bench-complete").write_text(f"{files} {mb} {total}\n")
    return total


def tree_bytes(root: Path) -> int:
    return sum(
        os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(root) for f in fs
    )


def warm(root: Path) -> None:
    for d, _, fs in os.walk(root):
        for name in fs:
            with open(os.path.join(d, name), "rb") as f:
                while f.read(1 << 20):
                    pass


def run_hash(root: Path) -> tuple[float, float, dict[str, Any]]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CHILD, str(root)], cwd=REPO,
                          capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    report = json.loads(done.stdout)
    return wall, report["hash_s"], report


def run_tar(root: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["bash", "-c", 'set -o pipefail; tar -cf - -C "$1" . | sha256sum >/dev/null',
                    "bench", str(root)], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--mb", type=int, default=500)
    parser.add_argument("--dir", type=Path, help="tree location (kept; reused if complete)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    tmp = None
    if args.dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="buildq-bench-"))
        root = tmp / "tree"
    else:
        root = args.dir.resolve()
    try:
        marker = root / ".bench-complete"
        if not (marker.exists() and marker.read_text().split()[:2] == [str(args.files),
                                                                    str(args.mb)]):
            if root.exists():
                shutil.rmtree(root)
            print(f"generating {args.files} files / {args.mb} MB in {root} ...", flush=True)
            generate(root, args.files, args.mb)
        size = tree_bytes(root)
        mb = size / 1e6
        warm(root)
        cpus = os.cpu_count()
        print(f"tree: {args.files} files, {mb:.0f} MB; {cpus} CPUs; best of {args.runs}")

        tar_best = min(run_tar(root) for _ in range(args.runs))
        hash_runs = [run_hash(root) for _ in range(args.runs)]
        wall_best = min(r[0] for r in hash_runs)
        call_best = min(r[1] for r in hash_runs)
        rss_mb = max(r[2]["maxrss_kb"] for r in hash_runs) / 1024
        digests = {r[2]["hash"] for r in hash_runs}

        print(f"tar | sha256sum        : {tar_best:6.2f} s  {mb / tar_best:8.0f} MB/s")
        print(f"source_hash (whole process, incl. interpreter start): "
              f"{wall_best:6.2f} s  {mb / wall_best:8.0f} MB/s")
        print(f"source_hash (the call)  : {call_best:6.2f} s  {mb / call_best:8.0f} MB/s")
        print(f"ratio (process) : {tar_best / wall_best:5.2f}x")
        print(f"ratio (call)    : {tar_best / call_best:5.2f}x")
        print(f"peak RSS of the hash process: {rss_mb:.1f} MB")
        print(f"hash stable across runs: {len(digests) == 1} ({next(iter(digests))[:24]})")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
