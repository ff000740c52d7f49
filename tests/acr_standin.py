"""An Azure Container Registry login stand-in, in front of a token-auth docker-registry.

It speaks ACR's documented OAuth flow:

- ``POST /oauth2/exchange`` (form ``grant_type=access_token``, ``service``,
  ``access_token``, optional ``tenant``): an Azure AD access token in, an ACR refresh
  token (a JWT with ``exp``) out;
- ``GET /oauth2/token`` with Basic ``00000000-0000-0000-0000-000000000000:<refresh
  token>`` (what the Docker Engine sends) or ``POST /oauth2/token`` with
  ``grant_type=refresh_token``: a registry access token for the requested scopes, limited
  to what the identity's role allows (``AcrPull``: pull; ``AcrPush``: pull and push);
- ``GET /msi/token``: an App Service managed-identity endpoint (``IDENTITY_ENDPOINT`` /
  ``IDENTITY_HEADER``), so ``DefaultAzureCredential`` in a worker process really
  acquires its Azure AD token over HTTP.

Azure AD tokens are unsigned here (ACR validates them against AAD; this stand-in knows
which ones it issued), but they carry the real claims: ``aud``, ``tid``, ``oid``, ``exp``.
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.services import HTTPStandIn, RegistryServer, TokenSigner, start_token_registry

REFRESH_USER = "00000000-0000-0000-0000-000000000000"
ARM_AUDIENCE = "https://management.azure.com"
TENANT = "72f988bf-0000-4000-8000-standin00001"
ROLE_ACTIONS = {"AcrPull": {"pull"}, "AcrPush": {"pull", "push"}}


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


@dataclass
class AccessToken:
    """The shape of azure.core.credentials.AccessToken (token, expires_on)."""

    token: str
    expires_on: int


class ACRStandIn(HTTPStandIn):
    def __init__(self, directory: Path, registry_name: str = "buildqstandin") -> None:
        super().__init__()
        self.service = f"{registry_name}.azurecr.io"
        self.signer = TokenSigner(directory, "acr-standin-issuer", self.service)
        #: principal object id → role on this registry (absent: no role at all)
        self.roles: dict[str, str] = {}
        self.identity_header = os.urandom(8).hex()
        self.aad_issued: dict[str, tuple[str, float]] = {}
        self.exchanges: list[str] = []
        self.token_requests: list[dict[str, str]] = []
        #: Seconds an exchanged refresh token is valid (ACR's: three hours).
        self.refresh_lifetime = 3 * 3600
        #: Seconds a registry access token from /oauth2/token is valid.
        self.token_lifetime = 300
        #: /oauth2/token requests refused (expired or unknown refresh token, no role).
        self.rejected = 0

    @property
    def realm(self) -> str:
        return f"{self.url}/oauth2/token"

    @property
    def msi_endpoint(self) -> str:
        return f"{self.url}/msi/token"

    def aad_token(self, oid: str, lifetime: int = 3600) -> AccessToken:
        now = int(time.time())
        claims = {"aud": ARM_AUDIENCE, "iss": f"https://sts.windows.net/{TENANT}/", "tid": TENANT,
                  "oid": oid, "appid": f"app-{oid}", "iat": now, "nbf": now, "exp": now + lifetime}
        token = f"{_b64({'alg': 'RS256', 'typ': 'JWT'})}.{_b64(claims)}.{os.urandom(16).hex()}"
        self.aad_issued[token] = (oid, now + lifetime)
        return AccessToken(token, now + lifetime)

    def _refresh_token(self, oid: str) -> str:
        now = int(time.time())
        return self._sign({"sub": oid, "grant_type": "refresh_token", "aud": self.service,
                           "iat": now, "exp": now + self.refresh_lifetime, "tenant": TENANT,
                           "jti": os.urandom(8).hex()})

    def _sign(self, claims: dict[str, Any]) -> str:
        import jwt

        return str(jwt.encode({**claims, "iss": self.signer.issuer}, self.signer.key,
                              algorithm="RS256"))

    def _principal(self, refresh_token: str) -> str | None:
        import jwt

        try:
            claims = jwt.decode(refresh_token, self.signer.key.public_key(), algorithms=["RS256"],
                                audience=self.service)
        except jwt.PyJWTError:
            return None
        return str(claims["sub"]) if claims.get("grant_type") == "refresh_token" else None

    def route(self, method: str, path: str, headers: dict[str, str],
              body: bytes) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(path)
        query = {k: v for k, v in parse_qs(parts.query).items()}
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()} if body else {}
        if method == "GET" and parts.path == "/msi/token":
            if headers.get("X-IDENTITY-HEADER") != self.identity_header:
                return self.json(401, {"error": "bad identity header"})
            issued = self.aad_token(query.get("client_id", ["managed-identity"])[0])
            return self.json(200, {"access_token": issued.token,
                                   "expires_on": str(issued.expires_on),
                                   "resource": (query.get("resource") or [ARM_AUDIENCE])[0],
                                   "token_type": "Bearer"})
        if method == "POST" and parts.path == "/oauth2/exchange":
            aad = form.get("access_token", "")
            oid, expires = self.aad_issued.get(aad, ("", 0.0))
            if form.get("grant_type") != "access_token" or form.get("service") != self.service:
                return self.json(400, {"errors": [{"code": "BAD_REQUEST"}]})
            if not oid or expires <= time.time() or oid not in self.roles:
                return self.json(401, {"errors": [{"code": "UNAUTHORIZED"}]})
            self.exchanges.append(oid)
            return self.json(200, {"refresh_token": self._refresh_token(oid)})
        if parts.path == "/oauth2/token":
            if method == "GET":
                login = self.basic(headers)
                refresh = login[1] if login and login[0] == REFRESH_USER else ""
                scopes = query.get("scope", [])
            else:
                refresh = (form.get("refresh_token") or "") if \
                    form.get("grant_type") == "refresh_token" else ""
                scopes = [form["scope"]] if form.get("scope") else []
            # An expired refresh token fails here: PyJWT checks exp with no leeway.
            oid = self._principal(refresh) if refresh else None
            self.token_requests.append({"method": method, "scope": " ".join(scopes),
                                        "principal": oid or ""})
            if oid is None or oid not in self.roles:
                self.rejected += 1
                return self.json(401, {"errors": [{"code": "UNAUTHORIZED"}]})
            token = self.signer.registry_token(oid, scopes, ROLE_ACTIONS[self.roles[oid]],
                                               lifetime=self.token_lifetime)
            return self.json(200, {"access_token": token, "token": token,
                                   "expires_in": self.token_lifetime})
        return self.json(404, {})


class StandInCredential:
    """An azure-identity ``TokenCredential``: what DefaultAzureCredential yields, minus AAD."""

    def __init__(self, acr: ACRStandIn, oid: str) -> None:
        self.acr, self.oid = acr, oid
        self.calls = 0

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        assert scopes == ("https://management.azure.com/.default",), scopes
        self.calls += 1
        return self.acr.aad_token(self.oid)


def start_acr_registry(root: Path, acr: ACRStandIn) -> RegistryServer:
    """The docker-registry behind the stand-in: token auth, realm = the stand-in."""
    return start_token_registry(root, realm=acr.realm, service=acr.service,
                                issuer=acr.signer.issuer, rootcertbundle=acr.signer.bundle)
