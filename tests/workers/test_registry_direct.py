"""The tag check's HEAD straight through urllib3 (workers/registries/direct.py): it answers
only what requests would have answered the same way, and leaves the rest to requests."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import urllib3

from config.errors import TransientRegistryError
from config.references import parse_image_ref
from config.settings import Settings
from tests import services
from tests.faults.proxy import FaultProxy
from tests.workers.test_registries import push_base
from workers.registries import base as registry_base
from workers.registries import direct
from workers.registries.base import MANIFEST_ACCEPT
from workers.registries.v2 import V2Registry

_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY",
                    "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


@pytest.fixture(autouse=True)
def _no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_a_tag_and_a_missing_tag_are_answered_as_the_registry_says(
        registry: services.RegistryServer, base_image: str) -> None:
    pushed = push_base(registry.host, "direct/app", "v1", base_image)
    headers = {"Accept": MANIFEST_ACCEPT}
    found = direct.head(f"http://{registry.host}/v2/direct/app/manifests/v1", headers, (5, 5))
    assert found is not None and found.status_code == 200
    assert found.headers["docker-content-digest"] == pushed == registry.digest("direct/app", "v1")
    missing = direct.head(f"http://{registry.host}/v2/direct/app/manifests/nope", headers, (5, 5))
    assert missing is not None and missing.status_code == 404
    # The same answers through the registry interface, whichever way they travel.
    image = parse_image_ref(f"{registry.host}/direct/app")
    settings = Settings.from_env({})
    assert V2Registry(registry.host, settings).manifest_digest(image, "v1") == pushed
    assert V2Registry(registry.host, settings).manifest_digest(image, "nope") is None


def test_a_proxied_host_is_left_to_requests(
        registry: services.RegistryServer, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://{registry.host}/v2/"
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    assert direct.head(url, {}, (5, 5)) is None
    # Unless the host is exempt, as requests would decide.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    answered = direct.head(url, {}, (5, 5))
    assert answered is not None and answered.status_code == 200


def test_the_proxy_decision_is_per_scheme(
        registry: services.RegistryServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only HTTPS goes through a proxy: the same host over HTTPS is left to requests, over
    # plain HTTP it is answered here, in either order.
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    assert direct.head(f"https://{registry.host}/v2/", {}, (5, 5)) is None
    answered = direct.head(f"http://{registry.host}/v2/", {}, (5, 5))
    assert answered is not None and answered.status_code == 200
    assert direct.head(f"https://{registry.host}/v2/", {}, (5, 5)) is None


def test_an_auth_challenge_is_left_to_requests(tmp_path: Path) -> None:
    server = services.start_htpasswd_registry(tmp_path / "registry", {"u": "p"})
    try:
        assert direct.head(f"http://{server.host}/v2/", {}, (5, 5)) is None
    finally:
        server.stop()


class _Head(BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Docker-Content-Digest", "sha256:" + "0" * 64)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def https_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    cert, key = services.self_signed_cert(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Head)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/v2/x/manifests/t", cert
    finally:
        server.shutdown()


def test_tls_trust_is_requests_own(https_server: tuple[str, Path],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    url, cert = https_server
    # Not trusted by certifi's bundle: no answer here, and requests refuses it too.
    assert direct.head(url, {}, (5, 5)) is None
    with pytest.raises(requests.exceptions.SSLError):
        requests.head(url, timeout=5)
    # Trusted through REQUESTS_CA_BUNDLE, as requests would trust it.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    answered = direct.head(url, {}, (5, 5))
    assert answered is not None and answered.status_code == 200
    assert answered.headers["Docker-Content-Digest"] == "sha256:" + "0" * 64


def test_a_hung_registry_times_out_once(registry: services.RegistryServer,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    host, port = registry.host.rsplit(":", 1)
    proxy = FaultProxy(host, int(port))
    try:
        proxy.stall()
        started = time.monotonic()
        with pytest.raises(urllib3.exceptions.TimeoutError):
            direct.head(f"http://127.0.0.1:{proxy.port}/v2/", {}, (2, 0.5))
        assert time.monotonic() - started < 2
        # Through the registry interface: one wait (not a second one through requests),
        # then a transient error that names the registry.
        monkeypatch.setattr(registry_base, "REQUEST_TIMEOUT", (2.0, 0.8))
        stalled = V2Registry(f"127.0.0.1:{proxy.port}", Settings.from_env({}))
        started = time.monotonic()
        with pytest.raises(TransientRegistryError, match=f"127.0.0.1:{proxy.port}.*timed out"):
            stalled.manifest_digest(parse_image_ref(f"127.0.0.1:{proxy.port}/x/y"), "t")
        assert time.monotonic() - started < 1.5  # a second wait would make it 1.6 s
    finally:
        proxy.up()
        proxy.close()


def test_a_forked_child_opens_its_own_connections(registry: services.RegistryServer) -> None:
    import os

    url = f"http://{registry.host}/v2/"
    assert direct.head(url, {}, (5, 5)) is not None
    parent_pools = dict(direct._pools)
    assert parent_pools
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child reports through the pipe)
        ok = not direct._pools and direct.head(url, {}, (5, 5)) is not None
        ok = ok and all(p is not q for p in direct._pools.values() for q in parent_pools.values())
        os.write(writer, b"1" if ok else b"0")
        os._exit(0)
    os.close(writer)
    assert os.read(reader, 1) == b"1"
    os.waitpid(child, 0)
    assert direct._pools == parent_pools
