"""The worker image builds with the real Docker Engine from a locally made base, and runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import services

REPO = Path(__file__).resolve().parents[2]
TAG = "buildq:ops-test"

pytestmark = pytest.mark.slow


def _context(root: Path) -> Path:
    """The repo's image inputs plus a wheelhouse, so the build needs no network."""
    ctx = root / "context"
    ctx.mkdir()
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, ctx / name)
    for name in ("config", "tasks", "workers"):
        shutil.copytree(REPO / name, ctx / name, ignore=shutil.ignore_patterns("__pycache__"))
    # Builds here cannot reach PyPI from inside a container (its TLS is intercepted with a CA
    # only the host trusts), so the host's pip fills a wheelhouse. async-timeout: redis needs
    # it on Debian's Python 3.11.2, not on the host's newer 3.11.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", str(ctx), "pip", "setuptools",
                    "wheel", "async-timeout", "-w", str(ctx / "wheels")],
                   check=True, capture_output=True, timeout=900)
    return ctx


def test_worker_image_builds_and_runs(tmp_path: Path, docker_engine: str) -> None:
    import docker

    try:
        base = services.ensure_python_base_image(tmp_path)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    client = docker.DockerClient(base_url=f"unix://{services.DOCKER_SOCKET}")
    client.images.build(
        path=str(_context(tmp_path)), tag=TAG, rm=True, network_mode="none", timeout=1800,
        buildargs={"BASE": base, "PIP_INSTALL_OPTIONS": "--no-index --find-links /src",
                   # git comes from apt, which is not reachable without a network.
                   "APT_PACKAGES": ""})

    def run(*cmd: str) -> str:
        out = client.containers.run(TAG, list(cmd), network_mode="none", remove=True)
        return out.decode() if isinstance(out, bytes) else str(out)

    usage = run("buildq", "--help")
    for command in ("build", "worker", "flower", "status"):
        assert command in usage
    assert "--metrics-port" in run("buildq", "worker", "--help")
    assert run("id", "-u").strip() == "10001"
    # The wheelhouse and build tools stayed in the build stage.
    assert run("sh", "-c", "ls /src 2>/dev/null | wc -l; ls /opt/buildq/bin/ | grep -c '^pip' || true"
               ).split() == ["0", "0"]
    image = client.images.get(TAG)
    assert image.attrs["Config"]["User"].startswith("10001")
