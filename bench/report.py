"""Write ``bench/REPORT.md`` from what the benchmarks wrote to ``bench/out/*.json``.

Every number in the report comes from those files (or, for the machine, from the
machine itself): nothing here knows what a figure should be. ``bench/run`` calls this
after the benchmarks; run it by hand to rebuild the report from the last run's files.

    python bench/report.py [--out bench/REPORT.md] [--results bench/out] [--note TEXT]
                           [--status NAME=CODE ...]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT, REPO, fmt, fmt_pass, fmt_ratio

#: Report order; bench/run runs them in this order too. Benchmarks not listed follow by name.
ORDER = ("hash", "chain", "throughput", "overhead", "upload", "scale", "cache")


def expected_benches() -> list[str]:
    """Every ``bench/<name>_bench.py``: a benchmark with no JSON is reported missing, not omitted."""
    found = {p.name.removesuffix("_bench.py") for p in (REPO / "bench").glob("*_bench.py")}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def load_results(out: Path) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for path in sorted(out.glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(path.read_text())
            if isinstance(data, dict) and "bench" in data and "rows" in data:
                results[data["bench"]] = data
    return results


# --- the machine ---------------------------------------------------------------------------

def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _field(text: str, key: str, sep: str = ":") -> str | None:
    for line in text.splitlines():
        name, found, value = line.partition(sep)
        if found and name.strip() == key:
            return value.strip().strip('"')
    return None


def _run(*cmd: str) -> str | None:
    """A command's stdout, unstripped (porcelain status lines start with a space), or None."""
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def docker_version() -> str:
    """The engine's version as the benchmarks' engine reports it (the CLI may be older)."""
    try:
        import docker

        from tests.services import DOCKER_SOCKET

        client = docker.DockerClient(base_url=f"unix://{DOCKER_SOCKET}", timeout=10)
        try:
            info = client.version()
        finally:
            client.close()
        return f"{info.get('Version', '?')} (API {info.get('ApiVersion', '?')})"
    except Exception as exc:  # the report must still be written with the engine gone
        return f"unknown ({type(exc).__name__})"


def machine(run_date: str) -> dict[str, str]:
    cpuinfo = _read("/proc/cpuinfo")
    mem_kb = _field(_read("/proc/meminfo"), "MemTotal")
    mem = f"{int(mem_kb.split()[0]) / 2**20:.1f} GiB" if mem_kb else "unknown"
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    commit = (_run("git", "rev-parse", "--short=12", "HEAD") or "unknown").strip()
    subject = (_run("git", "log", "-1", "--format=%s") or "").strip()
    # Uncommitted changes outside bench/ were part of what was measured; name them.
    status = _run("git", "status", "--porcelain", "--untracked-files=no") or ""
    dirty = sorted({line[3:] for line in status.splitlines() if not line[3:].startswith("bench/")})
    tree = ("clean outside bench/" if not dirty else
            f"{len(dirty)} file(s) with uncommitted changes: {', '.join(dirty)}")
    return {
        "CPU": f"{_field(cpuinfo, 'model name') or platform.processor() or 'unknown'}",
        "Cores": f"{cores} ({usable} usable by the benchmarks)",
        "Memory": mem,
        "OS": _field(_read("/etc/os-release"), "PRETTY_NAME", "=") or platform.system(),
        "Kernel": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "Docker Engine": docker_version(),
        "Python": platform.python_version(),
        "Run date": run_date,
        "Commit": f"`{commit}` {subject}".strip(),
        "Working tree": tree,
    }


# --- markdown ------------------------------------------------------------------------------

def md(text: object) -> str:
    """A table cell: a ``|`` would end the cell (``tar | sha256sum`` has one)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(head: list[str], body: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(md(c) for c in row) + " |" for row in body]
    return lines


def figure_name(row: dict[str, Any]) -> str:
    # The benches indent a sub-figure of the row above; markdown would drop the indent.
    name: str = row["figure"]
    return f"↳ {name.strip()}" if name.startswith(" ") else name


def baseline_cell(row: dict[str, Any]) -> str:
    if row["baseline"] is None:
        return "-"
    value = fmt(row["baseline"], row["unit"])
    return f"{value} ({row['baseline_label']})" if row.get("baseline_label") else value


def when(ts: float | None) -> str:
    if ts is None:
        return "?"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def bench_state(name: str, data: dict[str, Any] | None, status: dict[str, int]) -> tuple[bool, str]:
    """(ran cleanly, a phrase saying how the benchmark ended)."""
    code = status.get(name)
    exit_text = f"exit {code}" if code is not None else "exit status not recorded"
    if data is None:
        return False, f"no result: it ended before writing bench/out/{name}.json ({exit_text})"
    if data.get("error"):
        return False, f"error: {data['error'].strip().splitlines()[-1]} ({exit_text})"
    broken = [k for k, v in data.get("invariants", {}).items() if not v]
    if broken:
        return False, f"invariant broken: {', '.join(broken)} ({exit_text})"
    if code not in (None, 0):
        return False, f"finished, but {exit_text}"
    held = len(data.get("invariants", {}))
    return True, f"ran; {held} invariant(s) held ({exit_text})" if held else f"ran ({exit_text})"


def render(results: dict[str, dict[str, Any]], names: list[str], host: dict[str, str],
           note: str | None, status: dict[str, int]) -> str:
    present = [results[n] for n in names if n in results]
    quick = [d["bench"] for d in present if d.get("quick")]
    starts = [d["started_at"] for d in present if d.get("started_at")]
    ends = [d["finished_at"] for d in present if d.get("finished_at")]
    out: list[str] = ["# buildq benchmark report", ""]
    if quick:
        which = "every benchmark" if len(quick) == len(present) else ", ".join(quick)
        out += [f"> **Quick run** ({which}: `bench/run --quick`, small inputs and few repetitions, "
                "a smoke test). These are not the benchmarks' figures; run `bench/run` for them.", ""]
    out += [
        f"Written by `bench/report.py` from the run of {when(min(starts) if starts else None)} to "
        f"{when(max(ends) if ends else None)} (`bench/run`). Every figure and its baseline were measured "
        "in that run on the machine below; nothing is carried over from earlier runs.",
        "",
    ]
    if note:
        out += [f"**Note:** {note}", ""]

    # Summary: every target, then how each benchmark ended.
    targets = [(d, r) for d in present for r in d["rows"] if r.get("target") and r.get("pass") is not None]
    met = sum(bool(r["pass"]) for _, r in targets)
    states = {n: bench_state(n, results.get(n), status) for n in names}
    bad = [n for n, (ok, _) in states.items() if not ok]
    out += ["## Summary", ""]
    verdict = f"**{met} of {len(targets)} measured targets met**"
    missed = [f"{d['bench']}: {figure_name(r).removeprefix('↳ ')} ({r['target']})"
              for d, r in targets if not r["pass"]]
    if missed:
        verdict += f"; missed: {'; '.join(missed)}"
    if bad:
        verdict += f"; **benchmarks that did not run cleanly: {', '.join(bad)}**"
    out += [verdict + ".", ""]
    out += md_table(
        ["benchmark", "figure", "target", "buildq", "baseline", "ratio", "result"],
        ([d["bench"], figure_name(r).removeprefix("↳ "), r["target"], fmt(r["value"], r["unit"]),
          baseline_cell(r), fmt_ratio(r["ratio"]), f"**{fmt_pass(r['pass'])}**"] for d, r in targets))
    out += ["", "Benchmarks:", ""]
    out += [f"- `{n}`: {text}" for n, (_, text) in states.items()]
    out += ["", "Ratio: how many times better buildq did than the baseline (baseline ÷ buildq for times "
            "and sizes, buildq ÷ baseline for throughputs), so above 1 means buildq is ahead.", ""]

    out += ["## Machine", ""]
    load = ", ".join(f"{d['bench']} {d['host']['load_avg_at_start'][0]:.2f}" for d in present
                     if d.get("host", {}).get("load_avg_at_start"))
    steal = ", ".join(f"{d['bench']} {d['host']['steal_share'] * 100:.1f}%" for d in present
                      if d.get("host", {}).get("steal_share") is not None)
    rows = [*host.items(), ("Load average (1 min) as each benchmark started", load or "-"),
            ("CPU time taken by the hypervisor (steal) during each benchmark", steal or "-")]
    out += md_table(["", ""], ([k, v] for k, v in rows))
    out += [""]

    for name in names:
        data = results.get(name)
        script = f"bench/{name}_bench.py"
        if data is None:
            out += [f"## `{name}` (`{script}`)", "", f"**{states[name][1]}.**", ""]
            continue
        out += [f"## {data['title']} (`{script}`)", ""]
        if data.get("quick"):
            out += ["*Quick mode.*", ""]
        out += [f"- **Baseline:** {data['baseline']}", f"- **Measured:** {data['method']}",
                "- **Parameters:** " + ", ".join(f"{k}={v}" for k, v in data["params"].items()
                                                   if not isinstance(v, dict)), ""]
        if data["rows"]:
            out += md_table(
                ["figure", "buildq", "baseline (what it is)", "ratio", "target", "pass"],
                ([figure_name(r), fmt(r["value"], r["unit"]), baseline_cell(r), fmt_ratio(r["ratio"]),
                  r["target"] or "-", fmt_pass(r["pass"])] for r in data["rows"]))
            out += [""]
        out += [f"- {n}" for n in data.get("notes", [])]
        invariants = data.get("invariants", {})
        if invariants:
            out += ["- Invariants: " + ", ".join(f"{k} {'holds' if v else '**BROKEN**'}"
                                                for k, v in invariants.items())]
        out += [f"- Outcome: {states[name][1]}", ""]
        if data.get("error"):
            out += ["```", *data["error"].rstrip().splitlines()[-15:], "```", ""]
    out += [f"Raw figures: `bench/out/<name>.json` of the run (not committed). Regenerate with "
            f"`bench/run{' --quick' if quick else ''}`.", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "REPORT.md")
    parser.add_argument("--results", type=Path, default=OUT, help="where the JSON files are")
    parser.add_argument("--note", help="a sentence for the top of the report (how quiet the machine was)")
    parser.add_argument("--status", action="append", default=[], metavar="NAME=CODE",
                        help="a benchmark's exit code, as bench/run saw it")
    args = parser.parse_args(argv)
    status: dict[str, int] = {}
    for item in args.status:
        name, _, code = item.partition("=")
        status[name] = int(code)
    results = load_results(args.results)
    names = expected_benches()
    names += sorted(set(results) - set(names))
    starts = [d["started_at"] for d in results.values() if d.get("started_at")]
    text = render(results, names, machine(when(min(starts) if starts else None)), args.note, status)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
