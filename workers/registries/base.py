"""The registry interface: existence checks and push credentials, written once.

A backend only says how it obtains credentials for its host. Everything a registry
v2 speaks — the manifest HEAD, the anonymous → Basic / Bearer challenge dance, the
token cache, the push probe ``buildq doctor`` runs, the mapping of HTTP failures onto
buildq's error tree — lives here, so cloud backends (ECR, Artifact Registry, ACR) stay
short.

Logical hosts and endpoints: an image keeps the name the user configured
(``<acct>.dkr.ecr.<region>.amazonaws.com/app``) everywhere — in records, tags and
messages — while ``Settings.registry_endpoints`` may say that host is really reached at
another address (a pull-through proxy, a private link, a test stand-in). Only the HTTP
requests here, and the Docker pool's push (which pushes a temporary alias of the image
named after the endpoint, see ``workers.builders.docker``), use the endpoint.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from config.errors import RegistryError, TransientRegistryError
from config.names import is_loopback_host
from workers.registries import direct

if TYPE_CHECKING:
    from config.references import ImageRef
    from config.settings import Settings

#: Every manifest media type an image tag may resolve to; without the list/index types a
#: multi-platform tag would be converted (or refused) and its digest would differ.
MANIFEST_ACCEPT = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
])

#: The forms of an image index, tried in order: an OCI image index, then a Docker manifest
#: list for a registry that refuses the first.
INDEX_MEDIA_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)

#: (connect, read) seconds for one registry request; the chain retries transient faults.
REQUEST_TIMEOUT = (5.0, 30.0)

#: Token lifetime assumed when the token server states none (the distribution spec's default).
DEFAULT_TOKEN_LIFETIME = 60.0

#: A registry token is renewed this many seconds before it expires: buildq uses one for a
#: single request, which must not outlive it.
TOKEN_EXPIRY_MARGIN = 10.0

#: A login (ECR's password, Google's access token, ACR's refresh token) is renewed this
#: many seconds before it expires: the Docker Engine uses it for a whole push.
LOGIN_EXPIRY_MARGIN = 300.0


def renew_at(issued_at: float, expires_at: float, margin: float) -> float:
    """When a credential valid from ``issued_at`` to ``expires_at`` is replaced: ``margin``
    before it expires, but no earlier than half-way through its life, so that one shorter
    than twice the margin is still reused for a while instead of fetched for every use."""
    return expires_at - min(margin, max(expires_at - issued_at, 0.0) / 2)


@dataclass(frozen=True)
class Login:
    """A registry login, and when to fetch a new one (None: it does not expire)."""

    username: str
    password: str = field(repr=False)
    renew_at: float | None = None

    def fresh(self, now: float) -> bool:
        return self.renew_at is None or now < self.renew_at


#: Hosts whose API lives elsewhere than their name suggests.
API_HOSTS = {"docker.io": "registry-1.docker.io", "index.docker.io": "registry-1.docker.io"}

#: How a user hands buildq registry credentials (one sentence, reused in every auth error).
CREDENTIALS_HINT = (
    "Set BUILDQ_REGISTRY_USERNAME and BUILDQ_REGISTRY_PASSWORD, or log in so that docker's "
    "config.json (in DOCKER_CONFIG, default ~/.docker) holds credentials for {host}."
)


@dataclass(frozen=True)
class _Token:
    value: str
    #: When it stops being used (before it really expires, see ``renew_at``).
    expires_at: float


# Shared by every Registry instance: the chain builds a fresh instance per task, and a
# token fetched by one check is good for the next until it expires.
_tokens: dict[tuple[str, str, str, str, str], _Token] = {}
_tokens_lock = threading.Lock()

_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]] | None:
    """Split ``WWW-Authenticate`` into (lower-case scheme, parameters); None if absent.

    Quoted values may hold commas (``scope="repository:a:pull,push"``), so a plain
    split on commas would cut them apart.
    """
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params = {
        key.lower(): (quoted if quoted is not None and quoted != "" else bare or "")
        for key, quoted, bare in _CHALLENGE_PARAM.findall(rest)
    }
    return scheme.lower(), params


def _strip_scheme(host: str) -> str:
    if "://" in host:
        return urlsplit(host).netloc
    return host.rstrip("/")


def is_plain_http(host: str, insecure: tuple[str, ...] = ()) -> bool:
    """Loopback registries and the ones listed as insecure speak HTTP; the rest HTTPS."""
    hostname = urlsplit(f"//{host}").hostname or host
    return host in insecure or hostname in insecure or is_loopback_host(host)


class Registry(ABC):
    """One registry host, reached over the registry v2 HTTP API."""

    #: What a user grants so the tag check may read the repository (named in errors and
    #: by ``buildq doctor``); cloud backends name their IAM action or role.
    pull_permission = "pull access to the repository"
    #: What a user grants so the Docker pool may push.
    push_permission = "push access to the repository"

    def __init__(self, host: str, settings: Settings) -> None:
        self.host = _strip_scheme(host)
        self.settings = settings
        api_host = settings.registry_endpoints.get(self.host) or API_HOSTS.get(self.host, self.host)
        #: Where requests really go (``host`` unless settings map it elsewhere).
        self.endpoint = api_host
        scheme = "http" if is_plain_http(api_host, settings.insecure_registries) else "https"
        self.base_url = f"{scheme}://{api_host}"
        # Once a registry has asked for Basic, asking anonymously first only costs a 401.
        self._basic_known = False
        self._session = requests.Session()
        self._login: Login | None = None
        self._login_read = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.host!r})"

    @abstractmethod
    def login(self) -> Login | None:
        """A login for this host, or None to stay anonymous.

        Called again once the last one is due for renewal (``Login.renew_at``, by
        ``renew_at``); a backend whose login costs a call keeps it process-wide until then.
        """

    def credentials(self) -> tuple[str, str] | None:
        """(username, password) for this host now, or None to stay anonymous."""
        return self._credentials()

    def credentials_hint(self) -> str:
        """How a user gives this backend credentials (the hint of every auth error)."""
        return CREDENTIALS_HINT.format(host=self.host)

    def identity(self) -> str:
        """Who the credentials say we are, for ``buildq doctor``; never a secret."""
        creds = self._credentials()
        return f"user {creds[0]!r}" if creds else "anonymous (no credentials configured)"

    def _credentials(self) -> tuple[str, str] | None:
        # Kept per instance until due (backends may read files or call cloud APIs for it):
        # registry_for hands one instance to a worker thread for minutes, longer than a
        # login may live.
        if not self._login_read or (self._login is not None and not self._login.fresh(time.time())):
            self._login = self.login()
            self._login_read = True
        return (self._login.username, self._login.password) if self._login else None

    def push_auth(self) -> dict[str, str] | None:
        """Credentials in the docker SDK's ``auth_config`` shape (sent as X-Registry-Auth)."""
        creds = self._credentials()
        if creds is None:
            return None
        return {"username": creds[0], "password": creds[1]}

    def manifest_digest(self, ref: ImageRef, tag: str) -> str | None:
        """The digest ``repository:tag`` resolves to in this registry, or None if absent."""
        path = f"/v2/{ref.repository}/manifests/{tag}"
        scope = f"repository:{ref.repository}:pull"
        headers = {"Accept": MANIFEST_ACCEPT}
        response = self._send("HEAD", path, scope, headers)
        if response.status_code == 404:
            return None
        self._raise_for_status(response, f"{ref.repository}:{tag}")
        digest = response.headers.get("Docker-Content-Digest")
        if digest:
            return digest
        # The header is optional in the spec; the digest is by definition the sha256 of the
        # manifest bytes exactly as served, so fetch them when a registry leaves it out.
        response = self._send("GET", path, scope, headers)
        if response.status_code == 404:
            return None
        self._raise_for_status(response, f"{ref.repository}:{tag}")
        return "sha256:" + hashlib.sha256(response.content).hexdigest()

    def manifest(self, ref: ImageRef, reference: str) -> tuple[str, bytes, str] | None:
        """The manifest ``reference`` (a tag or digest) names: its media type, its bytes as
        served and its digest; None when absent."""
        path = f"/v2/{ref.repository}/manifests/{reference}"
        response = self._send("GET", path, f"repository:{ref.repository}:pull",
                              {"Accept": MANIFEST_ACCEPT})
        if response.status_code == 404:
            return None
        self._raise_for_status(response, f"{ref.repository}:{reference}")
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        digest = "sha256:" + hashlib.sha256(response.content).hexdigest()
        return media_type or str(response.json().get("mediaType") or ""), response.content, digest

    def put_manifest(self, ref: ImageRef, tag: str, media_type: str, body: bytes) -> str:
        """Store ``body`` (of ``media_type``) as ``repository:tag``; its digest.

        Raises :class:`ManifestRefusedError` when the registry refuses this media type or
        this manifest (400/415), so a caller may offer it in another form.
        """
        path = f"/v2/{ref.repository}/manifests/{tag}"
        scope = f"repository:{ref.repository}:pull,push"
        response = self._send("PUT", path, scope, {"Content-Type": media_type}, body)
        if response.status_code in (400, 415):
            raise ManifestRefusedError(
                f"registry {self.host} refused a manifest of type {media_type} for "
                f"{ref.repository}:{tag}: {response.status_code} {response.text[:200].strip()}",
                "The registry may not support this manifest type.")
        if response.status_code in (401, 403):
            raise self._auth_error(response.status_code, self._credentials() is not None,
                                   self.push_permission)
        self._raise_for_status(response, f"{ref.repository}:{tag}")
        return response.headers.get("Docker-Content-Digest") or \
            "sha256:" + hashlib.sha256(body).hexdigest()

    def push_index(self, ref: ImageRef, tag: str,
                   images: list[tuple[str, dict[str, str]]]) -> tuple[str, str]:
        """Push an image index over ``images`` — (manifest digest, its ``platform`` object)
        of ``ref``'s repository — as ``repository:tag``: its digest and media type (an OCI
        image index, else a Docker manifest list where the registry refuses that)."""
        manifests = []
        for digest, platform in images:
            found = self.manifest(ref, digest)
            if found is None:
                shown = "/".join(filter(None, (platform.get("os"), platform.get("architecture"),
                                               platform.get("variant"))))
                raise RegistryError(f"the {shown} image {ref.repository}@{digest} is gone "
                                    f"from registry {self.host}.",
                                    "Build the request again: that platform is built anew.")
            manifests.append({"mediaType": found[0], "digest": digest, "size": len(found[1]),
                              "platform": platform})
        refused = []
        for media_type in INDEX_MEDIA_TYPES:
            body = json.dumps({"schemaVersion": 2, "mediaType": media_type,
                               "manifests": manifests}, separators=(",", ":")).encode()
            try:
                return self.put_manifest(ref, tag, media_type, body), media_type
            except ManifestRefusedError as exc:
                refused.append(exc.message)
        raise RegistryError(f"registry {self.host} refused the image index in every form: "
                            + " ".join(refused),
                            "Check that it supports multi-platform images (OCI image indexes "
                            "or Docker manifest lists).")

    def ping(self) -> None:
        """Log in: ``GET /v2/`` with this backend's credentials; raises if refused."""
        response = self._send("GET", "/v2/", "", {})
        self._raise_for_status(response, "the API root /v2/")

    def check_push(self, ref: ImageRef) -> None:
        """Prove a push would be allowed: start a blob upload, then cancel it.

        Nothing is written: an upload session holds no data until a PATCH/PUT, and the
        DELETE ends it (registries also expire abandoned sessions on their own).
        """
        path = f"/v2/{ref.repository}/blobs/uploads/"
        scope = f"repository:{ref.repository}:pull,push"
        response = self._send("POST", path, scope, {"Content-Length": "0"})
        if response.status_code in (401, 403):
            raise self._auth_error(response.status_code, self._credentials() is not None,
                                   self.push_permission)
        self._raise_for_status(response, f"a blob upload to {ref.repository}")
        location = response.headers.get("Location")
        if location:
            # Best effort: a session left open costs nothing and expires by itself.
            with contextlib.suppress(RegistryError):
                self._send("DELETE", urljoin(self.base_url + path, location), scope, {})

    # -- retention (buildq gc) ----------------------------------------------------------

    #: The setting that allows deletion, named when the registry refuses it.
    delete_setting = "storage.delete.enabled: true in the registry's config (the CNCF distribution " \
        "registry; REGISTRY_STORAGE_DELETE_ENABLED=true in its environment)"

    def tags(self, ref: ImageRef) -> list[str]:
        """Every tag of ``ref``'s repository (following the API's pagination)."""
        found: list[str] = []
        path: str | None = f"/v2/{ref.repository}/tags/list?n=1000"
        scope = f"repository:{ref.repository}:pull"
        while path:
            response = self._send("GET", path, scope, {})
            if response.status_code == 404:
                return found
            self._raise_for_status(response, f"the tags of {ref.repository}")
            found += list((response.json() or {}).get("tags") or [])
            link = response.headers.get("Link", "")
            match = re.match(r"<([^>]+)>", link)
            path = urljoin(self.base_url + "/", match.group(1)) if match else None
        return found

    def image_config(self, ref: ImageRef, tag: str) -> tuple[str, dict[str, Any]] | None:
        """The manifest digest of ``tag`` and its image config (the first platform's, for an
        index), or None when the tag is gone."""
        scope = f"repository:{ref.repository}:pull"
        response = self._send("GET", f"/v2/{ref.repository}/manifests/{tag}", scope,
                              {"Accept": MANIFEST_ACCEPT})
        if response.status_code == 404:
            return None
        self._raise_for_status(response, f"{ref.repository}:{tag}")
        digest = response.headers.get("Docker-Content-Digest") or \
            "sha256:" + hashlib.sha256(response.content).hexdigest()
        manifest = response.json()
        if manifest.get("manifests"):
            child = manifest["manifests"][0]["digest"]
            response = self._send("GET", f"/v2/{ref.repository}/manifests/{child}", scope,
                                  {"Accept": MANIFEST_ACCEPT})
            self._raise_for_status(response, f"{ref.repository}@{child}")
            manifest = response.json()
        config = (manifest.get("config") or {}).get("digest")
        if not config:
            return digest, {}
        response = self._send("GET", f"/v2/{ref.repository}/blobs/{config}", scope, {})
        self._raise_for_status(response, f"the config of {ref.repository}:{tag}")
        return digest, dict(response.json())

    def delete_manifest(self, ref: ImageRef, digest: str) -> None:
        """Delete the manifest ``digest`` (and so every tag naming it) from the repository."""
        response = self._send("DELETE", f"/v2/{ref.repository}/manifests/{digest}",
                              f"repository:{ref.repository}:delete", {})
        if response.status_code in (404, 202, 200):
            return
        if response.status_code == 405 or "UNSUPPORTED" in response.text:
            raise RegistryError(f"registry {self.host} does not allow deleting images "
                                f"({response.status_code}).", f"Enable it: {self.delete_setting}.")
        self._raise_for_status(response, f"deleting {ref.repository}@{digest}")

    # -- HTTP and auth -------------------------------------------------------------------

    def _send(
        self, method: str, path: str, scope: str, headers: dict[str, str],
        body: bytes | None = None,
    ) -> requests.Response:
        # A path, or a full URL the registry handed back (an upload's Location).
        url = path if "://" in path else self.base_url + path
        creds = self._credentials() if self._basic_known else None
        cached = None if creds else self._cached_token(scope)
        if creds:
            first = {**headers, "Authorization": _basic(creds)}
        elif cached:
            first = {**headers, "Authorization": f"Bearer {cached.value}"}
        else:
            first = headers
        response = self._http(method, url, first, body=body)
        if response.status_code != 401:
            return response

        challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if challenge is None:
            return response
        scheme, params = challenge
        if scheme == "basic":
            self._basic_known = True
            creds = creds or self._credentials()
            if creds is None:
                return response
            authorization = _basic(creds)
        elif scheme == "bearer":
            token = self._fetch_token(params, params.get("scope") or scope)
            authorization = f"Bearer {token}"
        else:
            return response
        return self._http(method, url, {**headers, "Authorization": authorization}, body=body)

    def _http(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        params: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        body: bytes | None = None,
    ) -> requests.Response:
        try:
            if method == "HEAD" and params is None and auth is None and body is None:
                # The tag check of every cache hit: past requests when nothing it adds applies.
                answered = direct.head(url, headers, REQUEST_TIMEOUT)
                if answered is not None:
                    return answered
            return self._session.request(
                method, url, headers=headers, params=params, auth=auth, data=body,
                timeout=REQUEST_TIMEOUT, allow_redirects=True,
            )
        except requests.exceptions.SSLError as exc:
            raise RegistryError(
                f"TLS with registry {self.host} failed: {_reason(exc)}.",
                "If it serves plain HTTP, list it in BUILDQ_INSECURE_REGISTRIES; otherwise "
                "install its CA certificate on this host.",
            ) from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                urllib3.exceptions.TimeoutError) as exc:
            raise TransientRegistryError(
                f"registry {self.host} could not be reached: {_reason(exc)}.",
                "Check that the registry is up and reachable from this host; buildq retries.",
            ) from None

    def _token_key(self, service: str, scope: str) -> tuple[str, str, str, str, str]:
        creds = self._credentials()
        user = creds[0] if creds else ""
        return (self.host, service, scope, user, type(self).__name__)

    def _cached_token(self, scope: str) -> _Token | None:
        # The service is unknown before the first challenge; match on the rest of the key.
        host, _, _, user, backend = self._token_key("", scope)
        now = time.time()
        with _tokens_lock:
            for (k_host, _, k_scope, k_user, k_backend), token in _tokens.items():
                same = (k_host, k_scope, k_user, k_backend) == (host, scope, user, backend)
                if same and token.expires_at > now:
                    return token
        return None

    def _fetch_token(self, challenge: dict[str, str], scope: str) -> str:
        realm = challenge.get("realm")
        if not realm:
            raise RegistryError(
                f"registry {self.host} asked for a bearer token but named no token server.",
                "This registry's auth configuration looks broken; ask its operator.",
            )
        service = challenge.get("service", "")
        key = self._token_key(service, scope)
        now = time.time()
        # A cached token that just drew a 401 was revoked or under-scoped: never reuse it.
        with _tokens_lock:
            _tokens.pop(key, None)

        params = {"scope": scope}
        if service:
            params["service"] = service
        creds = self._credentials()
        response = self._http("GET", realm, {}, params=params, auth=creds)
        if response.status_code in (401, 403):
            raise self._auth_error(response.status_code, creds is not None)
        self._raise_for_status(response, "a token", where=f"token server of {self.host}")
        try:
            body = response.json()
            token = body.get("token") or body.get("access_token")
            lifetime = float(body.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            token = None
            lifetime = 0.0
        if not token or not isinstance(token, str):
            raise TransientRegistryError(
                f"the token server of registry {self.host} answered without a token.",
                "buildq retries; if this persists, check the registry's auth service.",
            )
        use_until = renew_at(now, now + lifetime, TOKEN_EXPIRY_MARGIN)
        with _tokens_lock:
            _tokens[key] = _Token(token, use_until)
        return token

    def _raise_for_status(
        self, response: requests.Response, what: str, where: str | None = None
    ) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        where = where or f"registry {self.host}"
        if status in (401, 403):
            raise self._auth_error(status, self._credentials() is not None, self.pull_permission)
        if status == 429 or status >= 500:
            raise TransientRegistryError(
                f"{where} answered {status} {response.reason} for {what}.",
                "buildq retries with backoff.",
            )
        raise RegistryError(
            f"{where} answered {status} {response.reason} for {what}.",
            "Check the image name and that this registry speaks the registry v2 API.",
        )

    def _auth_error(
        self, status: int, had_credentials: bool, permission: str | None = None
    ) -> RegistryError:
        if had_credentials:
            needed = permission or f"{self.pull_permission} / {self.push_permission}"
            message = (
                f"registry {self.host} rejected the configured credentials ({status}): "
                f"they are wrong or lack {needed}."
            )
        else:
            message = f"registry {self.host} requires credentials ({status}) and none are set."
        return RegistryError(message, self.credentials_hint())


class ManifestRefusedError(RegistryError):
    """The registry refused a manifest it was given (its type, or its content)."""


def _basic(creds: tuple[str, str]) -> str:
    raw = f"{creds[0]}:{creds[1]}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def _reason(exc: Exception) -> str:
    # requests wraps urllib3 wraps socket errors; the innermost text is the useful one.
    text = str(exc)
    match = re.search(r"\[Errno -?\d+\] ([^')\]]+)", text)
    if match:
        return match.group(1).strip()
    if isinstance(exc, (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError)):
        return "timed out"
    return text.split(": ", 1)[-1][:200]


#: Backend module and class per ``classify_registry`` kind; imported on first use so a
#: worker that never meets ECR does not pay for boto3 (nor ACR for azure-identity).
BACKENDS = {
    "v2": ("workers.registries.v2", "V2Registry"),
    "ecr": ("workers.registries.ecr", "ECRRegistry"),
    "gar": ("workers.registries.gar", "ArtifactRegistry"),
    "acr": ("workers.registries.acr", "ACRRegistry"),
}


#: How long a worker thread keeps talking to a registry through one backend instance:
#: its connection, tokens and credentials. Credentials rotated on disk are read again
#: after this.
REUSE_SECONDS = 300.0
_reused = threading.local()


def registry_for(ref: ImageRef, settings: Settings) -> Registry:
    """The backend that speaks for ``ref``'s registry host, picked by the host's shape.

    Reused per thread for a while: a fresh instance pays a new connection, a credentials
    read and a token round trip, which is most of a cache-hit request's registry time.
    """
    import importlib

    from config.references import classify_registry

    module, name = BACKENDS.get(classify_registry(ref).kind, BACKENDS["v2"])
    cache: dict[tuple[str, str, int], tuple[float, Registry]] = _reused.__dict__.setdefault(
        "instances", {})
    key = (name, ref.registry, id(settings))
    now = time.monotonic()
    hit = cache.get(key)
    if hit is not None and now - hit[0] < REUSE_SECONDS and hit[1].settings is settings:
        return hit[1]
    backend: type[Registry] = getattr(importlib.import_module(module), name)
    registry = backend(ref.registry, settings)
    cache[key] = (now, registry)
    return registry
