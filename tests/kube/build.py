"""Build the test cluster's binaries from the Go module beside this file.

``tests/kube/go.mod`` requires ``k8s.io/kubernetes`` (with every ``k8s.io`` staging module
replaced by its published ``v0.x.y`` release) and ``go.etcd.io/etcd/server/v3``, and names
the four programs as ``tool`` lines. This compiles them with the machine's own Go into
``~/.cache/buildq/kube-<version>/bin/`` (``BUILDQ_KUBE_CACHE`` moves the root), once: a
binary whose stamp (go.mod, go.sum, package, flags, Go version) is unchanged is kept.

    python -m tests.kube.build [--jobs N] [--nice N] [--force] [--quiet] [NAME ...]

prints a line per step (and a heartbeat while the compiler runs) and the bin directory on
its last line. scripts/bootstrap --tests runs it (``--quiet``), so the test session finds them built.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parent
KUBERNETES = "k8s.io/kubernetes"
ETCD_SERVER = "go.etcd.io/etcd/server/v3"
HEARTBEAT_SECONDS = 30.0


@dataclass(frozen=True)
class Pins:
    kubernetes: str  # v1.37.2
    etcd: str  # v3.7.0
    replaces: dict[str, str]  # k8s.io/api -> v0.37.2
    go: str  # the go directive: 1.26.0


@dataclass(frozen=True)
class Binary:
    name: str
    package: str


BINARIES = (
    Binary("kube-apiserver", f"{KUBERNETES}/cmd/kube-apiserver"),
    Binary("kube-controller-manager", f"{KUBERNETES}/cmd/kube-controller-manager"),
    Binary("kubectl", f"{KUBERNETES}/cmd/kubectl"),
    Binary("etcd", ETCD_SERVER),
)


class BuildError(RuntimeError):
    pass


def _strip_comment(line: str) -> str:
    return line.split("//", 1)[0].strip()


def read_pins(gomod: Path | None = None) -> Pins:
    """The versions go.mod pins, checked for the staging-replace recipe's one rule."""
    text = (gomod or MODULE_DIR / "go.mod").read_text()
    required: dict[str, str] = {}
    replaces: dict[str, str] = {}
    go = ""
    block = ""
    for raw in text.splitlines():
        line = _strip_comment(raw)
        if not line:
            continue
        if line.endswith("("):
            block = line[:-1].strip()
            continue
        if line == ")":
            block = ""
            continue
        words = line.split()
        kind = block
        if not block:
            kind, words = words[0], words[1:]
        if kind == "go" and words:
            go = words[0]
        elif kind == "require" and len(words) >= 2:
            required[words[0]] = words[1]
        elif kind == "replace" and "=>" in words:
            arrow = words.index("=>")
            left, right = words[:arrow], words[arrow + 1 :]
            if len(right) == 2:
                replaces[left[0]] = right[1]
    pins = Pins(required.get(KUBERNETES, ""), required.get(ETCD_SERVER, ""), replaces, go)
    problems = check_pins(pins)
    if problems:
        raise BuildError("tests/kube/go.mod: " + "; ".join(problems))
    return pins


def check_pins(pins: Pins) -> list[str]:
    """Every k8s.io/<staging> replace must be v0.<minor>.<patch> of k8s.io/kubernetes v1.<minor>.<patch>."""
    problems: list[str] = []
    match = re.fullmatch(r"v1\.(\d+\.\d+)", pins.kubernetes)
    if not match:
        return [f"requires {KUBERNETES} at {pins.kubernetes or 'nothing'}, not a v1.x.y release"]
    if not pins.etcd:
        problems.append(f"requires no {ETCD_SERVER}")
    staging = {m: v for m, v in pins.replaces.items() if m.startswith("k8s.io/")}
    if not staging:
        problems.append("replaces no k8s.io staging module")
    want = f"v0.{match.group(1)}"
    problems += [f"replaces {m} with {v}, want {want}" for m, v in sorted(staging.items()) if v != want]
    return problems


def cache_root() -> Path:
    """Where every Go-built test binary is cached: ``BUILDQ_KUBE_CACHE`` or ~/.cache/buildq."""
    return Path(os.environ.get("BUILDQ_KUBE_CACHE") or Path.home() / ".cache" / "buildq")


def cache_dir(pins: Pins) -> Path:
    return cache_root() / f"kube-{pins.kubernetes}"


def bin_dir(pins: Pins | None = None) -> Path:
    return cache_dir(pins or read_pins()) / "bin"


def ldflags(binary: Binary, pins: Pins) -> list[str]:
    """What upstream's release build stamps in, so ``kubectl version`` and /version are true."""
    flags = ["-s", "-w"]
    if binary.package.startswith(KUBERNETES):
        major, minor = pins.kubernetes[1:].split(".")[:2]
        for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
            flags += [f"-X={pkg}.gitVersion={pins.kubernetes}", f"-X={pkg}.gitMajor={major}",
                      f"-X={pkg}.gitMinor={minor}", f"-X={pkg}.gitTreeState=clean"]
    return flags


def go_command() -> str:
    found = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else "")
    if not found:
        raise BuildError("no `go` on PATH: the polyglot machine has Go 1.26 in /usr/local/go/bin")
    return found


def go_env(jobs: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "CGO_ENABLED": "0",  # static, as upstream releases kube-apiserver and etcd
        "GOTOOLCHAIN": "local",  # never fetch another Go
        "GOMAXPROCS": str(jobs),
        "GOFLAGS": f"-p={jobs} -buildvcs=false -mod=readonly",
    })
    return env


def stamp(binary: Binary, pins: Pins, go_version: str) -> str:
    digest = hashlib.sha256()
    for part in ((MODULE_DIR / "go.mod").read_bytes(), (MODULE_DIR / "go.sum").read_bytes(),
                 binary.package.encode(), " ".join(ldflags(binary, pins)).encode(), go_version.encode()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_go_build(cmd: list[str], env: dict[str, str], name: str, say: Callable[[str], None],
                 cwd: Path = MODULE_DIR) -> None:
    """Run ``go build -v``, saying every HEARTBEAT_SECONDS how many packages it compiled."""
    started = time.monotonic()
    compiled = 0
    tail: list[str] = []
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(HEARTBEAT_SECONDS):
            say(f"  {name}: {compiled} packages compiled, {time.monotonic() - started:.0f}s")

    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ticker = threading.Thread(target=heartbeat, daemon=True)
    ticker.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            compiled += 1  # -v prints each package as it is compiled (and errors)
            tail = [*tail[-40:], line.rstrip()]
        code = proc.wait()
    finally:
        done.set()
        if proc.poll() is None:
            proc.kill()
    if code:
        raise BuildError(f"go build of {name} failed (exit {code}):\n" + "\n".join(tail))


def out_of_date() -> list[str]:
    """The binaries :func:`build` would build now (missing, or built from other pins)."""
    pins = read_pins()
    env = go_env(1)
    go_version = subprocess.run([go_command(), "env", "GOVERSION"], cwd=MODULE_DIR, env=env, check=True,
                                capture_output=True, text=True).stdout.strip()
    stale = []
    for binary in BINARIES:
        target, stamp_file = bin_dir(pins) / binary.name, bin_dir(pins) / f".{binary.name}.stamp"
        if not (target.exists() and stamp_file.exists()
                and stamp_file.read_text() == stamp(binary, pins, go_version)):
            stale.append(binary.name)
    return stale


def build(names: Sequence[str] = (), *, jobs: int | None = None, niceness: int = 19, force: bool = False,
          say: Callable[[str], None] = print) -> dict[str, Path]:
    """Build what is missing or stale; return every binary's path. Safe to run concurrently."""
    pins = read_pins()
    wanted = [b for b in BINARIES if not names or b.name in names]
    unknown = set(names) - {b.name for b in BINARIES}
    if unknown:
        raise BuildError(f"unknown binary {sorted(unknown)}; known: {[b.name for b in BINARIES]}")
    jobs = jobs or os.cpu_count() or 1
    go = go_command()
    env = go_env(jobs)
    go_version = subprocess.run([go, "env", "GOVERSION"], cwd=MODULE_DIR, env=env, check=True,
                                capture_output=True, text=True).stdout.strip()
    out_dir = bin_dir(pins)
    times_file = cache_dir(pins) / "build-times.json"
    paths: dict[str, Path] = {}
    with locked(cache_dir(pins) / ".lock"):
        out_dir.mkdir(parents=True, exist_ok=True)
        times: dict[str, float] = json.loads(times_file.read_text()) if times_file.exists() else {}
        for index, binary in enumerate(wanted, 1):
            target = out_dir / binary.name
            stamp_file = out_dir / f".{binary.name}.stamp"
            want = stamp(binary, pins, go_version)
            version = pins.etcd if binary.package == ETCD_SERVER else pins.kubernetes
            paths[binary.name] = target
            if not force and target.exists() and stamp_file.exists() and stamp_file.read_text() == want:
                say(f"kube build [{index}/{len(wanted)}] {binary.name} {version}: up to date ({target})")
                continue
            say(f"kube build [{index}/{len(wanted)}] {binary.name} {version}: building with {go_version}, "
                f"{jobs} job(s), nice {niceness}")
            partial = out_dir / f".{binary.name}.partial"
            cmd = ["nice", "-n", str(niceness), go, "build", "-v", "-trimpath",
                   "-ldflags", " ".join(ldflags(binary, pins)), "-o", str(partial), binary.package]
            started = time.monotonic()
            run_go_build(cmd, env, binary.name, say)
            partial.replace(target)
            stamp_file.write_text(want)
            times[binary.name] = round(time.monotonic() - started, 1)
            times_file.write_text(json.dumps(times, indent=2) + "\n")
            say(f"kube build [{index}/{len(wanted)}] {binary.name}: built in {times[binary.name]:.0f}s "
                f"({target.stat().st_size / 2**20:.0f} MiB)")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.kube.build",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"some of {[b.name for b in BINARIES]} (default: all)")
    parser.add_argument("--jobs", type=int, default=None, help="GOMAXPROCS and go build -p (default: cores)")
    parser.add_argument("--nice", type=int, default=19, help="niceness of the compiler (default 19)")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--quiet", action="store_true",
                        help="say only what is built (on stderr); not what is up to date, nor the bin dir")
    args = parser.parse_args(argv)

    def say(line: str) -> None:
        if not (args.quiet and line.endswith(")") and ": up to date (" in line):
            print(line, file=sys.stderr if args.quiet else sys.stdout, flush=True)

    try:
        paths = build(args.names, jobs=args.jobs, niceness=args.nice, force=args.force, say=say)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(next(iter(paths.values())).parent if paths else bin_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
