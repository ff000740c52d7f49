"""A real control plane on loopback: etcd, kube-apiserver (RBAC), kube-controller-manager,
and one node: the test kubelet (``tests.kube.kubelet``) running pods on the Docker Engine.

Binaries come from ``tests.kube.build`` (built once per version). Everything listens on
127.0.0.1 at free ports; state lives in one directory.

    python -m tests.kube.cluster up [DIR]     # prints the admin kubeconfig's path last
    python -m tests.kube.cluster smoke DIR    # Job -> pod, Background delete, server validation
    python -m tests.kube.cluster down DIR

``python -m tests.services kube-up|kube-down`` and the ``kube`` fixture start it the same way.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.kube import build, kubelet

#: The one node's name (and its ``kubernetes.io/hostname``).
NODE_NAME = "buildq-node"
REPO = Path(__file__).resolve().parents[2]

#: The Service range; its first address is the `kubernetes` Service's. Never contacted.
SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"
ISSUER = "https://kubernetes.default.svc.cluster.local"
#: The issue's three, plus what a Job's pod needs to be admitted and to mount its token:
#: the `default` ServiceAccount (serviceaccount), the `kube-root-ca.crt` ConfigMap
#: (root-ca-cert-publisher), and namespace deletion (namespace).
CONTROLLERS = ("job-controller", "garbage-collector-controller", "ttl-after-finished-controller",
               "serviceaccount-controller", "root-ca-certificate-publisher-controller",
               "namespace-controller")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- PKI ---------------------------------------------------------------------------------

def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _cert(subject: x509.Name, key: rsa.RSAPrivateKey, issuer: x509.Name, signer: rsa.RSAPrivateKey, *,
          ca: bool = False, server_names: tuple[str, ...] = (), server_ips: tuple[str, ...] = (),
          client: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    else:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [ExtendedKeyUsageOID.SERVER_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in server_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _name(common: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


@dataclass
class Pki:
    directory: Path

    def path(self, name: str) -> Path:
        return self.directory / name

    def write(self) -> None:
        """CA, API serving cert, admin and controller-manager client certs, SA signing key,
        the kubelet's serving cert and the API server's client cert for the kubelet API."""
        self.directory.mkdir(parents=True, exist_ok=True)
        ca_key = _key()
        ca_name = _name("buildq-test-ca")
        ca = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
        self._save("ca", ca, ca_key)
        server_key = _key()
        self._save("apiserver", _cert(
            _name("kube-apiserver"), server_key, ca_name, ca_key,
            server_names=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                          "kubernetes.default.svc.cluster.local"),
            server_ips=("127.0.0.1", SERVICE_IP)), server_key)
        kubelet_key = _key()
        self._save("kubelet", _cert(_name(f"system:node:{NODE_NAME}", "system:nodes"), kubelet_key, ca_name,
                                    ca_key, server_names=("localhost", NODE_NAME),
                                    server_ips=(kubelet.NODE_IP,)), kubelet_key)
        for name, common, org in (("admin", "kubernetes-admin", "system:masters"),
                                  ("controller-manager", "system:kube-controller-manager", None),
                                  ("apiserver-kubelet-client", "kube-apiserver-kubelet-client", None)):
            key = _key()
            self._save(name, _cert(_name(common, org), key, ca_name, ca_key, client=True), key)
        # The front proxy's own CA (the aggregation layer's request-header authentication).
        proxy_ca_key = _key()
        proxy_ca_name = _name("buildq-test-front-proxy-ca")
        self._save("front-proxy-ca", _cert(proxy_ca_name, proxy_ca_key, proxy_ca_name, proxy_ca_key, ca=True),
                   proxy_ca_key)
        proxy_key = _key()
        self._save("front-proxy-client", _cert(_name("front-proxy-client"), proxy_key, proxy_ca_name,
                                               proxy_ca_key, client=True), proxy_key)
        sa_key = _key()
        self.path("sa.key").write_bytes(_pem_key(sa_key))
        self.path("sa.pub").write_bytes(sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        for file in self.directory.iterdir():
            if file.suffix == ".key":
                file.chmod(0o600)

    def _save(self, name: str, cert: x509.Certificate, key: rsa.RSAPrivateKey) -> None:
        self.path(f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.path(f"{name}.key").write_bytes(_pem_key(key))


def write_kubeconfig(path: Path, server: str, pki: Pki, user: str) -> Path:
    """A kubeconfig (JSON is YAML) with everything inline, for the client cert ``user``."""
    def data(name: str) -> str:
        return base64.b64encode(pki.path(name).read_bytes()).decode()

    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "buildq-test",
        "clusters": [{"name": "buildq-test", "cluster": {
            "server": server, "certificate-authority-data": data("ca.crt")}}],
        "users": [{"name": user, "user": {
            "client-certificate-data": data(f"{user}.crt"), "client-key-data": data(f"{user}.key")}}],
        "contexts": [{"name": "buildq-test", "context": {"cluster": "buildq-test", "user": user}}],
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)
    return path


# --- processes ---------------------------------------------------------------------------

def wait_for(check: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.2)
    tail = ""
    if log and log.exists():
        tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    raise RuntimeError(f"{what} did not come up within {timeout:.0f}s{tail}")


@dataclass
class ControlPlane:
    directory: Path
    etcd_port: int = 0
    api_port: int = 0
    kubelet_port: int = 0
    pids: dict[str, int] = field(default_factory=dict)
    #: Each process's command line, so one can be restarted as it was started.
    commands: dict[str, list[str]] = field(default_factory=dict)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def kubeconfig(self) -> Path:
        return self.directory / "admin.kubeconfig"

    @property
    def state_file(self) -> Path:
        return self.directory / "cluster.json"

    def api_client(self) -> Any:
        """A ``kubernetes`` ApiClient with the admin credentials (close it when done)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def create_namespace(self, prefix: str = "t") -> str:
        """A new namespace whose ``default`` ServiceAccount exists (pods need it to be admitted)."""
        name = f"{prefix}-{os.urandom(4).hex()}"
        created = self.kubectl("create", "namespace", name)
        if created.returncode:
            raise RuntimeError(f"kubectl create namespace {name}: {created.stderr.strip()}")
        wait_for(lambda: self.kubectl("get", "serviceaccount", "default", "-n", name).returncode == 0,
                 60, f"the default ServiceAccount of namespace {name}")
        return name

    def token_kubeconfig(self, path: Path, namespace: str, account: str, seconds: int = 3600) -> Path:
        """A kubeconfig holding only a token of ServiceAccount ``account`` (TokenRequest API):
        what a process running as that account in ``namespace`` may do, RBAC decides."""
        from kubernetes import client

        api = self.api_client()
        try:
            core: Any = client.CoreV1Api(api)  # dicts in, raw JSON out
            answer = core.create_namespaced_service_account_token(
                account, namespace, {"spec": {"expirationSeconds": seconds}}, _preload_content=False)
        finally:
            api.close()
        ca = base64.b64encode((self.directory / "pki" / "ca.crt").read_bytes()).decode()
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": account,
            "clusters": [{"name": "buildq-test", "cluster": {"server": self.server,
                                                             "certificate-authority-data": ca}}],
            "users": [{"name": account, "user": {"token": json.loads(answer.data)["status"]["token"]}}],
            "contexts": [{"name": account, "context": {"cluster": "buildq-test", "user": account,
                                                       "namespace": namespace}}],
        }
        path.write_text(json.dumps(config, indent=2) + "\n")
        path.chmod(0o600)
        return path

    def kubectl(self, *args: str, timeout: float = 30, stdin: str | None = None
                ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(build.bin_dir() / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
                              input=stdin, capture_output=True, text=True, timeout=timeout)

    @property
    def kubelet_directory(self) -> Path:
        return self.directory / "kubelet"

    def _start(self, name: str, args: list[str]) -> Path:
        log = self.directory / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=REPO)
        self.pids[name] = proc.pid
        self.commands[name] = args
        self._save_state()
        return log

    def _save_state(self) -> None:
        self.state_file.write_text(json.dumps(
            {"etcd_port": self.etcd_port, "api_port": self.api_port, "kubelet_port": self.kubelet_port,
             "pids": self.pids, "commands": self.commands}) + "\n")

    def restart(self, name: str) -> None:
        """Stop one process and start it again as it was started (an API server restarted in
        the middle of a build, a kubelet restarted); back once it answers again."""
        self._stop(name)
        log = self._start(name, self.commands[name])
        if name == "kube-apiserver":
            wait_for(lambda: self.kubectl("get", "--raw", "/readyz", timeout=10).stdout.strip() == "ok",
                     180, "kube-apiserver /readyz", log)
        elif name == "etcd":
            wait_for(lambda: _http_ok(f"http://127.0.0.1:{self.etcd_port}/health"), 60, "etcd", log)
        elif name == "kubelet":
            def accepts() -> bool:
                socket.create_connection(("127.0.0.1", self.kubelet_port), 2).close()
                return True

            wait_for(accepts, 60, "the kubelet API", log)

    def _stop(self, name: str) -> None:
        pid = self.pids.pop(name, None)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                os.kill(pid, 0)  # raises once it is gone (or reaped)
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)

    @classmethod
    def load(cls, directory: Path) -> ControlPlane:
        """The cluster ``up`` left running in ``directory``."""
        plane = cls(directory)
        state = json.loads(plane.state_file.read_text())
        plane.etcd_port, plane.api_port = state["etcd_port"], state["api_port"]
        plane.kubelet_port, plane.pids = state.get("kubelet_port", 0), state["pids"]
        plane.commands = state.get("commands", {})
        return plane

    def up(self, say: Callable[[str], None] = print) -> Path:
        bins = build.build(say=say)
        self.directory.mkdir(parents=True, exist_ok=True)
        # A fresh cluster every time: the PKI is new, so an older etcd's tokens and pods are stale.
        shutil.rmtree(self.directory / "etcd", ignore_errors=True)
        pki = Pki(self.directory / "pki")
        pki.write()
        ports = [free_port() for _ in range(5)]
        self.etcd_port, peer_port, self.api_port, kcm_port, self.kubelet_port = ports

        etcd_url, peer_url = f"http://127.0.0.1:{self.etcd_port}", f"http://127.0.0.1:{peer_port}"
        log = self._start("etcd", [
            str(bins["etcd"]), "--name=test", f"--data-dir={self.directory / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=test={peer_url}", "--unsafe-no-fsync", "--log-level=warn"])
        say(f"kube up: etcd on {etcd_url}")
        wait_for(lambda: _http_ok(f"{etcd_url}/health"), 60, "etcd", log)

        log = self._start("kube-apiserver", [
            str(bins["kube-apiserver"]), "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.api_port}", f"--etcd-servers={etcd_url}",
            f"--tls-cert-file={pki.path('apiserver.crt')}",
            f"--tls-private-key-file={pki.path('apiserver.key')}",
            f"--client-ca-file={pki.path('ca.crt')}", "--authorization-mode=RBAC",
            f"--service-account-issuer={ISSUER}", f"--service-account-key-file={pki.path('sa.pub')}",
            f"--service-account-signing-key-file={pki.path('sa.key')}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--requestheader-client-ca-file={pki.path('front-proxy-ca.crt')}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki.path('front-proxy-client.crt')}",
            f"--proxy-client-key-file={pki.path('front-proxy-client.key')}",
            # The `kubernetes` Endpoints may not hold a loopback address; nothing reads them here.
            "--endpoint-reconciler-type=none", "--profiling=false", "--v=1",
            # Logs and the like go API server -> kubelet API, over TLS both ways, as in a cluster.
            f"--kubelet-client-certificate={pki.path('apiserver-kubelet-client.crt')}",
            f"--kubelet-client-key={pki.path('apiserver-kubelet-client.key')}",
            f"--kubelet-certificate-authority={pki.path('ca.crt')}",
            "--kubelet-preferred-address-types=InternalIP"])
        write_kubeconfig(self.kubeconfig, self.server, pki, "admin")
        say(f"kube up: kube-apiserver on {self.server}")
        wait_for(lambda: self.kubectl("get", "--raw", "/readyz", timeout=10).stdout.strip() == "ok",
                 180, "kube-apiserver /readyz", log)
        say("kube up: /readyz ok")

        kcm_config = write_kubeconfig(self.directory / "controller-manager.kubeconfig", self.server, pki,
                                      "controller-manager")
        log = self._start("kube-controller-manager", [
            str(bins["kube-controller-manager"]), f"--kubeconfig={kcm_config}",
            f"--authentication-kubeconfig={kcm_config}", f"--authorization-kubeconfig={kcm_config}",
            "--bind-address=127.0.0.1", f"--secure-port={kcm_port}", "--leader-elect=false",
            f"--controllers={','.join(CONTROLLERS)}", "--use-service-account-credentials=true",
            f"--root-ca-file={pki.path('ca.crt')}", f"--service-cluster-ip-range={SERVICE_CIDR}", "--v=1"])
        say(f"kube up: kube-controller-manager (controllers {','.join(CONTROLLERS)})")
        wait_for(lambda: self.kubectl("get", "serviceaccount", "default", "-n", "default").returncode == 0,
                 120, "kube-controller-manager (the default ServiceAccount)", log)
        say("kube up: controller-manager serving (default ServiceAccount created)")

        log = self._start("kubelet", [
            sys.executable, "-m", "tests.kube.kubelet", f"--node-name={NODE_NAME}",
            f"--directory={self.kubelet_directory}", f"--kubeconfig={self.kubeconfig}",
            f"--pki={pki.directory}", f"--port={self.kubelet_port}", f"--api-port={self.api_port}",
            f"--kubernetes-version={build.read_pins().kubernetes}"])
        say(f"kube up: test kubelet (node {NODE_NAME}, kubelet API on {kubelet.NODE_IP}:{self.kubelet_port})")
        ready = "jsonpath={.status.conditions[?(@.type=='Ready')].status}"
        wait_for(lambda: "True" in self.kubectl("get", "node", NODE_NAME, "-o", ready).stdout,
                 60, f"node {NODE_NAME} Ready", log)
        say(f"kube up: node {NODE_NAME} Ready")
        return self.kubeconfig

    def add_node(self, name: str, arch: str) -> None:
        """Start another test kubelet, registering node ``name`` that advertises ``arch``
        (``kubernetes.io/arch``); back once it is Ready.

        It is this host all the same: its containers run on the same Engine and CPU, so a
        node "of" another architecture runs that architecture's binaries only through the
        host's QEMU binfmt handlers (what kaniko's ``RUN`` steps of a foreign base do).
        """
        port = free_port()
        log = self._start(f"kubelet-{name}", [
            sys.executable, "-m", "tests.kube.kubelet", f"--node-name={name}", f"--arch={arch}",
            f"--directory={self.directory / f'kubelet-{name}'}", f"--kubeconfig={self.kubeconfig}",
            f"--pki={self.directory / 'pki'}", f"--port={port}", f"--api-port={self.api_port}",
            f"--kubernetes-version={build.read_pins().kubernetes}"])
        ready = "jsonpath={.status.conditions[?(@.type=='Ready')].status}"
        wait_for(lambda: "True" in self.kubectl("get", "node", name, "-o", ready).stdout,
                 60, f"node {name} Ready", log)

    def remove_node(self, name: str) -> None:
        """Stop the kubelet ``add_node`` started, remove its containers and its Node."""
        self._stop(f"kubelet-{name}")
        self.commands.pop(f"kubelet-{name}", None)
        self._save_state()  # so that `down` never signals a pid this one no longer owns
        directory = self.directory / f"kubelet-{name}"
        if directory.exists():
            kubelet.remove_containers(directory.resolve())
        self.kubectl("delete", "node", name, "--wait=false")

    def down(self) -> None:
        if self.state_file.exists():
            self.pids = json.loads(self.state_file.read_text())["pids"]
        added = [name for name in self.pids if name.startswith("kubelet-")]
        for name in (*added, "kubelet", "kube-controller-manager", "kube-apiserver", "etcd"):
            self._stop(name)
        for directory in self.directory.glob("kubelet*"):
            if directory.is_dir():
                kubelet.remove_containers(directory.resolve())
        self.state_file.unlink(missing_ok=True)


SMOKE_JOB = {
    "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "buildq-smoke"},
    "spec": {"backoffLimit": 0, "ttlSecondsAfterFinished": 600, "template": {"spec": {
        "restartPolicy": "Never", "containers": [{"name": "c", "image": "local/busybox:base"}]}}},
}


def smoke(plane: ControlPlane, say: Callable[[str], None] = print) -> None:
    """The controllers answer: a Job gets a pod, a Background delete removes both, and an
    invalid Job is refused by the server's own validation."""
    def kubectl(*args: str, stdin: str | None = None) -> str:
        proc = plane.kubectl(*args, stdin=stdin)
        if proc.returncode:
            raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def pods() -> list[str]:
        return kubectl("get", "pods", "-l", "job-name=buildq-smoke", "-o", "name").split()

    kubectl("create", "-f", "-", stdin=json.dumps(SMOKE_JOB))
    wait_for(lambda: len(pods()) == 1, 60, "the Job controller's pod")
    say("kube smoke: Job controller created the pod")
    kubectl("delete", "job", "buildq-smoke", "--cascade=background")
    wait_for(lambda: not pods(), 60, "the garbage collector removing the pod")
    say("kube smoke: garbage collector removed the pod after a Background delete")
    bad = json.loads(json.dumps(SMOKE_JOB))
    bad["spec"]["backoffLimit"] = -1
    try:
        kubectl("create", "--dry-run=server", "-f", "-", stdin=json.dumps(bad))
    except RuntimeError as exc:
        if "backoffLimit" not in str(exc):
            raise
        say("kube smoke: server-side validation refused backoffLimit -1")
    else:
        raise RuntimeError("the API server accepted a Job with backoffLimit -1")


def _http_ok(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as response:
        return bool(response.status == 200)


def main(argv: list[str]) -> int:
    if argv[:1] == ["up"] and len(argv) <= 2:
        directory = Path(argv[1]) if len(argv) == 2 else Path(tempfile.mkdtemp(prefix="buildq-kube-"))
        plane = ControlPlane(directory.resolve())
        try:
            print(plane.up(say=lambda line: print(line, flush=True)))
        except Exception:
            plane.down()
            raise
        return 0
    if argv[:1] == ["smoke"] and len(argv) == 2:
        plane = ControlPlane(Path(argv[1]).resolve())
        smoke(plane, say=lambda line: print(line, flush=True))
        return 0
    if argv[:1] == ["down"] and len(argv) == 2:
        ControlPlane(Path(argv[1]).resolve()).down()
        return 0
    print("usage: python -m tests.kube.cluster up [DIR] | smoke DIR | down DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
