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


# --- storage stand-ins: moto server (S3), gcp-storage-emulator (GCS), Azurite (Blob) -------

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Where scripts/bootstrap installs Azurite (gitignored with the venv).
AZURITE_PREFIX = REPO_ROOT / ".venv" / "azurite"
#: Azurite's well-known development account (public, documented by Microsoft).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
               "KBHBeksoGMGw==")


@dataclass
class StandIn:
    """A storage emulator process on 127.0.0.1."""

    name: str
    port: int
    args: list[str]
    root: Path
    scheme: str = "http"
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self, ready: object, timeout: float = 30) -> None:
        log = open(self.root / f"{self.name}.log", "ab")  # noqa: SIM115 - lives with the process
        env = {**os.environ, **(self.env or {})}
        self.process = subprocess.Popen(self.args, stdout=log, stderr=log, env=env,
                                        start_new_session=True)
        try:
            wait_for(ready, timeout, self.name)
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
            if self.process.poll() is None:
                self.process.kill()
        self.process = None

    def restart(self, ready: object) -> None:
        self.stop()
        self.start(ready)


def _answers(url: str, **kwargs: object) -> bool:
    try:
        requests.get(url, timeout=1, **kwargs)  # type: ignore[arg-type]
        return True
    except requests.RequestException:
        return False


def start_moto(root: Path, port: int | None = None) -> StandIn:
    """moto's S3 (and ECR) API in a server process; raises ImportError when not installed."""
    import importlib.util
    import sys

    if importlib.util.find_spec("moto.server") is None or importlib.util.find_spec("flask") is None:
        raise ImportError("moto[server] is not installed: run scripts/bootstrap")
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    server = StandIn("moto", port, [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                     root)
    server.start(lambda: requests.get(f"{server.endpoint}/moto-api/", timeout=1).ok)
    return server


def moto_ready(server: StandIn) -> object:
    return lambda: requests.get(f"{server.endpoint}/moto-api/", timeout=1).ok


def start_gcs_emulator(root: Path, port: int | None = None) -> StandIn:
    """gcp-storage-emulator, in memory; raises ImportError when not installed."""
    import importlib.util
    import sys

    if importlib.util.find_spec("gcp_storage_emulator") is None:
        raise ImportError("gcp-storage-emulator is not installed: run scripts/bootstrap")
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    server = StandIn("gcs", port, [sys.executable, "-m", "gcp_storage_emulator", "start", "--host",
                                   "127.0.0.1", "--port", str(port), "--in-memory"], root)
    server.start(gcs_ready(server))
    return server


def gcs_ready(server: StandIn) -> object:
    return lambda: _answers(f"{server.endpoint}/storage/v1/b")


def azurite_binary(install: bool = True) -> Path:
    """azurite-blob, installed by scripts/bootstrap (or here, with npm, if it was not)."""
    binary = AZURITE_PREFIX / "node_modules" / ".bin" / "azurite-blob"
    if not binary.exists() and install and shutil.which("npm"):
        subprocess.run(["npm", "install", "--prefix", str(AZURITE_PREFIX), "--no-audit", "--no-fund",
                        "azurite"], check=False, capture_output=True, timeout=600)
    if not binary.exists():
        raise FileNotFoundError(f"Azurite is not installed at {binary} and npm could not install it: "
                                "run scripts/bootstrap")
    return binary


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (cert.pem, key.pem), trusted by pointing REQUESTS_CA_BUNDLE at it."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    if not cert.exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def start_azurite(root: Path, https: bool = False, port: int | None = None) -> StandIn:
    """Azurite's blob service; with ``https`` it also accepts OAuth bearer tokens (``--oauth basic``)."""
    binary = azurite_binary()
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    args = [str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location",
            str(root / "data"), "--skipApiVersionCheck", "--loose", "--disableTelemetry", "--silent"]
    if https:
        cert, key = self_signed_cert(root)
        args += ["--oauth", "basic", "--cert", str(cert), "--key", str(key)]
    server = StandIn("azurite-https" if https else "azurite", port, args, root,
                     scheme="https" if https else "http")
    server.start(azurite_ready(server), timeout=60)
    return server


def azurite_ready(server: StandIn) -> object:
    verify = str(server.root / "cert.pem") if server.scheme == "https" else True
    return lambda: _answers(f"{server.endpoint}/{AZURITE_ACCOUNT}?comp=list", verify=verify)


# --- a Debian base with python3 for the worker image (operations tests) -------------------

#: Debian bookworm minbase with python3, pip and venv, imported locally (nothing is pulled).
PYTHON_BASE_IMAGE = "local/python3:bookworm"


def ensure_python_base_image(scratch: Path) -> str:
    """Make PYTHON_BASE_IMAGE with mmdebstrap (~1 min, once per engine) unless it exists."""
    import docker

    client = docker.DockerClient(base_url=f"unix://{DOCKER_SOCKET}")
    with contextlib.suppress(docker.errors.ImageNotFound):
        client.images.get(PYTHON_BASE_IMAGE)
        return PYTHON_BASE_IMAGE
    if not shutil.which("mmdebstrap"):
        raise FileNotFoundError("mmdebstrap is not installed: run scripts/bootstrap")
    tar = scratch / "python3-base.tar"
    subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase",
                    "--include=python3-minimal,python3-pip,python3-venv", "bookworm", str(tar)],
                   check=True, capture_output=True, timeout=900)
    subprocess.run(["docker", "import", str(tar), PYTHON_BASE_IMAGE], check=True,
                   capture_output=True, timeout=300)
    tar.unlink()
    return PYTHON_BASE_IMAGE
