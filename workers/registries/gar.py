"""Google Artifact Registry: ``<region>-docker.pkg.dev/<project>/<repository>/<image...>``.

Credentials come from ``google.auth.default()`` (a service account on GKE/GCE, the
file named by GOOGLE_APPLICATION_CREDENTIALS, or gcloud's application-default login);
a caller may hand a credentials object instead. The registry login is
``oauth2accesstoken:<access token>``; the token is refreshed before it expires (see
``workers.registries.base.renew_at``), not only when there is none yet.
The tag check is the plain registry v2 HEAD with that login.
"""

from __future__ import annotations

import datetime
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from config.errors import RegistryError, TransientRegistryError
from workers.registries.base import LOGIN_EXPIRY_MARGIN, Login, Registry, renew_at

if TYPE_CHECKING:
    from config.settings import Settings

#: The username Artifact Registry expects with an OAuth access token as the password.
TOKEN_USER = "oauth2accesstoken"
#: The scope asked of google.auth.default(); Artifact Registry accepts cloud-platform.
SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)

# google.auth.default() reads files and may ask a metadata server: do it once per process.
# The lock also keeps two threads from refreshing one credentials object at once.
_default: tuple[Any, str | None] | None = None
_lock = threading.Lock()
#: When the token this process last fetched for each credentials object is to be renewed.
_renew: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


def _epoch(expiry: datetime.datetime | None) -> float | None:
    # google-auth keeps expiries as naive datetimes in UTC.
    return expiry.replace(tzinfo=datetime.UTC).timestamp() if expiry is not None else None


def _default_credentials() -> tuple[Any, str | None]:
    global _default
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    with _lock:
        if _default is None:
            try:
                _default = google.auth.default(scopes=list(SCOPES))
            except DefaultCredentialsError as exc:
                raise RegistryError(
                    f"no Google credentials: google.auth.default() found none ({_first_line(exc)}).",
                    "Run the workers with a service account (GKE Workload Identity, GCE), set "
                    "GOOGLE_APPLICATION_CREDENTIALS to a key file, or run "
                    "'gcloud auth application-default login'.",
                ) from None
        return _default


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


class ArtifactRegistry(Registry):
    """Artifact Registry's docker endpoint, logged in with a Google OAuth access token."""

    pull_permission = "artifactregistry.repositories.downloadArtifacts"
    push_permission = "artifactregistry.repositories.uploadArtifacts"

    def __init__(self, host: str, settings: Settings, credentials: Any = None) -> None:
        super().__init__(host, settings)
        #: A google.auth credentials object; None means google.auth.default().
        self._google = credentials

    def _google_credentials(self) -> Any:
        return self._google if self._google is not None else _default_credentials()[0]

    def credentials_hint(self) -> str:
        return ("Grant the workers' Google identity roles/artifactregistry.writer (it holds "
                f"{self.pull_permission} and {self.push_permission}) on the repository.")

    def login(self) -> Login:
        token, renew = self._access_token()
        return Login(TOKEN_USER, token, renew)

    def _access_token(self) -> tuple[str, float | None]:
        """The access token, and when to renew it (None: it states no expiry)."""
        import google.auth.transport.requests
        from google.auth.exceptions import RefreshError, TransportError

        creds = self._google_credentials()
        with _lock:
            now = time.time()
            renew = _renew.get(creds)
            # A token this process fetched is renewed by the rule every backend follows
            # (renew_at), which also lets a token living less than google-auth's fixed
            # 3m45s window be reused; one it did not fetch is judged by google-auth's valid.
            due = not creds.valid if renew is None else (now >= renew or not creds.token)
            if due:
                try:
                    creds.refresh(google.auth.transport.requests.Request())
                except TransportError as exc:
                    raise TransientRegistryError(
                        f"Google's token endpoint could not be reached ({_first_line(exc)}).",
                        "buildq retries.") from None
                except RefreshError as exc:
                    raise RegistryError(
                        f"refreshing the Google credentials failed ({_first_line(exc)}).",
                        "Check that the service account or login behind google.auth.default() "
                        "is still valid (gcloud auth application-default login).") from None
            expires = _epoch(creds.expiry)
            if due or renew is None:
                renew = renew_at(now, expires, LOGIN_EXPIRY_MARGIN) if expires is not None else None
                if renew is not None:
                    _renew[creds] = renew
            token = creds.token
        if not token:
            raise RegistryError("the Google credentials gave no access token.",
                                "Check GOOGLE_APPLICATION_CREDENTIALS or the workers' service account.")
        return str(token), renew

    def identity(self) -> str:
        creds = self._google_credentials()
        # Touch the token endpoint so "credentials resolve" means they work, not just exist.
        self._credentials()
        email = getattr(creds, "service_account_email", None)
        if email and email != "default":
            who = f"service account {email}"
        elif getattr(creds, "client_id", None):
            who = f"authorized user (OAuth client {creds.client_id})"
        else:
            who = type(creds).__name__
        project = None if self._google is not None else _default_credentials()[1]
        return who + (f", project {project}" if project else "")
