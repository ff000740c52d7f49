"""SDK failures as buildq's context-store errors: one reading per SDK family.

Each family (botocore, Google's api_core/auth, azure-core) is read once into a
``Fault``: what went wrong, independent of the words. A store then says it in its own
terms through a ``Wording`` (its service name, its container, the permission or role it
needs), so every backend gives the same kind of message for the same kind of fault,
and a transient fault is always a ``TransientContextStoreError`` the chain retries.

The SDKs are imported only when an error is read: importing them costs a process that
merely names a store several tenths of a second.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from config.errors import ContextStoreError, TransientContextStoreError

if TYPE_CHECKING:
    from workers.stores.base import ContextStore


class Fault(enum.Enum):
    """What an SDK failure means for a store, whichever SDK raised it."""

    #: The service could not be reached, or dropped the connection (retried).
    UNREACHABLE = "unreachable"
    #: The service answered 5xx, 429 or "slow down" (retried).
    BUSY = "busy"
    #: The worker has no credentials at all.
    NO_CREDENTIALS = "no-credentials"
    #: The service refused the worker's credentials (wrong key, expired token).
    REJECTED = "rejected"
    #: The credentials are fine but lack a permission.
    DENIED = "denied"
    #: The bucket or container of the store does not exist.
    NO_CONTAINER = "no-container"
    #: The object does not exist.
    MISSING = "missing"
    #: The service answered with an error none of the above covers.
    ANSWERED = "answered"
    #: Anything else the library raised.
    FAILED = "failed"


@dataclass(frozen=True)
class SdkFault:
    fault: Fault
    #: The service's error code, or its HTTP status when it gave no code.
    code: str = ""
    #: The library's own words, for faults whose message carries them.
    detail: str = ""


@dataclass(frozen=True)
class SdkFamily:
    """Which exceptions belong to one SDK, and what each of them means."""

    name: str
    owns: Callable[[Exception], bool]
    read: Callable[[Exception], SdkFault]


def _any_credentials(code: str) -> str:
    return f"the worker's credentials ({code})"


def _no_permission(_action: str) -> str:
    return "Grant the worker's identity access to the store."


@dataclass(frozen=True)
class Wording:
    """How one store names itself and its fixes in errors."""

    #: What answered: "S3", "Cloud Storage".
    service: str
    #: What could not be reached: the service, or the endpoint it was pointed at.
    endpoint: str
    #: The store's container as a sentence names it: "the bucket 'ctx'".
    container: str
    #: Whose credentials are missing: "AWS" in "no AWS credentials".
    credentials: str = "usable"
    credentials_hint: str | None = None
    #: What the service rejected, given the service's code.
    rejected: Callable[[str], str] = _any_credentials
    rejected_hint: str | None = None
    #: How to grant what ``action`` needs.
    denied_hint: Callable[[str], str] = _no_permission


#: The hint of a store whose bucket or container is missing.
NO_CONTAINER_HINT = "Create it, or fix build-context-store in the launch-config."


class StoreErrors:
    """Turns one SDK family's failures into one store's errors."""

    def __init__(self, store: ContextStore, family: SdkFamily, wording: Wording) -> None:
        self.store = store
        self.family = family
        self.wording = wording

    def fault(self, exc: Exception) -> Fault:
        return self.family.read(exc).fault

    def error(self, exc: Exception, action: str, key: str = "") -> ContextStoreError:
        """Our error for ``exc``, raised while doing ``action`` on ``key`` (none: the store)."""
        read = self.family.read(exc)
        words = self.wording
        store = self.store
        where = store.uri(key) if key else store.url
        doing = f"{action} {where}"
        fault = read.fault
        if fault is Fault.UNREACHABLE:
            return TransientContextStoreError(f"cannot reach {words.endpoint} to {doing}: {read.detail}.")
        if fault is Fault.BUSY:
            return TransientContextStoreError(f"{words.service} answered {read.code} to {doing}.")
        if fault is Fault.NO_CREDENTIALS:
            return ContextStoreError(f"no {words.credentials} credentials to {doing}.",
                                     words.credentials_hint)
        if fault is Fault.REJECTED:
            return ContextStoreError(f"{words.service} rejected {words.rejected(read.code)} to {doing}.",
                                     words.rejected_hint)
        if fault is Fault.DENIED:
            return ContextStoreError(f"access denied to {doing}.", words.denied_hint(action))
        if fault is Fault.NO_CONTAINER:
            return ContextStoreError(f"{words.container} of context store {store.url} does not exist.",
                                     NO_CONTAINER_HINT)
        if fault is Fault.MISSING:
            return ContextStoreError(f"{where} does not exist.")
        if fault is Fault.ANSWERED:
            return ContextStoreError(f"{words.service} answered {read.code} to {doing}: {read.detail}.")
        return ContextStoreError(f"cannot {doing}: {read.detail}.")

    @contextlib.contextmanager
    def mapped(self, action: str, key: str = "") -> Iterator[None]:
        """Raise the SDK's errors inside the block as ours; anything else passes through."""
        try:
            yield
        except ContextStoreError:
            raise
        except Exception as exc:
            if not self.family.owns(exc):
                raise
            raise self.error(exc, action, key) from exc

    def mapper(self, action: str, key: str) -> Callable[[Exception], Exception]:
        """What a stream reading ``key`` raises in place of any exception of its reads."""
        return lambda exc: self.error(exc, action, key)


# --- botocore (S3) ---------------------------------------------------------------------

_AWS_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError",
                        "ServiceUnavailable", "Throttling", "ThrottlingException", "503", "500"}
_AWS_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                         "InvalidToken", "TokenRefreshRequired"}
_AWS_DENIED_CODES = {"AccessDenied", "403", "Forbidden"}
#: What S3 answers for a missing key (HEAD answers carry no body: a bare "404").
_AWS_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


def _botocore_owns(exc: Exception) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    return isinstance(exc, BotoCoreError | ClientError)


def _botocore_read(exc: Exception) -> SdkFault:
    # botocore's messages never carry credentials, so its words may be shown.
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(exc, ConnectionError | HTTPClientError):
        return SdkFault(Fault.UNREACHABLE, detail=str(exc))
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return SdkFault(Fault.NO_CREDENTIALS)
    if not isinstance(exc, ClientError):
        return SdkFault(Fault.FAILED, detail=str(exc))
    error: dict[str, Any] = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    answer = code or str(status)
    if code in _AWS_TRANSIENT_CODES or status >= 500 or status == 429:
        return SdkFault(Fault.BUSY, answer)
    if code == "NoSuchBucket":
        return SdkFault(Fault.NO_CONTAINER, code)
    if code in _AWS_CREDENTIAL_CODES:
        return SdkFault(Fault.REJECTED, code)
    if code in _AWS_DENIED_CODES or status == 403:
        return SdkFault(Fault.DENIED, answer)
    if code in _AWS_MISSING_CODES:
        return SdkFault(Fault.MISSING, code)
    return SdkFault(Fault.ANSWERED, answer, str(error.get("Message") or exc))


BOTOCORE = SdkFamily("botocore", _botocore_owns, _botocore_read)


# --- Google api_core / auth (Cloud Storage) --------------------------------------------


def _google_owns(exc: Exception) -> bool:
    import requests
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth

    # The storage client lets requests' and the socket's own errors through as well.
    return isinstance(exc, api.GoogleAPICallError | api.RetryError | auth.GoogleAuthError
                      | requests.RequestException | ConnectionError | TimeoutError)


def _google_read(exc: Exception) -> SdkFault:
    import requests
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth

    if isinstance(exc, auth.DefaultCredentialsError):
        return SdkFault(Fault.NO_CREDENTIALS)
    if isinstance(exc, requests.ConnectionError | requests.Timeout | auth.TransportError
                  | ConnectionError | TimeoutError | api.RetryError):
        return SdkFault(Fault.UNREACHABLE, detail=str(exc))
    if isinstance(exc, api.ServerError | api.TooManyRequests):
        return SdkFault(Fault.BUSY, str(exc.code))
    if isinstance(exc, api.Forbidden | api.Unauthorized):
        return SdkFault(Fault.DENIED, str(exc.code))
    if isinstance(exc, api.NotFound):
        # GCS tells a missing bucket from a missing object only in its message.
        message = str(exc.message).lower()
        if "bucket does not exist" in message or "no such bucket" in message:
            return SdkFault(Fault.NO_CONTAINER, str(exc.code))
        return SdkFault(Fault.MISSING, str(exc.code))
    if isinstance(exc, api.GoogleAPICallError):
        return SdkFault(Fault.ANSWERED, str(exc.code), str(exc.message))
    return SdkFault(Fault.FAILED, detail=str(exc))


GOOGLE = SdkFamily("google", _google_owns, _google_read)


# --- azure-core (Blob Storage) ---------------------------------------------------------

_AZURE_TRANSIENT_CODES = {"ServerBusy", "OperationTimedOut"}
_AZURE_DENIED_CODES = {"AuthorizationFailure"}


def _azure_owns(exc: Exception) -> bool:
    from azure.core.exceptions import AzureError

    return isinstance(exc, AzureError)


def _azure_read(exc: Exception) -> SdkFault:
    from azure.core import exceptions as az

    if isinstance(exc, az.ServiceRequestError | az.ServiceResponseError | az.IncompleteReadError):
        return SdkFault(Fault.UNREACHABLE, detail=str(exc))
    code = str(getattr(exc, "error_code", "") or "")
    status = int(getattr(getattr(exc, "response", None), "status_code", 0) or 0)
    answer = code or str(status)
    if isinstance(exc, az.HttpResponseError) and (status >= 500 or status == 429
                                                  or code in _AZURE_TRANSIENT_CODES):
        return SdkFault(Fault.BUSY, answer)
    if code == "ContainerNotFound":
        return SdkFault(Fault.NO_CONTAINER, code)
    # A token the identity could not get (DefaultAzureCredential) has no status at all.
    if code == "AuthenticationFailed" or (isinstance(exc, az.ClientAuthenticationError)
                                          and status in (0, 401)):
        return SdkFault(Fault.REJECTED, answer)
    if status == 403 or code.startswith("AuthorizationPermission") or code in _AZURE_DENIED_CODES:
        return SdkFault(Fault.DENIED, answer)
    if isinstance(exc, az.ResourceNotFoundError):
        return SdkFault(Fault.MISSING, answer)
    return SdkFault(Fault.FAILED, code, code or type(exc).__name__)


AZURE = SdkFamily("azure", _azure_owns, _azure_read)
