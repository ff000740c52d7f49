"""Azure Container Registry: ``<name>.azurecr.io/<repository>`` (``https://`` accepted).

Credentials come from ``azure.identity.DefaultAzureCredential`` (managed identity,
workload identity, environment, Azure CLI); a caller may hand any ``TokenCredential``
instead. The AAD access token is exchanged at the registry's ``POST /oauth2/exchange``
for an ACR refresh token, which is the password of the fixed user
``00000000-0000-0000-0000-000000000000``. With that login the base class runs the usual
bearer flow (``/oauth2/token``) for the tag check, and the Docker Engine does the same
for the push.

The exchange URL is taken from the registry's own bearer challenge: on ACR the realm is
``https://<name>.azurecr.io/oauth2/token`` and the exchange lives beside it, so this
also finds it when the registry is reached through an endpoint mapping.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import requests

from config.errors import RegistryError, TransientRegistryError
from workers.registries.base import (
    LOGIN_EXPIRY_MARGIN,
    REQUEST_TIMEOUT,
    Login,
    Registry,
    parse_challenge,
    renew_at,
)

if TYPE_CHECKING:
    from config.settings import Settings

#: The user ACR expects when the password is a refresh token from /oauth2/exchange.
REFRESH_TOKEN_USER = "00000000-0000-0000-0000-000000000000"
#: The AAD scope whose tokens ACR's exchange accepts (Azure Resource Manager).
AAD_SCOPE = "https://management.azure.com/.default"
#: Lifetime assumed when a refresh token carries no readable expiry (ACR's is 3 h).
DEFAULT_REFRESH_LIFETIME = 3600.0


@dataclass(frozen=True)
class _Refresh:
    token: str
    renew_at: float
    # Held so the id() in the cache key cannot be reused by another object meanwhile.
    credential: Any


_refresh_tokens: dict[tuple[str, int], _Refresh] = {}
_cache_lock = threading.Lock()
_default_credential: Any = None


def _default() -> Any:
    global _default_credential
    with _cache_lock:
        if _default_credential is None:
            from azure.identity import DefaultAzureCredential

            _default_credential = DefaultAzureCredential()
        return _default_credential


def jwt_claims(token: str) -> dict[str, Any]:
    """The (unverified) claims of a JWT, {} if it is not one: read for expiry and identity."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, TypeError):
        return {}
    return claims if isinstance(claims, dict) else {}


class ACRRegistry(Registry):
    """ACR, logged in with an AAD token exchanged for an ACR refresh token."""

    pull_permission = "AcrPull"
    push_permission = "AcrPush"

    def __init__(self, host: str, settings: Settings, credential: Any = None) -> None:
        super().__init__(host, settings)
        self._credential = credential

    def _azure_credential(self) -> Any:
        return self._credential if self._credential is not None else _default()

    def credentials_hint(self) -> str:
        name = self.host.split(".", 1)[0]
        return (f"Assign the workers' Azure identity the {self.push_permission} role on the "
                f"registry (az role assignment create --role AcrPush --assignee <principal-id> "
                f"--scope $(az acr show -n {name} --query id -o tsv)).")

    def login(self) -> Login:
        credential = self._azure_credential()
        key = (self.host, id(credential))
        now = time.time()
        with _cache_lock:
            cached = _refresh_tokens.get(key)
        if cached and cached.renew_at > now:
            return Login(REFRESH_TOKEN_USER, cached.token, cached.renew_at)
        aad = self._aad_token(credential)
        token, expires_at = self._exchange(aad.token, float(aad.expires_on))
        renew = renew_at(now, expires_at, LOGIN_EXPIRY_MARGIN)
        with _cache_lock:
            _refresh_tokens[key] = _Refresh(token, renew, credential)
        return Login(REFRESH_TOKEN_USER, token, renew)

    def _aad_token(self, credential: Any) -> Any:
        from azure.core.exceptions import AzureError, ClientAuthenticationError

        try:
            return credential.get_token(AAD_SCOPE)
        except ClientAuthenticationError as exc:
            raise RegistryError(
                f"no Azure credential for ACR {self.host}: {_first_line(exc)}.",
                "Give the workers a managed or workload identity, or set AZURE_CLIENT_ID, "
                "AZURE_TENANT_ID and AZURE_CLIENT_SECRET (what DefaultAzureCredential reads).",
            ) from None
        except AzureError as exc:
            raise TransientRegistryError(
                f"Azure AD could not be reached for a token ({type(exc).__name__}).",
                "buildq retries.") from None

    def _exchange(self, aad_token: str, aad_expires: float) -> tuple[str, float]:
        url, service = self._exchange_endpoint()
        form = {"grant_type": "access_token", "service": service, "access_token": aad_token}
        tenant = jwt_claims(aad_token).get("tid")
        if tenant:
            form["tenant"] = str(tenant)
        try:
            response = self._session.post(url, data=form, timeout=REQUEST_TIMEOUT)
        except requests.RequestException as exc:
            raise TransientRegistryError(
                f"the token exchange of ACR {self.host} could not be reached "
                f"({type(exc).__name__}).", "buildq retries.") from None
        if response.status_code in (401, 403):
            raise RegistryError(
                f"ACR {self.host} refused to exchange the Azure AD token "
                f"({response.status_code}): the identity has no role on this registry.",
                self.credentials_hint())
        self._raise_for_status(response, "a refresh token", where=f"ACR token exchange of {self.host}")
        try:
            token = response.json().get("refresh_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise TransientRegistryError(f"ACR {self.host} answered the exchange without a token.",
                                         "buildq retries.")
        exp = jwt_claims(token).get("exp")
        expires_at = float(exp) if isinstance(exp, int | float) else min(
            aad_expires, time.time() + DEFAULT_REFRESH_LIFETIME)
        return token, expires_at

    def _exchange_endpoint(self) -> tuple[str, str]:
        """(exchange URL, service name), read from the registry's bearer challenge."""
        response = self._http("GET", self.base_url + "/v2/", {})
        challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if response.status_code == 401 and challenge and challenge[0] == "bearer":
            params = challenge[1]
            realm = urlsplit(params.get("realm", ""))
            if realm.scheme and realm.netloc:
                url = urlunsplit((realm.scheme, realm.netloc, "/oauth2/exchange", "", ""))
                return url, params.get("service") or self.host
        return self.base_url + "/oauth2/exchange", self.host

    def identity(self) -> str:
        credential = self._azure_credential()
        claims = jwt_claims(self._aad_token(credential).token)
        # Names and object ids, never the token.
        who = claims.get("upn") or claims.get("appid") or claims.get("oid")
        where = f" in tenant {claims['tid']}" if claims.get("tid") else ""
        via = type(credential).__name__
        return f"{who}{where} (via {via})" if who else f"an Azure AD token from {via}"


def _first_line(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return (str(text).strip().splitlines() or [type(exc).__name__])[0][:200]
