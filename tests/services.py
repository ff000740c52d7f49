"""Real services for the tests: Redis, the Docker Engine, a registry v2.

Each starts on 127.0.0.1 at a free port (the engine on its usual socket), once per
test session, from here only. Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

DOCKER_SOCKET = "/var/run/docker.sock"
#: The tiny base image every test Dockerfile starts FROM (made locally: nothing can be pulled).
BASE_IMAGE = "local/busybox:base"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up within {timeout:.0f}s")


@dataclass
class RedisServer:
    port: int
    directory: Path
    process: subprocess.Popen[bytes]
    appendonly: bool = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        if self.process.poll() is None:
            self.process.kill()


def start_redis(directory: Path, appendonly: bool = False, port: int | None = None) -> RedisServer:
    port = port or free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--dir", str(directory), "--appendonly", "yes" if appendonly else "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(port, directory, proc, appendonly)
    import redis

    wait_for(lambda: redis.Redis(port=port).ping(), 10, "redis-server")
    return server


def docker_engine_running() -> bool:
    try:
        import docker

        docker.DockerClient(base_url=f"unix://{DOCKER_SOCKET}").ping()
        return True
    except Exception:
        return False


def ensure_docker_engine() -> None:
    """Start dockerd without a bridge (private address ranges are off limits here)."""
    if docker_engine_running():
        return
    if not shutil.which("dockerd"):
        raise RuntimeError("dockerd is not installed: run scripts/bootstrap first")
    log = open("/tmp/buildq-dockerd.log", "ab")  # noqa: SIM115 - lives as long as the daemon
    subprocess.Popen(
        ["dockerd", "--host", f"unix://{DOCKER_SOCKET}", "--bridge=none",
         "--iptables=false", "--ip-masq=false"],
        stdout=log, stderr=log, start_new_session=True,
    )
    wait_for(docker_engine_running, 60, "dockerd")


def ensure_base_image() -> str:
    import docker

    client = docker.DockerClient(base_url=f"unix://{DOCKER_SOCKET}")
    with contextlib.suppress(docker.errors.ImageNotFound):
        client.images.get(BASE_IMAGE)
        return BASE_IMAGE
    busybox = shutil.which("busybox") or "/bin/busybox"
    with tempfile.TemporaryDirectory() as root:
        bindir = Path(root, "bin")
        bindir.mkdir()
        shutil.copy2(busybox, bindir / "busybox")
        for tool in ("sh", "ls", "cat", "echo", "true", "false", "sleep", "mkdir", "cp",
                     "rm", "touch", "test", "grep", "wc", "env", "id", "printf", "sha256sum",
                     "head", "dd", "chmod", "adduser", "addgroup", "whoami"):
            os.symlink("busybox", bindir / tool)
        Path(root, "tmp").mkdir()
        Path(root, "etc").mkdir()
        Path(root, "etc", "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        Path(root, "etc", "group").write_text("root:x:0:\n")
        tar = subprocess.run(["tar", "-C", root, "-c", "."], check=True, capture_output=True)
        subprocess.run(["docker", "import", "-", BASE_IMAGE], input=tar.stdout, check=True,
                       capture_output=True)
    return BASE_IMAGE


@dataclass
class RegistryServer:
    port: int
    root: Path
    process: subprocess.Popen[bytes] | None
    config: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> None:
        log = open(self.root / "registry.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(["docker-registry", "serve", str(self.config)],
                                        stdout=log, stderr=log)
        wait_for(lambda: requests.get(f"{self.url}/v2/", timeout=1).status_code in (200, 401),
                 15, "docker-registry")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
            if self.process.poll() is None:
                self.process.kill()
        self.process = None

    def digest(self, repository: str, tag: str) -> str | None:
        accept = ", ".join([
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.index.v1+json",
        ])
        r = requests.head(f"{self.url}/v2/{repository}/manifests/{tag}",
                          headers={"Accept": accept}, timeout=5)
        return r.headers.get("Docker-Content-Digest") if r.status_code == 200 else None

    def tags(self, repository: str) -> list[str]:
        r = requests.get(f"{self.url}/v2/{repository}/tags/list", timeout=5)
        if r.status_code == 404:
            return []
        return list(r.json().get("tags") or [])


def start_registry(root: Path, htpasswd: Path | None = None, port: int | None = None) -> RegistryServer:
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    auth = ""
    if htpasswd:
        auth = f"auth:\n  htpasswd:\n    realm: buildq-test\n    path: {htpasswd}\n"
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
        + auth
    )
    server = RegistryServer(port, root, None, config)
    server.start()
    return server


@contextlib.contextmanager
def running(server: RedisServer | RegistryServer) -> Iterator[None]:
    try:
        yield
    finally:
        server.stop()


def demo_up() -> str:
    """Bring up the engine, the base image and a long-lived local registry; print its host."""
    ensure_docker_engine()
    ensure_base_image()
    home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    root = home / "buildq" / "demo-registry"
    port_file = root / "port"
    if port_file.exists():
        host = f"127.0.0.1:{port_file.read_text().strip()}"
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"http://{host}/v2/", timeout=1).status_code == 200:
                return host
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    server = RegistryServer(port, root, None, root / "config.yml")
    server.config.write_text(
        "version: 0.1\nlog:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n")
    log = open(root / "registry.log", "ab")  # noqa: SIM115
    subprocess.Popen(["docker-registry", "serve", str(server.config)], stdout=log, stderr=log,
                     start_new_session=True)
    wait_for(lambda: requests.get(f"{server.url}/v2/", timeout=1).status_code == 200, 15,
             "docker-registry")
    port_file.write_text(str(port))
    return server.host


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["demo-up"]:
        print(demo_up())
    else:
        sys.exit("usage: python -m tests.services demo-up")


def make_htpasswd(path: Path, users: dict[str, str]) -> Path:
    """Write a bcrypt htpasswd file (the only hash docker-registry accepts)."""
    lines = [
        subprocess.run(["htpasswd", "-Bbn", user, password], check=True, capture_output=True,
                       text=True).stdout.strip()
        for user, password in users.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def start_htpasswd_registry(root: Path, users: dict[str, str]) -> RegistryServer:
    """A registry that answers 401 with a Basic challenge until given a listed user."""
    root.mkdir(parents=True, exist_ok=True)
    return start_registry(root, htpasswd=make_htpasswd(root / "htpasswd", users))


def start_token_registry(root: Path, realm: str, service: str, issuer: str,
                         rootcertbundle: Path, port: int | None = None) -> RegistryServer:
    """A registry with ``auth: token``: it trusts JWTs signed by a cert in ``rootcertbundle``."""
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
        "auth:\n  token:\n"
        f"    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n"
        f"    rootcertbundle: {rootcertbundle}\n"
    )
    server = RegistryServer(port, root, None, config)
    server.start()
    return server
