"""Image indexes pushed to a real registry: OCI first, a Docker manifest list where refused."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from config.errors import RegistryError
from config.names import platform_fields
from config.references import parse_image_ref
from config.settings import Settings
from tests import services
from workers.registries.base import INDEX_MEDIA_TYPES, registry_for

OCI_INDEX, DOCKER_LIST = INDEX_MEDIA_TYPES


class RefusingFront:
    """Forwards every request to a real registry, except a manifest PUT of a refused media
    type, which it answers 400 MANIFEST_INVALID as registries without OCI indexes did."""

    def __init__(self, upstream: str, refused: set[str]) -> None:
        front = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if (self.command == "PUT" and "/manifests/" in self.path
                        and self.headers.get("Content-Type") in front.refused):
                    payload = b'{"errors":[{"code":"MANIFEST_INVALID","message":"unsupported"}]}'
                    self.send_response(400)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                answer = requests.request(self.command, upstream + self.path, headers=headers,
                                          data=body, timeout=30, allow_redirects=False)
                self.send_response(answer.status_code)
                for key, value in answer.headers.items():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(answer.content)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _any

            def log_message(self, *args: object) -> None:
                pass

        self.refused = refused
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def platform_images(docker_engine: str, registry: services.RegistryServer) -> dict[str, str]:
    """platform → manifest digest of a busybox image in ``idx/busybox`` of the registry."""
    services.push_multiplatform_base(registry.host, "idx/busybox")
    found = {}
    for platform, tag in (("linux/amd64", "amd64"), ("linux/arm64", "arm64")):
        digest = registry.digest("idx/busybox", tag)
        assert digest
        found[platform] = digest
    return found


@pytest.fixture
def front(registry: services.RegistryServer) -> Iterator[RefusingFront]:
    server = RefusingFront(registry.url, set())
    yield server
    server.stop()


def _served(registry: services.RegistryServer, tag: str) -> tuple[str, dict[str, Any]]:
    answer = requests.get(f"{registry.url}/v2/idx/busybox/manifests/{tag}",
                          headers={"Accept": f"{OCI_INDEX}, {DOCKER_LIST}"}, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.headers["Content-Type"], answer.json()


def _push(host: str, tag: str, images: dict[str, str]) -> tuple[str, str]:
    ref = parse_image_ref(f"{host}/idx/busybox")
    return registry_for(ref, Settings.from_env({})).push_index(
        ref, tag, [(digest, platform_fields(p)) for p, digest in images.items()])


def test_an_oci_index_names_each_platforms_manifest(
        registry: services.RegistryServer, platform_images: dict[str, str]) -> None:
    digest, media_type = _push(registry.host, "index-oci", platform_images)
    assert media_type == OCI_INDEX
    served_type, index = _served(registry, "index-oci")
    assert served_type == OCI_INDEX
    assert registry.digest("idx/busybox", "index-oci") == digest
    assert [(m["digest"], m["platform"]) for m in index["manifests"]] == [
        (platform_images["linux/amd64"], {"architecture": "amd64", "os": "linux"}),
        (platform_images["linux/arm64"], {"architecture": "arm64", "os": "linux"})]


def test_a_registry_refusing_oci_indexes_gets_a_docker_manifest_list(
        registry: services.RegistryServer, platform_images: dict[str, str],
        front: RefusingFront) -> None:
    front.refused = {OCI_INDEX}
    digest, media_type = _push(front.host, "index-docker", platform_images)
    assert media_type == DOCKER_LIST
    served_type, index = _served(registry, "index-docker")
    assert served_type == DOCKER_LIST
    assert registry.digest("idx/busybox", "index-docker") == digest
    assert len(index["manifests"]) == 2


def test_a_registry_refusing_every_index_form_is_a_clear_error(
        registry: services.RegistryServer, platform_images: dict[str, str],
        front: RefusingFront) -> None:
    front.refused = {OCI_INDEX, DOCKER_LIST}
    with pytest.raises(RegistryError) as info:
        _push(front.host, "index-none", platform_images)
    assert "refused the image index in every form" in info.value.message
    assert OCI_INDEX in info.value.message and DOCKER_LIST in info.value.message
    assert "supports multi-platform images" in str(info.value.hint)
    assert registry.digest("idx/busybox", "index-none") is None
