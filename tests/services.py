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
from collections.abc import Callable, Iterator
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


#: Debian's static busybox of each foreign platform the tests build (scripts/bootstrap --tests
#: downloads the packages into ~/.cache/buildq/busybox-static).
FOREIGN_BUSYBOX = {"linux/arm64": "arm64", "linux/arm/v7": "armhf"}
#: The tools each tiny base image links to busybox.
BUSYBOX_TOOLS = ("sh", "ls", "cat", "echo", "true", "false", "sleep", "mkdir", "cp", "rm",
                 "touch", "test", "grep", "wc", "env", "id", "printf", "sha256sum", "head",
                 "dd", "chmod", "adduser", "addgroup", "whoami", "uname")


def _busybox_root(root: Path, busybox: Path) -> None:
    """A tiny root filesystem: ``busybox`` and its tools, /tmp and a root user."""
    bindir = root / "bin"
    bindir.mkdir(parents=True)
    shutil.copy2(busybox, bindir / "busybox")
    for tool in BUSYBOX_TOOLS:
        os.symlink("busybox", bindir / tool)
    (root / "tmp").mkdir()
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")


def _foreign_busybox(arch: str, into: Path) -> Path:
    """The static busybox binary of Debian architecture ``arch``, unpacked under ``into``."""
    debs = sorted((_cache_home() / "busybox-static").glob(f"busybox-static_*_{arch}.deb"))
    if not debs:
        raise RuntimeError(f"busybox-static:{arch} is not downloaded: run scripts/bootstrap --tests")
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(into)], check=True)
    return into / "bin" / "busybox"


def push_multiplatform_base(registry_host: str, repository: str = "bases/busybox") -> str:
    """A busybox base for linux/amd64, linux/arm64 and linux/arm/v7 in the registry, each
    under its own tag and all three under one index (``docker manifest``, a Docker manifest
    list), as ``python:3.11-slim`` is multi-platform: that index's reference.

    Each foreign image is built ``FROM scratch`` with ``--platform`` by BuildKit, so its
    config names its platform (``docker import --platform`` on Engine 20.10 records amd64).
    """
    name = f"{registry_host}/{repository}"
    tags = {}
    amd64 = f"{name}:amd64"
    subprocess.run(["docker", "tag", ensure_base_image(), amd64], check=True)
    tags["linux/amd64"] = amd64
    cli = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"
    for platform, arch in FOREIGN_BUSYBOX.items():
        tag = f"{name}:{arch}"
        with tempfile.TemporaryDirectory() as scratch:
            busybox = _foreign_busybox(arch, Path(scratch, "deb"))
            context = Path(scratch, "context")
            _busybox_root(context / "root", busybox)
            (context / "Dockerfile").write_text("FROM scratch\nCOPY root/ /\n")
            done = subprocess.run([cli, "build", "--network", "none", "--platform", platform,
                                   "-t", tag, str(context)], capture_output=True, text=True,
                                  env={**os.environ, "DOCKER_BUILDKIT": "1"}, timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"building the {platform} base failed: {done.stdout}"
                                   f"{done.stderr}")
        tags[platform] = tag
    for tag in tags.values():
        subprocess.run(["docker", "push", tag], check=True, capture_output=True, timeout=300)
    index = f"{name}:multi"
    subprocess.run(["docker", "manifest", "rm", index], capture_output=True)
    subprocess.run(["docker", "manifest", "create", "--insecure", index, *tags.values()],
                   check=True, capture_output=True, timeout=120)
    subprocess.run(["docker", "manifest", "push", "--purge", "--insecure", index], check=True,
                   capture_output=True, timeout=120)
    return index


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


def start_registry(root: Path, htpasswd: Path | None = None, port: int | None = None,
                   delete: bool = True) -> RegistryServer:
    """A CNCF distribution registry; ``delete`` is its storage.delete.enabled."""
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    auth = ""
    if htpasswd:
        auth = f"auth:\n  htpasswd:\n    realm: buildq-test\n    path: {htpasswd}\n"
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        f"  delete:\n    enabled: {str(delete).lower()}\n"
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
        raise ImportError("moto[server] is not installed: run scripts/bootstrap --tests")
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
        raise ImportError("gcp-storage-emulator is not installed: run scripts/bootstrap --tests")
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
                                "run scripts/bootstrap --tests")
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
        raise FileNotFoundError("mmdebstrap is not installed: run scripts/bootstrap --tests")
    tar = scratch / "python3-base.tar"
    subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase",
                    "--include=python3-minimal,python3-pip,python3-venv", "bookworm", str(tar)],
                   check=True, capture_output=True, timeout=900)
    subprocess.run(["docker", "import", str(tar), PYTHON_BASE_IMAGE], check=True,
                   capture_output=True, timeout=300)
    tar.unlink()
    return PYTHON_BASE_IMAGE


# --- cloud registry login stand-ins (registry token auth, Google OAuth) ---------------------


class TokenSigner:
    """Signs registry bearer tokens (RS256 JWTs) that a ``auth: token`` registry trusts.

    The certificate is written to ``bundle`` for the registry's ``rootcertbundle``; each
    token carries it in ``x5c``, which is how docker-registry finds the signing key.
    """

    def __init__(self, directory: Path, issuer: str, service: str) -> None:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.issuer, self.service = issuer, service
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))
        self.bundle = directory / f"{issuer}-root.pem"
        self.bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        import base64

        self._x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]

    def registry_token(self, subject: str, scopes: list[str], allowed: set[str],
                       lifetime: int = 300) -> str:
        """A token granting, per requested scope, only the actions in ``allowed``."""
        import uuid

        import jwt

        access = []
        for scope in scopes:
            for item in scope.split():
                kind, _, rest = item.partition(":")
                name, _, actions = rest.rpartition(":")
                granted = [a for a in actions.split(",") if a in allowed]
                access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service, "iat": now,
                  "nbf": now - 10, "exp": now + lifetime, "jti": uuid.uuid4().hex,
                  "access": access}
        return str(jwt.encode(claims, self.key, algorithm="RS256", headers={"x5c": self._x5c}))


class HTTPStandIn:
    """A small threaded HTTP server on 127.0.0.1 whose ``route`` answers every request."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, headers, payload = outer.route(self.command, self.path,
                                                       dict(self.headers), body)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_HEAD = _any

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def route(self, method: str, path: str, headers: dict[str, str],
              body: bytes) -> tuple[int, dict[str, str], bytes]:
        raise NotImplementedError

    @staticmethod
    def json(status: int, data: object) -> tuple[int, dict[str, str], bytes]:
        import json

        return status, {"Content-Type": "application/json"}, json.dumps(data).encode()

    @staticmethod
    def basic(headers: dict[str, str]) -> tuple[str, str] | None:
        import base64

        header = headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return None
        user, sep, password = base64.b64decode(header[6:]).decode().partition(":")
        return (user, password) if sep else None

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class GoogleStandIn(HTTPStandIn):
    """Google's OAuth token endpoint plus Artifact Registry's registry token service.

    ``POST /token`` (refresh_token grant, as google-auth sends it) issues short-lived access
    tokens; ``GET /v2/token`` (the registry's realm) accepts only Basic
    ``oauth2accesstoken:<an access token it issued that has not expired>``, as Artifact
    Registry does, and grants the actions in ``allowed``.
    """

    def __init__(self, directory: Path, token_prefix: str = "ya29.standin-") -> None:
        super().__init__()
        self.signer = TokenSigner(directory, "gar-standin-issuer", "gar-standin")
        self.refresh_token = f"1//standin-refresh-{os.urandom(8).hex()}"
        self.token_prefix = token_prefix
        self.lifetime = 3600
        self.allowed = {"pull", "push"}
        #: access token → expiry (epoch seconds)
        self.issued: dict[str, float] = {}
        self.refreshes = 0
        self.registry_logins: list[str] = []
        self.service_accounts: dict[str, object] = {}

    @property
    def realm(self) -> str:
        return f"{self.url}/v2/token"

    def service_account_file(self, path: Path, project: str = "my-proj",
                             email: str = "builder@my-proj.iam.gserviceaccount.com") -> Path:
        """A service-account key file whose ``token_uri`` is this endpoint.

        (google-auth pins authorized-user files to Google's real token URI; key files
        keep theirs, so google.auth.default() really signs a JWT and refreshes here.)
        """
        import json

        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.service_accounts[email] = key.public_key()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        path.write_text(json.dumps({
            "type": "service_account", "project_id": project, "private_key_id": "standin-key",
            "private_key": pem, "client_email": email, "client_id": "1234567890",
            "token_uri": f"{self.url}/token"}))
        return path

    def _grant_ok(self, form: dict[str, str]) -> bool:
        if form.get("grant_type") == "refresh_token":
            return form.get("refresh_token") == self.refresh_token
        if form.get("grant_type") == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            import jwt

            try:
                email = jwt.decode(form.get("assertion", ""),
                                   options={"verify_signature": False})["iss"]
                # google-auth addresses the assertion to Google's token URI whatever the
                # file's token_uri says, which is what Google checks too.
                jwt.decode(form["assertion"], self.service_accounts[email],  # type: ignore[arg-type]
                           algorithms=["RS256"], audience="https://oauth2.googleapis.com/token")
            except (jwt.PyJWTError, KeyError):
                return False
            return True
        return False

    def route(self, method: str, path: str, headers: dict[str, str],
              body: bytes) -> tuple[int, dict[str, str], bytes]:
        from urllib.parse import parse_qs, urlsplit

        parts = urlsplit(path)
        if method == "POST" and parts.path == "/token":
            form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
            if not self._grant_ok(form):
                return self.json(400, {"error": "invalid_grant"})
            self.refreshes += 1
            token = f"{self.token_prefix}{os.urandom(12).hex()}"
            self.issued[token] = time.time() + self.lifetime
            return self.json(200, {"access_token": token, "expires_in": self.lifetime,
                                   "token_type": "Bearer"})
        if method == "GET" and parts.path == "/v2/token":
            login = self.basic(headers)
            if login is None or login[0] != "oauth2accesstoken" or \
                    self.issued.get(login[1], 0) <= time.time():
                return self.json(401, {"errors": [{"code": "UNAUTHORIZED"}]})
            self.registry_logins.append(login[1])
            query = parse_qs(parts.query)
            token = self.signer.registry_token("gar-user", query.get("scope", []), self.allowed)
            return self.json(200, {"token": token, "expires_in": 300})
        return self.json(404, {})


def start_gar_registry(root: Path, google: GoogleStandIn) -> RegistryServer:
    """A token-auth registry whose realm is ``google``'s registry token service."""
    return start_token_registry(root, realm=google.realm, service=google.signer.service,
                                issuer=google.signer.issuer, rootcertbundle=google.signer.bundle)


# --- Redis with a password, and with TLS (tests/ops/test_broker_security.py) --------------


@dataclass
class SecureRedisServer(RedisServer):
    """redis-server that requires ``password``; over TLS only when ``ca_cert`` is set."""

    password: str = ""
    ca_cert: Path | None = None

    @property
    def url(self) -> str:
        from urllib.parse import quote

        login = f":{quote(self.password, safe='')}@"
        if self.ca_cert is None:
            return f"redis://{login}127.0.0.1:{self.port}/0"
        return (f"rediss://{login}127.0.0.1:{self.port}/0"
                f"?ssl_ca_certs={self.ca_cert}&ssl_cert_reqs=required")


def start_secure_redis(directory: Path, password: str, tls: bool = False) -> SecureRedisServer:
    """Like production: ``requirepass`` (and the TLS files) in a config file, so the password
    is on no command line; with ``tls`` the only port speaks TLS, with a self-signed cert."""
    port = free_port()
    lines = ["bind 127.0.0.1", 'save ""', "appendonly no", f"dir {directory}",
             f'requirepass "{password}"']
    cert: Path | None = None
    if tls:
        cert, key = self_signed_cert(directory)
        lines += ["port 0", f"tls-port {port}", f"tls-cert-file {cert}", f"tls-key-file {key}",
                  f"tls-ca-cert-file {cert}", "tls-auth-clients no"]
    else:
        lines.append(f"port {port}")
    conf = directory / "redis.conf"
    conf.touch(mode=0o600)
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen(["redis-server", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    server = SecureRedisServer(port, directory, proc, password=password, ca_cert=cert)
    import redis

    wait_for(lambda: redis.Redis.from_url(server.url).ping(), 10, "redis-server")
    return server


# --- a second Docker Engine, BuildKit helpers (issue 13) ----------------------------------


@dataclass
class SecondEngine:
    """A dockerd of its own (data root, exec root, pid file, socket): another build host."""

    root: Path
    process: subprocess.Popen[bytes]
    exec_root: Path

    @property
    def socket(self) -> str:
        return f"unix://{self.root / 'docker.sock'}"

    @property
    def env(self) -> dict[str, str]:
        """What a docker CLI or SDK needs to talk to this engine."""
        return {"DOCKER_HOST": self.socket}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.exec_root, ignore_errors=True)


def start_second_engine(root: Path, buildkit: bool | None = None) -> SecondEngine:
    """Start a second dockerd under ``root``, with the main one's safe network settings.

    ``buildkit=False`` writes ``"features": {"buildkit": false}`` into its daemon.json:
    an engine whose operator turned BuildKit off.
    """
    import json

    root.mkdir(parents=True, exist_ok=True)
    # containerd's socket lives under the exec root; unix socket paths are short.
    exec_root = Path(tempfile.mkdtemp(prefix="bq-engine-", dir="/tmp"))
    config: dict[str, object] = {}
    if buildkit is not None:
        config["features"] = {"buildkit": buildkit}
    (root / "daemon.json").write_text(json.dumps(config))
    log = open(root / "dockerd.log", "ab")  # noqa: SIM115 - lives as long as the daemon
    proc = subprocess.Popen(
        ["dockerd", "--config-file", str(root / "daemon.json"),
         "--host", f"unix://{root / 'docker.sock'}", "--data-root", str(root / "data"),
         "--exec-root", str(exec_root), "--pidfile", str(root / "docker.pid"),
         "--bridge=none", "--iptables=false", "--ip-masq=false"],
        stdout=log, stderr=log, start_new_session=True)
    engine = SecondEngine(root, proc, exec_root)

    def answers() -> bool:
        import docker

        if proc.poll() is not None:
            raise RuntimeError(f"dockerd exited; see {root / 'dockerd.log'}")
        return bool(docker.DockerClient(base_url=engine.socket).ping())

    try:
        wait_for(answers, 60, f"second dockerd (log: {root / 'dockerd.log'})")
    except BaseException:
        engine.stop()
        raise
    return engine


def copy_image(image: str, to_socket: str, from_socket: str = f"unix://{DOCKER_SOCKET}") -> None:
    """``docker save | docker load``: the same image id on another engine (imports differ)."""
    import docker

    source = docker.APIClient(base_url=from_socket)
    target = docker.APIClient(base_url=to_socket)
    try:
        for _ in target.load_image(source.get_image(image, chunk_size=1 << 20)):
            pass
    finally:
        source.close()
        target.close()


def docker_cli_without_buildkit(directory: Path) -> str | None:
    """A search path holding only a docker CLI that has no BuildKit (the static 28.x client
    without buildx), or None if this machine has no such CLI."""
    from workers.builders.buildkit import find_cli

    directory.mkdir(parents=True, exist_ok=True)
    for candidate in os.environ.get("PATH", "").split(os.pathsep):
        cli = Path(candidate or ".", "docker")
        if not (cli.is_file() and os.access(cli, os.X_OK)):
            continue
        link = directory / "docker"
        link.unlink(missing_ok=True)
        link.symlink_to(cli.resolve())
        found, _ = find_cli(str(directory), directory / "no-config")
        if found is None:
            return str(directory)
    return None


#: The buildx release tests build from its Go module when Go is installed.
BUILDX_VERSION = "v0.11.2"


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "buildq"


def _go() -> str | None:
    return shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists()
                                  else None)


def buildx_config_dir() -> Path | None:
    """A DOCKER_CONFIG directory whose cli-plugins holds a buildx plugin, built once from its Go
    module into ~/.cache/buildq (a few minutes the first time), or None without Go."""
    cache = _cache_home() / f"buildx-{BUILDX_VERSION}"
    plugin = cache / "cli-plugins" / "docker-buildx"
    if plugin.exists():
        return cache
    go = _go()
    if go is None:
        return None
    gobin = cache / "bin"
    done = subprocess.run([go, "install", f"github.com/docker/buildx/cmd/buildx@{BUILDX_VERSION}"],
                          env={**os.environ, "GOBIN": str(gobin)}, capture_output=True,
                          timeout=1800)
    if done.returncode != 0:
        return None
    plugin.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(gobin / "buildx"), plugin)
    return cache


#: The BuildKit release whose Dockerfile frontend (Dockerfile syntax 1.6) tests build from
#: its Go module: the oldest release the Go module proxy serves here, and one that runs on
#: Engine 20.10's BuildKit v0.8 (COPY --link, cache, secret and bind mounts, COPY --chmod).
DOCKERFILE_FRONTEND_VERSION = "v0.12.5"
#: The local image it is packed into, once per engine (a tag per version).
DOCKERFILE_FRONTEND_IMAGE = f"local/dockerfile-frontend:{DOCKERFILE_FRONTEND_VERSION}"
#: Why a test that needs it skips on a machine without Go (tests/conftest.py allows it).
NO_FRONTEND = "the Dockerfile frontend cannot be built here (no Go toolchain)"


def dockerfile_frontend_binary() -> Path | None:
    """BuildKit's Dockerfile frontend, a static binary built once from its Go module into
    ~/.cache/buildq (about two minutes the first time), or None without Go."""
    cache = _cache_home() / f"dockerfile-frontend-{DOCKERFILE_FRONTEND_VERSION}"
    binary = cache / "dockerfile-frontend"
    if binary.exists():
        return binary
    go = _go()
    if go is None:
        return None
    cache.mkdir(parents=True, exist_ok=True)
    module = "github.com/moby/buildkit/frontend/dockerfile/cmd/dockerfile-frontend"
    with tempfile.TemporaryDirectory(dir=cache) as gobin:
        # Static: the image it goes into has nothing but the binary.
        done = subprocess.run([go, "install", f"{module}@{DOCKERFILE_FRONTEND_VERSION}"],
                              env={**os.environ, "GOBIN": gobin, "CGO_ENABLED": "0"},
                              capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"go install {module}@{DOCKERFILE_FRONTEND_VERSION} failed: "
                               f"{done.stderr[-2000:]}")
        # Whole or not at all: a concurrent session sees no half-written binary.
        os.replace(Path(gobin) / "dockerfile-frontend", binary)
    return binary


def push_dockerfile_frontend(registry_host: str) -> str | None:
    """The Dockerfile frontend as a gateway frontend image in ``registry_host``, the way
    docker/dockerfile is packed (FROM scratch: the binary as its entrypoint, and the label
    that lets BuildKit start it without a network, which an engine run with --bridge=none
    has not): its reference there, or None without Go. Only the registry has the tag, so
    BuildKit pulls it as it would on a build host."""
    import docker

    binary = dockerfile_frontend_binary()
    if binary is None:
        return None
    client = docker.DockerClient(base_url=f"unix://{DOCKER_SOCKET}")
    try:
        client.images.get(DOCKERFILE_FRONTEND_IMAGE)
    except docker.errors.ImageNotFound:
        with tempfile.TemporaryDirectory() as root:
            Path(root, "bin").mkdir()
            shutil.copy2(binary, Path(root, "bin", "dockerfile-frontend"))
            tar = subprocess.run(["tar", "-C", root, "-c", "."], check=True,
                                 capture_output=True)
        subprocess.run(["docker", "import",
                        "--change", 'ENTRYPOINT ["/bin/dockerfile-frontend"]',
                        "--change", 'LABEL moby.buildkit.frontend.network.none="true"',
                        "-", DOCKERFILE_FRONTEND_IMAGE],
                       input=tar.stdout, check=True, capture_output=True)
    ref = f"{registry_host}/buildq/dockerfile-frontend:{DOCKERFILE_FRONTEND_VERSION}"
    client.api.tag(DOCKERFILE_FRONTEND_IMAGE, ref)
    try:
        for item in client.api.push(ref, stream=True, decode=True):
            if "error" in item:
                raise RuntimeError(f"pushing {ref} failed: {item['error']}")
    finally:
        client.api.remove_image(ref)
    return ref


# --- the test cluster: a real control plane and one node (tests/kube) ---------------------

def kube_directory() -> Path:
    """Where ``kube-up`` keeps a cluster a person started, when no directory is given."""
    home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return home / "buildq" / "kube"


def kube_up(directory: Path, say: Callable[[str], None] = print) -> Path:
    """Start the control plane and its node in ``directory`` (building what is missing);
    the admin kubeconfig's path. A cluster already answering there is kept."""
    from tests.kube.cluster import ControlPlane

    directory = directory.resolve()
    plane = ControlPlane(directory)
    if plane.state_file.exists():
        plane = ControlPlane.load(directory)
        with contextlib.suppress(Exception):
            if plane.kubectl("get", "--raw", "/readyz", timeout=10).stdout.strip() == "ok":
                say(f"kube up: already running in {directory}")
                return plane.kubeconfig
        plane.down()
        plane = ControlPlane(directory)
    ensure_docker_engine()
    ensure_base_image()
    try:
        return plane.up(say=say)
    except BaseException:
        plane.down()
        raise


def kube_down(directory: Path) -> None:
    from tests.kube.cluster import ControlPlane

    directory = directory.resolve()
    plane = ControlPlane.load(directory) if (directory / "cluster.json").exists() else ControlPlane(directory)
    plane.down()


USAGE = "usage: python -m tests.services demo-up | kube-up [DIR] | kube-down [DIR]"


def main(argv: list[str]) -> int:
    import sys

    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "demo-up" and not rest:
        print(demo_up())
        return 0
    if command in ("kube-up", "kube-down") and len(rest) <= 1:
        directory = Path(rest[0]) if rest else kube_directory()
        try:
            if command == "kube-up":
                print(kube_up(directory, say=lambda line: print(line, flush=True)))
            else:
                kube_down(directory)
        except (RuntimeError, OSError) as exc:  # a build or a process that did not come up
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
