"""The tree index's stamp check: the C one (workers/_stamps.c) against the Python one.

A cache hit on a remembered tree is mostly one ``lstat`` per remembered path, compared
with the stamp the walk saw (``TreeIndex._unchanged`` in workers/context.py). For trees of
5,000 and 20,000 files (50 per directory, a few bytes each: sizes do not matter to a
stamp), hashed once so the tree index remembers them, this times in one process:

- the stamp check alone: the C check on the threads the tree index gives it, the C check
  on one thread, and the Python check (``list(map(_stamp, map(os.lstat, paths)))``);
- the whole ``source_hash`` call answered from the index, with each check.

Each contender runs in turn, interleaved, ``--runs`` times; medians are reported.

    python bench/stamps_bench.py            # 5,000 and 20,000 files, 40 runs
    python bench/stamps_bench.py --quick    # the same sizes, 8 runs

Prints a table and writes ``bench/out/stamps.json``. Exits 1 if the C module is not built or
a check disagrees (an unchanged tree not seen as unchanged), 2 on an error.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BenchResult, Row, exit_on_sigterm, generate_tree, table  # puts REPO on sys.path

from workers import context

SIZES = (5_000, 20_000)
#: A cache hit usually comes after an idle moment, and its request's own work comes before
#: its stamp check: the checks timed after a sleep this long, then this much busy Python.
IDLE_S = 0.02
BUSY_S = 0.001
#: The stamp check's thread count before NATIVE_STAMP_THREADS became 3: the idle figure's
#: baseline.
FORMER_THREADS = 2


def _time_ms(fn: Callable[[], object], times: list[float]) -> None:
    start = time.perf_counter()
    fn()
    times.append((time.perf_counter() - start) * 1000)


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def measure(root: Path, files: int, runs: int) -> dict[str, Any]:
    """Every figure for a tree of ``files`` files under ``root``, none rounded."""
    generate_tree(root, files, files * 16, seed=files)
    (root / "Dockerfile").write_text("FROM scratch\nCOPY . /app\n")
    inputs = context.BuildInputs()
    context.clear_stat_cache()
    # The tree was written just now: trust its stamps at once (the racy window guards against
    # writes during a hash, which this benchmark does not make).
    racy, context.RACY_NS = context.RACY_NS, 0
    try:
        digest = context.source_hash(root, inputs)
    finally:
        context.RACY_NS = racy
    (walked,) = context.TREE_INDEX._walks.values()
    assert walked.packed is not None, "the tree index kept no packed stamps"
    paths, stamps = walked.paths, walked.stamps
    blob, records = walked.packed
    native = context.NATIVE_STAMPS
    assert native is not None
    threads = context.NATIVE_STAMP_THREADS if len(paths) >= context.NATIVE_SPLIT_AT else 1

    def python_check() -> bool:
        return list(map(context._stamp, map(os.lstat, paths))) == stamps

    def native_check() -> bool:
        return native.unchanged(blob, records, threads)

    def native_check_one_thread() -> bool:
        return native.unchanged(blob, records, 1)

    def native_check_former() -> bool:
        return native.unchanged(blob, records, FORMER_THREADS if threads > 1 else 1)

    def hit(check: Any) -> Callable[[], str]:
        def run() -> str:
            context.NATIVE_STAMPS = check
            try:
                return context.source_hash(root, inputs)
            finally:
                context.NATIVE_STAMPS = native
        return run

    contenders: dict[str, Callable[[], object]] = {
        "check_native": native_check, "check_native_1_thread": native_check_one_thread,
        "check_python": python_check, "hit_native": hit(native), "hit_python": hit(None),
    }
    # Timed after IDLE_S of sleep and BUSY_S of work, as a hit after a quiet moment.
    after_idle: dict[str, Callable[[], object]] = {
        "idle_native": native_check, "idle_native_former": native_check_former}
    answers = {name: fn() for name, fn in {**contenders, **after_idle}.items()}  # warms caches
    times: dict[str, list[float]] = {name: [] for name in {**contenders, **after_idle}}
    hits_before = context.TREE_INDEX.hits
    for _ in range(runs):
        for name, fn in contenders.items():
            _time_ms(fn, times[name])
    # Not interleaved: a worker runs one thread count always, and the idle CPUs' state after
    # a check depends on the check before.
    for name, fn in after_idle.items():
        for _ in range(runs):
            time.sleep(IDLE_S)
            _busy(BUSY_S)
            _time_ms(fn, times[name])
    agreed = (all(answers[n] is True for n in ("check_native", "check_native_1_thread", "check_python",
                                               "idle_native", "idle_native_former"))
              and answers["hit_native"] == answers["hit_python"] == digest
              and context.TREE_INDEX.hits - hits_before == 2 * runs)
    return {"files": files, "paths": len(paths), "threads": threads, "agreed": agreed,
            "runs_ms": times, "median_ms": {n: statistics.median(t) for n, t in times.items()}}


def rows_for(fig: dict[str, Any]) -> list[Row]:
    med = fig["median_ms"]
    label = "the Python check (os.lstat and a stamp per path)"
    hit_label = "source_hash hit with the Python check"
    head = f"{fig['files']:,} files ({fig['paths']:,} paths)"
    return [
        Row(f"stamp check, {head}: C on {fig['threads']} thread(s)", med["check_native"], "ms",
            med["check_python"], "", None, label),
        Row("  C on 1 thread", med["check_native_1_thread"], "ms", med["check_python"], "", None, label),
        Row(f"  C on {fig['threads']} thread(s) after {IDLE_S * 1000:.0f} ms idle", med["idle_native"],
            "ms", med["idle_native_former"], "", None,
            f"C on {FORMER_THREADS if fig['threads'] > 1 else 1} thread(s) after the same idle"),
        Row("  source_hash cache hit with the C check", med["hit_native"], "ms", med["hit_python"],
            "", None, hit_label),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 runs instead of 40")
    parser.add_argument("--runs", type=int)
    args = parser.parse_args()
    runs = args.runs or (8 if args.quick else 40)

    exit_on_sigterm()
    result = BenchResult(
        "stamps", "Tree index stamp check: C vs Python",
        baseline="the Python check, `list(map(_stamp, map(os.lstat, paths))) == stamps`, on the "
                 "same remembered paths in the same process.",
        method=(f"generated trees of {', '.join(f'{n:,}' for n in SIZES)} files (50 per directory), "
                "hashed once so the tree index remembers them; then the C check (on the threads "
                "the tree index gives it, and on one), the Python check and a whole source_hash "
                f"hit with each, interleaved, {runs} runs each; medians. Then, {runs} in a row each, "
                f"the C check after "
                f"{IDLE_S * 1000:.0f} ms of sleep and {BUSY_S * 1000:.0f} ms of busy Python (a "
                "hit after a quiet moment, its request's work before the check), on the tree "
                f"index's threads and on {FORMER_THREADS} (the count before it was 3)."),
        quick=args.quick, params={"files": list(SIZES), "runs": runs,
                                  "native_threads": context.NATIVE_STAMP_THREADS,
                                  "native_split_at": context.NATIVE_SPLIT_AT})
    if context.NATIVE_STAMPS is None:
        message = "workers/_stamps.c is not built (run scripts/bootstrap)"
        print(message, file=sys.stderr)
        result.write(error=message)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="buildq-stamps-"))
    figures: dict[str, Any] = {}
    try:
        for files in SIZES:
            figures[str(files)] = measure(tmp / f"tree-{files}", files, runs)
    except Exception:
        traceback.print_exc()
        result.write(error=traceback.format_exc())
        return 2
    finally:
        context.clear_stat_cache()
        shutil.rmtree(tmp, ignore_errors=True)

    rows: list[Row] = []
    for fig in figures.values():
        med = fig["median_ms"]
        print(f"{fig['files']:,} files, {fig['paths']:,} remembered paths (median of {runs}):")
        print(f"  stamp check  C ({fig['threads']} thread(s)) {med['check_native']:7.2f} ms   "
              f"C (1 thread) {med['check_native_1_thread']:7.2f} ms   "
              f"Python {med['check_python']:7.2f} ms   "
              f"ratio {med['check_python'] / med['check_native']:.2f}x")
        print(f"  source_hash hit  C {med['hit_native']:7.2f} ms   Python {med['hit_python']:7.2f} ms")
        print(f"  after {IDLE_S * 1000:.0f} ms idle  C ({fig['threads']} thread(s)) "
              f"{med['idle_native']:7.2f} ms   C ({FORMER_THREADS} threads) "
              f"{med['idle_native_former']:7.2f} ms")
        rows += rows_for(fig)
    agreed = all(fig["agreed"] for fig in figures.values())
    print()
    print(table(rows))
    path = result.write(rows, figures, {"checks_agree_on_an_unchanged_tree": agreed})
    print(f"wrote {path}")
    return 0 if agreed else 1


if __name__ == "__main__":
    sys.exit(main())
