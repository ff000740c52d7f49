"""Login services whose credentials expire, for the ECR, Artifact Registry and ACR paths.

Each issues a new credential per call, valid for ``lifetime`` seconds (a few, in tests),
and is the token realm of a token-auth docker-registry: the realm signs a registry token
only for a credential it issued that has not expired, and counts the ones it refuses.

- ``ECRStandIn`` speaks the ECR API's JSON protocol (``X-Amz-Target:
  AmazonEC2ContainerRegistry_V20150921.<Action>``), as boto3 calls it:
  ``GetAuthorizationToken`` (a fresh password, base64 ``AWS:<password>``, with its
  ``expiresAt``), ``DescribeImages`` (read from the registry behind it) and
  ``CreateRepository``. The registry login is ``AWS:<password>``, as on ECR.
- ``ExpiringGoogle`` is ``tests.services.GoogleStandIn`` (access tokens from its OAuth
  endpoint, ``lifetime`` seconds each) whose registry tokens live ``token_lifetime``
  seconds and whose refusals are counted.
- ACR: ``tests.acr_standin.ACRStandIn`` with ``refresh_lifetime`` set.

docker-registry itself accepts a registry token up to 60 s past its ``exp`` (clock-skew
leeway), and the Docker Engine keeps one for at least 60 s whatever ``expires_in`` says;
so the short expiry is enforced where the login is checked, at the realm.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import requests

from tests.services import GoogleStandIn, HTTPStandIn, RegistryServer, TokenSigner, start_token_registry

ECR_TARGET = "AmazonEC2ContainerRegistry_V20150921."
MANIFEST_TYPES = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
])


class ECRStandIn(HTTPStandIn):
    def __init__(self, directory: Path, account: str, region: str) -> None:
        super().__init__()
        self.account, self.region = account, region
        self.signer = TokenSigner(directory, "ecr-standin-issuer", "ecr-standin")
        #: Seconds a password from GetAuthorizationToken is valid (ECR's: twelve hours).
        self.lifetime = 12 * 3600.0
        #: Seconds a registry token from the realm is valid.
        self.token_lifetime = 60
        #: password → when it expires (epoch seconds)
        self.passwords: dict[str, float] = {}
        self.token_calls = 0
        self.describe_calls = 0
        #: Registry tokens issued for a valid login, and logins refused at the realm.
        self.realm_logins = 0
        self.rejected = 0
        self.repositories: set[str] = set()
        #: The registry behind the realm (set once it runs), read by DescribeImages.
        self.registry_url = ""

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    def route(self, method: str, path: str, headers: dict[str, str],
              body: bytes) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(path)
        if method == "GET" and parts.path == "/token":
            return self._realm(headers, parse_qs(parts.query).get("scope", []))
        target = {k.lower(): v for k, v in headers.items()}.get("x-amz-target", "")
        if method == "POST" and target.startswith(ECR_TARGET):
            request = json.loads(body or b"{}")
            action = target[len(ECR_TARGET):]
            if action == "GetAuthorizationToken":
                return self._authorization_token()
            if action == "DescribeImages":
                return self._describe_images(request)
            if action == "CreateRepository":
                return self._create_repository(request)
            return self._error("UnknownOperationException", f"{action} is not served here")
        return self.json(404, {})

    def _answer(self, data: object) -> tuple[int, dict[str, str], bytes]:
        return 200, {"Content-Type": "application/x-amz-json-1.1"}, json.dumps(data).encode()

    def _error(self, code: str, message: str) -> tuple[int, dict[str, str], bytes]:
        return 400, {"Content-Type": "application/x-amz-json-1.1"}, json.dumps(
            {"__type": code, "message": message}).encode()

    def _authorization_token(self) -> tuple[int, dict[str, str], bytes]:
        self.token_calls += 1
        password = f"ecr-standin-{os.urandom(16).hex()}"
        expires = time.time() + self.lifetime
        self.passwords[password] = expires
        token = base64.b64encode(f"AWS:{password}".encode()).decode()
        return self._answer({"authorizationData": [{
            "authorizationToken": token, "expiresAt": expires,
            "proxyEndpoint": f"https://{self.account}.dkr.ecr.{self.region}.amazonaws.com"}]})

    def _describe_images(self, request: dict[str, object]) -> tuple[int, dict[str, str], bytes]:
        self.describe_calls += 1
        repository = str(request.get("repositoryName"))
        if repository not in self.repositories:
            return self._error("RepositoryNotFoundException", f"repository {repository} not found")
        ids = request.get("imageIds")
        image: dict[str, str] = ids[0] if isinstance(ids, list) and ids and isinstance(ids[0], dict) else {}
        reference = image.get("imageDigest") or image.get("imageTag") or "latest"
        token = self.signer.registry_token("ecr-api", [f"repository:{repository}:pull"], {"pull"})
        answer = requests.head(f"{self.registry_url}/v2/{repository}/manifests/{reference}",
                               headers={"Authorization": f"Bearer {token}", "Accept": MANIFEST_TYPES},
                               timeout=10)
        digest = answer.headers.get("Docker-Content-Digest")
        if answer.status_code != 200 or not digest:
            return self._error("ImageNotFoundException", f"image {reference} not found")
        return self._answer({"imageDetails": [{
            "registryId": self.account, "repositoryName": repository, "imageDigest": digest,
            "imageTags": [image["imageTag"]] if image.get("imageTag") else []}]})

    def _create_repository(self, request: dict[str, object]) -> tuple[int, dict[str, str], bytes]:
        repository = str(request.get("repositoryName"))
        if repository in self.repositories:
            return self._error("RepositoryAlreadyExistsException", f"{repository} exists")
        self.repositories.add(repository)
        return self._answer({"repository": {"repositoryName": repository, "registryId": self.account}})

    def _realm(self, headers: dict[str, str], scopes: list[str]) -> tuple[int, dict[str, str], bytes]:
        login = self.basic(headers)
        if login is None or login[0] != "AWS" or self.passwords.get(login[1], 0.0) <= time.time():
            self.rejected += 1
            return self.json(401, {"errors": [{"code": "UNAUTHORIZED"}]})
        self.realm_logins += 1
        token = self.signer.registry_token("AWS", scopes, {"pull", "push"}, lifetime=self.token_lifetime)
        return self.json(200, {"token": token, "expires_in": self.token_lifetime})


def start_ecr_registry(root: Path, ecr: ECRStandIn) -> RegistryServer:
    """The registry behind ``ecr``: token auth whose realm is the stand-in."""
    server = start_token_registry(root, realm=ecr.realm, service=ecr.signer.service,
                                  issuer=ecr.signer.issuer, rootcertbundle=ecr.signer.bundle)
    ecr.registry_url = server.url
    return server


class ExpiringGoogle(GoogleStandIn):
    """GoogleStandIn whose registry tokens live ``token_lifetime`` seconds and whose realm
    counts the logins it refuses (an access token it did not issue, or one that expired)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.token_lifetime = 60
        self.rejected = 0

    def route(self, method: str, path: str, headers: dict[str, str],
              body: bytes) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(path)
        if method == "GET" and parts.path == "/v2/token":
            login = self.basic(headers)
            if login is None or login[0] != "oauth2accesstoken" or \
                    self.issued.get(login[1], 0.0) <= time.time():
                self.rejected += 1
                return self.json(401, {"errors": [{"code": "UNAUTHORIZED"}]})
            self.registry_logins.append(login[1])
            scopes = parse_qs(parts.query).get("scope", [])
            token = self.signer.registry_token("gar-user", scopes, self.allowed,
                                               lifetime=self.token_lifetime)
            return self.json(200, {"token": token, "expires_in": self.token_lifetime})
        return super().route(method, path, headers, body)


def refused_tokens(registry: RegistryServer) -> list[str]:
    """Requests the registry refused for the token they carried (expired, forged), from its
    log. Not counted: the anonymous first request of every login ("authorization token
    required") and a valid token lacking an action ("insufficient scope")."""
    log = (registry.root / "registry.log").read_text(errors="replace")
    return [line for line in log.splitlines()
            if "error authorizing context: invalid token" in line]
