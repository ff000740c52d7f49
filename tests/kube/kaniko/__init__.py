"""The real kaniko executor, built from the Go module beside this file, packed as a local image.

``go.mod`` here requires one kaniko release (see tests/kube/README.md for which fork and
why); it is a Go module of its own, apart from tests/kube/go.mod, so kaniko's dependency
versions and Kubernetes' never have to agree. :func:`build_executor` compiles the static
``executor`` into ``~/.cache/buildq/kaniko-<version>/`` once (a stamp of go.mod, go.sum,
flags and Go version says when to rebuild); :func:`ensure_image` packs it with the layout
kaniko's own image has, without pulling anything; :func:`push_image` puts that image in a
test registry, which is how a kubelet or a Job reaches it.

    python -m tests.kube.kaniko [--jobs N] [--nice N] [--force] [--push HOST:PORT]

prints a line per step and the image reference on its last line.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.kube.build import BuildError, cache_root, go_command, go_env, locked, run_go_build

MODULE_DIR = Path(__file__).resolve().parent
#: The fork built here and its executor's package (tests/kube/README.md says why this one).
KANIKO_MODULE = "github.com/chainguard-dev/kaniko"
EXECUTOR_PACKAGE = f"{KANIKO_MODULE}/cmd/executor"
#: The host's CA bundle, copied in as kaniko's image carries Debian's.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
#: The local repository the image is tagged in (a tag per version and content).
IMAGE_REPOSITORY = "buildq-test/kaniko-executor"
#: What kaniko's own image sets (deploy/Dockerfile upstream); the executor finds its
#: docker config, CA certificates and credential helpers through these.
IMAGE_ENV = {
    "HOME": "/root",
    "USER": "root",
    "PATH": "/usr/local/bin:/kaniko",
    "SSL_CERT_DIR": "/kaniko/ssl/certs",
    "DOCKER_CONFIG": "/kaniko/.docker",
}
IMAGE_WORKDIR = "/workspace"
EXECUTOR_PATH = "/kaniko/executor"
#: Go's resolver reads this to look in /etc/hosts before DNS, as kaniko's image says.
NSSWITCH = b"hosts: files dns\n"


def kaniko_version(gomod: Path | None = None) -> str:
    """The release of :data:`KANIKO_MODULE` that go.mod requires."""
    text = (gomod or MODULE_DIR / "go.mod").read_text()
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(KANIKO_MODULE)}\s+(v\S+)", text, re.M)
    if not match:
        raise BuildError(f"tests/kube/kaniko/go.mod requires no {KANIKO_MODULE}")
    return match.group(1)


def cache_dir(version: str | None = None) -> Path:
    return cache_root() / f"kaniko-{version or kaniko_version()}"


def ldflags(version: str) -> list[str]:
    """Stripped, and the version stamped where ``executor version`` reads it, as upstream's Makefile does."""
    return ["-s", "-w", f"-X={KANIKO_MODULE}/pkg/version.version={version}"]


def _stamp(version: str, go_version: str) -> str:
    digest = hashlib.sha256()
    for part in ((MODULE_DIR / "go.mod").read_bytes(), (MODULE_DIR / "go.sum").read_bytes(),
                 EXECUTOR_PACKAGE.encode(), " ".join(ldflags(version)).encode(), go_version.encode()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def build_executor(*, jobs: int = 1, niceness: int = 19, force: bool = False,
                   say: Callable[[str], None] = print) -> Path:
    """The static executor, built if missing or stale. Safe to run concurrently."""
    version = kaniko_version()
    go = go_command()
    env = go_env(jobs)
    go_version = subprocess.run([go, "env", "GOVERSION"], cwd=MODULE_DIR, env=env, check=True,
                                capture_output=True, text=True).stdout.strip()
    directory = cache_dir(version)
    target = directory / "executor"
    stamp_file = directory / ".executor.stamp"
    want = _stamp(version, go_version)
    with locked(directory / ".lock"):
        if not force and target.exists() and stamp_file.exists() and stamp_file.read_text() == want:
            say(f"kaniko build: executor {version} up to date ({target})")
            return target
        say(f"kaniko build: executor {KANIKO_MODULE}@{version}: building with {go_version}, "
            f"{jobs} job(s), nice {niceness}")
        partial = directory / ".executor.partial"
        cmd = ["nice", "-n", str(niceness), go, "build", "-v", "-trimpath",
               "-ldflags", " ".join(ldflags(version)), "-o", str(partial), EXECUTOR_PACKAGE]
        started = time.monotonic()
        run_go_build(cmd, env, "executor", say, cwd=MODULE_DIR)
        partial.replace(target)
        stamp_file.write_text(want)
        seconds = round(time.monotonic() - started, 1)
        times_file = directory / "build-times.json"
        times = json.loads(times_file.read_text()) if times_file.exists() else {}
        times["executor"] = seconds
        times_file.write_text(json.dumps(times, indent=2) + "\n")
        say(f"kaniko build: executor built in {seconds:.0f}s ({target.stat().st_size / 2**20:.0f} MiB)")
    return target


def _layout(executor: Path) -> bytes:
    """The image's filesystem as a tar: root-owned, /kaniko world-writable as upstream's."""
    if not HOST_CA_BUNDLE.exists():
        raise BuildError(f"no CA bundle at {HOST_CA_BUNDLE} (Debian's ca-certificates package)")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        def add_dir(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)

        def add_file(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))

        # Kaniko writes its snapshots and stage images under /kaniko, even as non-root.
        add_dir("kaniko", 0o777)
        add_dir("kaniko/.docker")
        add_dir("kaniko/ssl")
        add_dir("kaniko/ssl/certs")
        add_dir("etc")
        add_dir("workspace")
        add_file("kaniko/executor", executor.read_bytes(), 0o755)
        add_file("kaniko/ssl/certs/ca-certificates.crt", HOST_CA_BUNDLE.read_bytes())
        add_file("etc/nsswitch.conf", NSSWITCH)
    return buffer.getvalue()


def _image_changes() -> list[str]:
    changes = [f"ENV {key}={value}" for key, value in IMAGE_ENV.items()]
    return [*changes, f"WORKDIR {IMAGE_WORKDIR}", f'ENTRYPOINT ["{EXECUTOR_PATH}"]']


def _docker(*args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["docker", *args], input=data, capture_output=True, check=False)


def ensure_image(executor: Path | None = None, *, say: Callable[[str], None] = print,
                 force: bool = False) -> str:
    """The local image reference, packed if missing (and the executor built, unless given)."""
    executor = executor or build_executor(say=say, force=force)
    layout = _layout(executor)
    content = hashlib.sha256(layout + "\n".join(_image_changes()).encode()).hexdigest()
    ref = f"{IMAGE_REPOSITORY}:{kaniko_version()}-{content[:12]}"
    if not force and _docker("image", "inspect", ref).returncode == 0:
        say(f"kaniko image: {ref} up to date")
        return ref
    args = ["import"]
    for change in _image_changes():
        args += ["--change", change]
    done = _docker(*args, "-", ref, data=layout)
    if done.returncode:
        raise BuildError(f"docker import of {ref} failed: {done.stderr.decode(errors='replace')}")
    say(f"kaniko image: packed {ref}")
    return ref


def push_image(registry_host: str, executor: Path | None = None, *,
               say: Callable[[str], None] = print) -> str:
    """The image in ``registry_host`` (a plain-HTTP test registry): its reference there.

    Only the registry keeps the tag, so whatever runs it pulls it as a cluster node would.
    """
    local = ensure_image(executor, say=say)
    ref = f"{registry_host}/{local}"
    for args in (("tag", local, ref), ("push", ref)):
        done = _docker(*args)
        if done.returncode:
            raise BuildError(f"docker {args[0]} {ref} failed: {done.stderr.decode(errors='replace')}")
    _docker("image", "rm", ref)
    say(f"kaniko image: pushed {ref}")
    return ref
