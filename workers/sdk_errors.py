"""What an SDK's exception means, whichever SDK raised it: one reading per SDK family.

Each family (botocore, Google's api_core/auth, azure-core) is read once into a ``Fault``:
what went wrong, independent of the words. The context stores (``workers.stores.errors``)
and the ECR registry backend both read botocore here, so an unreachable endpoint, a
throttled call or refused credentials mean the same wherever AWS answered; each says it
in its own terms.

The SDKs are imported only when an error is read: importing them costs a process that
never meets an error several tenths of a second.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class Fault(enum.Enum):
    """What an SDK failure means, whichever SDK raised it."""

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
    #: The bucket or container (of a store) does not exist.
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


def _sentence(text: str) -> str:
    """A library's words, to be set into a sentence of ours that adds its own full stop."""
    return text.strip().rstrip(".")


# --- botocore (S3, ECR) ------------------------------------------------------------------

# S3 answers in its own REST dialect (SlowDown, AccessDenied), the JSON services such as
# ECR in theirs (ThrottlingException, AccessDeniedException); no code means one thing to
# one service and another to the other, so one set per meaning serves both.
_AWS_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError",
                        "ServiceUnavailable", "Throttling", "ThrottlingException", "503", "500",
                        "ServiceUnavailableException", "ServerException", "InternalFailure",
                        "RequestLimitExceeded"}
_AWS_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                         "InvalidToken", "TokenRefreshRequired", "UnrecognizedClientException",
                         "InvalidSignatureException", "ExpiredTokenException", "InvalidClientTokenId"}
_AWS_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "AccessDeniedException",
                     "UnauthorizedOperation"}
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
        return SdkFault(Fault.UNREACHABLE, detail=_sentence(str(exc)))
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return SdkFault(Fault.NO_CREDENTIALS)
    if not isinstance(exc, ClientError):
        return SdkFault(Fault.FAILED, detail=_sentence(str(exc)))
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
    return SdkFault(Fault.ANSWERED, answer, _sentence(str(error.get("Message") or exc)))


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
        return SdkFault(Fault.UNREACHABLE, detail=_sentence(str(exc)))
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
        return SdkFault(Fault.ANSWERED, str(exc.code), _sentence(str(exc.message)))
    return SdkFault(Fault.FAILED, detail=_sentence(str(exc)))


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
        return SdkFault(Fault.UNREACHABLE, detail=_sentence(str(exc)))
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
