"""Registry existence checks and auth against real docker-registry servers.

Three registries: the open session one, one behind htpasswd (Basic), and one with
``auth: token`` whose realm is the small token server below, issuing RS256 JWTs signed
by a self-signed certificate the registry trusts through ``rootcertbundle``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import logging
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import docker
import jwt
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from config.errors import RegistryError, TransientRegistryError
from config.references import parse_image_ref
from config.settings import Settings
from tests import services
from workers.registries import base as registry_base
from workers.registries.base import is_plain_http, parse_challenge, registry_for
from workers.registries.v2 import V2Registry

USER, PASSWORD = "ci-bot", "Corr3ct-Horse-Battery"
SERVICE, ISSUER = "buildq-test-registry", "buildq-test-issuer"


# -- helpers -------------------------------------------------------------------------------


def push_base(host: str, repository: str, tag: str, base_image: str,
              auth: dict[str, str] | None = None) -> str:
    """Push the local base image as ``host/repository:tag``; return the push's digest."""
    client = docker.from_env()
    name = f"{host}/{repository}"
    client.api.tag(base_image, name, tag)
    digest = ""
    for item in client.api.push(name, tag=tag, auth_config=auth, stream=True, decode=True):
        assert "error" not in item, item
        digest = (item.get("aux") or {}).get("Digest", digest)
    client.api.remove_image(f"{name}:{tag}")
    assert digest
    return digest


def write_docker_config(directory: Path, auths: dict[str, dict[str, str]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"auths": auths}))
    return directory


def basic_entry(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture(autouse=True)
def _fresh_token_cache() -> Iterator[None]:
    # Tokens are cached process-wide by design; tests must each start without one.
    registry_base._tokens.clear()
    yield
    registry_base._tokens.clear()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(docker_config_dir=tmp_path / "docker", workdir=tmp_path / "work")


# -- token server --------------------------------------------------------------------------


class TokenServer:
    """The realm of a token-auth registry: Basic credentials in, a signed JWT out."""

    def __init__(self, directory: Path) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "buildq-test-token")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.bundle = directory / "token-root.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.requests: list[dict[str, str]] = []
        self.lifetime = 300
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.handle(self)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        query = parse_qs(urlsplit(handler.path).query)
        header = handler.headers.get("Authorization", "")
        user = None
        if header.startswith("Basic "):
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if (user, password) != (USER, PASSWORD):
                user = None
        self.requests.append({"scope": " ".join(query.get("scope", [])),
                              "service": (query.get("service") or [""])[0],
                              "user": user or ""})
        if user is None:
            handler.send_response(401)
            handler.end_headers()
            return
        access = []
        for scope in query.get("scope", []):
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(datetime.datetime.now(datetime.UTC).timestamp())
        claims = {"iss": ISSUER, "sub": user, "aud": SERVICE, "iat": now, "nbf": now - 10,
                  "exp": now + self.lifetime, "jti": uuid.uuid4().hex, "access": access}
        chain = [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]
        token = jwt.encode(claims, self.key, algorithm="RS256", headers={"x5c": chain})
        body = json.dumps({"token": token, "expires_in": self.lifetime}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class StatusServer:
    """Answers every request with one fixed status: a registry having a bad day."""

    def __init__(self, status: int) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.RegistryServer]:
    server = services.start_htpasswd_registry(tmp_path_factory.mktemp("basic-registry"),
                                              {USER: PASSWORD})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    server = TokenServer(tmp_path_factory.mktemp("token"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory, token_server: TokenServer
) -> Iterator[services.RegistryServer]:
    server = services.start_token_registry(
        tmp_path_factory.mktemp("token-registry"), realm=token_server.realm, service=SERVICE,
        issuer=ISSUER, rootcertbundle=token_server.bundle,
    )
    yield server
    server.stop()


# -- the open registry -----------------------------------------------------------------------


def test_manifest_digest_is_the_registrys_digest_after_a_real_push(
    registry: services.RegistryServer, base_image: str, settings: Settings
) -> None:
    pushed = push_base(registry.host, "team/open", "v1", base_image)
    found = registry_for(parse_image_ref(f"{registry.host}/team/open"), settings)
    assert found.manifest_digest(parse_image_ref(f"{registry.host}/team/open"), "v1") == pushed
    assert pushed == registry.digest("team/open", "v1")


def test_manifest_digest_is_none_for_a_missing_tag_or_repository(
    registry: services.RegistryServer, base_image: str, settings: Settings
) -> None:
    push_base(registry.host, "team/open", "v1", base_image)
    image = parse_image_ref(f"{registry.host}/team/open")
    assert V2Registry(registry.host, settings).manifest_digest(image, "never-pushed") is None
    absent = parse_image_ref(f"{registry.host}/nobody/nothing")
    assert V2Registry(registry.host, settings).manifest_digest(absent, "v1") is None


def test_manifest_digest_of_a_manifest_list_and_an_oci_index(
    registry: services.RegistryServer, base_image: str, settings: Settings
) -> None:
    push_base(registry.host, "team/multi", "amd64", base_image)
    url = f"{registry.url}/v2/team/multi/manifests"
    schema2 = "application/vnd.docker.distribution.manifest.v2+json"
    single = requests.get(f"{url}/amd64", headers={"Accept": schema2}, timeout=5)
    assert single.status_code == 200
    child = {"mediaType": schema2, "size": len(single.content),
             "digest": single.headers["Docker-Content-Digest"],
             "platform": {"architecture": "amd64", "os": "linux"}}
    lists = {
        "list": "application/vnd.docker.distribution.manifest.list.v2+json",
        "index": "application/vnd.oci.image.index.v1+json",
    }
    registry_client = V2Registry(registry.host, settings)
    image = parse_image_ref(f"{registry.host}/team/multi")
    for tag, media_type in lists.items():
        body = json.dumps({"schemaVersion": 2, "mediaType": media_type,
                           "manifests": [child]}, indent=1).encode()
        put = requests.put(f"{url}/{tag}", data=body, headers={"Content-Type": media_type},
                           timeout=5)
        if put.status_code != 201:
            pytest.skip(f"this registry does not take a {media_type}: {put.status_code}")
        expected = "sha256:" + hashlib.sha256(body).hexdigest()
        assert registry_client.manifest_digest(image, tag) == expected


def test_unreachable_registry_is_transient_and_names_it(settings: Settings) -> None:
    host = f"127.0.0.1:{services.free_port()}"
    with pytest.raises(TransientRegistryError) as caught:
        V2Registry(host, settings).manifest_digest(parse_image_ref(f"{host}/a/b"), "t")
    assert host in caught.value.message
    assert "could not be reached" in caught.value.message


@pytest.mark.parametrize("status", [500, 503, 429])
def test_server_errors_and_rate_limits_are_transient(status: int, settings: Settings) -> None:
    server = StatusServer(status)
    try:
        with pytest.raises(TransientRegistryError) as caught:
            V2Registry(server.host, settings).manifest_digest(
                parse_image_ref(f"{server.host}/a/b"), "t")
        assert server.host in caught.value.message
        assert str(status) in caught.value.message
    finally:
        server.stop()


# -- Basic auth ------------------------------------------------------------------------------


def test_basic_auth_uses_credentials_from_docker_config_json(
    basic_registry: services.RegistryServer, base_image: str, settings: Settings
) -> None:
    pushed = push_base(basic_registry.host, "team/private", "v1", base_image,
                       {"username": USER, "password": PASSWORD})
    write_docker_config(settings.docker_config_dir,
                        {basic_registry.host: basic_entry(USER, PASSWORD)})
    client = V2Registry(basic_registry.host, settings)
    image = parse_image_ref(f"{basic_registry.host}/team/private")
    assert client.manifest_digest(image, "v1") == pushed
    assert client.manifest_digest(image, "missing") is None
    assert client.push_auth() == {"username": USER, "password": PASSWORD}


def test_docker_config_key_with_a_scheme_and_plain_username_fields_is_matched(
    basic_registry: services.RegistryServer, base_image: str, settings: Settings
) -> None:
    pushed = push_base(basic_registry.host, "team/private", "v2", base_image,
                       {"username": USER, "password": PASSWORD})
    write_docker_config(settings.docker_config_dir, {
        "other.example.com": basic_entry("someone", "else"),
        f"http://{basic_registry.host}": {"username": USER, "password": PASSWORD},
    })
    image = parse_image_ref(f"{basic_registry.host}/team/private")
    assert V2Registry(basic_registry.host, settings).manifest_digest(image, "v2") == pushed


def test_settings_credentials_win_over_docker_config(
    basic_registry: services.RegistryServer, settings: Settings
) -> None:
    write_docker_config(settings.docker_config_dir,
                        {basic_registry.host: basic_entry(USER, "stale")})
    chosen = replace(settings, registry_username=USER, registry_password=PASSWORD)
    image = parse_image_ref(f"{basic_registry.host}/team/private")
    assert V2Registry(basic_registry.host, chosen).manifest_digest(image, "missing") is None


def test_wrong_basic_credentials_name_the_registry_and_how_to_give_them(
    basic_registry: services.RegistryServer, settings: Settings
) -> None:
    write_docker_config(settings.docker_config_dir,
                        {basic_registry.host: basic_entry(USER, "not-the-password")})
    image = parse_image_ref(f"{basic_registry.host}/team/private")
    with pytest.raises(RegistryError) as caught:
        V2Registry(basic_registry.host, settings).manifest_digest(image, "v1")
    error = caught.value
    assert not isinstance(error, TransientRegistryError)
    assert basic_registry.host in error.message
    assert "rejected" in error.message
    assert "BUILDQ_REGISTRY_USERNAME" in (error.hint or "")
    assert "config.json" in (error.hint or "")
    assert "not-the-password" not in str(error)


def test_missing_credentials_say_none_are_set(
    basic_registry: services.RegistryServer, settings: Settings
) -> None:
    image = parse_image_ref(f"{basic_registry.host}/team/private")
    with pytest.raises(RegistryError) as caught:
        V2Registry(basic_registry.host, settings).manifest_digest(image, "v1")
    assert "none are set" in caught.value.message
    assert V2Registry(basic_registry.host, settings).push_auth() is None


# -- Bearer tokens ---------------------------------------------------------------------------


def test_bearer_challenge_fetches_a_scoped_token_and_caches_it(
    token_registry: services.RegistryServer, token_server: TokenServer, base_image: str,
    settings: Settings,
) -> None:
    pushed = push_base(token_registry.host, "team/tokened", "v1", base_image,
                       {"username": USER, "password": PASSWORD})
    chosen = replace(settings, registry_username=USER, registry_password=PASSWORD)
    image = parse_image_ref(f"{token_registry.host}/team/tokened")
    token_server.requests.clear()

    assert V2Registry(token_registry.host, chosen).manifest_digest(image, "v1") == pushed
    assert token_server.requests == [
        {"scope": "repository:team/tokened:pull", "service": SERVICE, "user": USER}
    ]
    # A new instance (as each task makes) reuses the unexpired token for the same scope.
    assert V2Registry(token_registry.host, chosen).manifest_digest(image, "nope") is None
    assert len(token_server.requests) == 1


def test_bearer_token_is_fetched_again_once_expired(
    token_registry: services.RegistryServer, token_server: TokenServer, settings: Settings
) -> None:
    chosen = replace(settings, registry_username=USER, registry_password=PASSWORD)
    image = parse_image_ref(f"{token_registry.host}/team/expiring")
    token_server.requests.clear()
    V2Registry(token_registry.host, chosen).manifest_digest(image, "v1")
    for key, token in list(registry_base._tokens.items()):
        registry_base._tokens[key] = replace(token, expires_at=0.0)
    V2Registry(token_registry.host, chosen).manifest_digest(image, "v1")
    assert len(token_server.requests) == 2


def test_bearer_with_wrong_credentials_names_the_registry(
    token_registry: services.RegistryServer, settings: Settings
) -> None:
    chosen = replace(settings, registry_username=USER, registry_password="wrong")
    image = parse_image_ref(f"{token_registry.host}/team/tokened")
    with pytest.raises(RegistryError) as caught:
        V2Registry(token_registry.host, chosen).manifest_digest(image, "v1")
    assert token_registry.host in caught.value.message
    assert "BUILDQ_REGISTRY_PASSWORD" in (caught.value.hint or "")


# -- secrecy, scheme, dispatch ---------------------------------------------------------------


def test_no_credential_appears_in_logs(
    basic_registry: services.RegistryServer, token_registry: services.RegistryServer,
    settings: Settings, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    write_docker_config(settings.docker_config_dir, {
        basic_registry.host: basic_entry(USER, PASSWORD),
        token_registry.host: basic_entry(USER, PASSWORD),
    })
    for host in (basic_registry.host, token_registry.host):
        client = V2Registry(host, settings)
        client.manifest_digest(parse_image_ref(f"{host}/team/quiet"), "v1")
        assert PASSWORD not in repr(client)
    encoded = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert PASSWORD not in caplog.text
    assert encoded not in caplog.text


@pytest.mark.parametrize(("host", "plain"), [
    ("127.0.0.1:5000", True), ("127.8.9.10", True), ("localhost:5000", True),
    ("[::1]:5000", True), ("registry.example.com", False), ("10.0.0.5:5000", False),
    ("myregistry.azurecr.io", False),
])
def test_loopback_registries_use_http_and_others_https(host: str, plain: bool) -> None:
    assert is_plain_http(host) is plain


def test_listed_insecure_registries_use_http(settings: Settings) -> None:
    chosen = replace(settings, insecure_registries=("registry.internal:5000",))
    assert V2Registry("registry.internal:5000", chosen).base_url == "http://registry.internal:5000"
    assert V2Registry("registry.example.com", chosen).base_url == "https://registry.example.com"


def test_challenge_parameters_keep_commas_inside_quotes() -> None:
    header = ('Bearer realm="https://auth.example.com/token",service="registry.example.com",'
              'scope="repository:team/app:pull,push"')
    assert parse_challenge(header) == ("bearer", {
        "realm": "https://auth.example.com/token", "service": "registry.example.com",
        "scope": "repository:team/app:pull,push",
    })
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})
    assert parse_challenge("") is None


def test_registry_for_gives_a_v2_backend_for_any_host(settings: Settings) -> None:
    # Cloud hosts have backends of their own (tests/workers/test_cloud_registries.py).
    for text in ("127.0.0.1:5000/team/app", "registry.example.com:5000/team/app"):
        backend = registry_for(parse_image_ref(text), settings)
        assert isinstance(backend, V2Registry)
        assert backend.host == text.split("/")[0]
