"""Who asked for a build, as the record names it.

Without message signing a request only *claims* a requester: the user and host of the
process that sent it (``buildq build``, a script's ``build_image.delay()``), carried in a
message header and recorded with ``requester_verified: false``. With signing on, the
requester is the subject of the certificate whose key signed the message, which the
worker verified (``requester_verified: true``).
"""

from __future__ import annotations

import getpass
import re
import socket
from typing import Any

from tasks.signing import take_signer

#: Message header carrying the claimed requester (never a build input, never a secret).
HEADER = "buildq_requester"
#: Longest requester kept; a header is input like any other.
MAX_LENGTH = 200
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")


def claimed() -> str:
    """``user@host`` of this process, as the request claims it."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def headers() -> dict[str, str]:
    """The headers a request carries to name its requester."""
    return {HEADER: claimed()}


def of_request(request: Any) -> str | None:
    """The requester a task's message claims: Celery puts custom headers on the request
    (a worker) or in its ``headers`` (an eager call)."""
    value = getattr(request, HEADER, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(HEADER)
    if not isinstance(value, str) or not value.strip():
        return None
    return _UNPRINTABLE.sub("?", value.strip())[:MAX_LENGTH]


def of_task(request: Any, signed: bool) -> tuple[str | None, bool]:
    """Who asked for the task being run, and whether a verified signature says so.

    ``signed``: this worker accepts signed messages only, so the message it runs was
    verified, and its signer's certificate subject is who asked. (An eager call in the
    embedded mode was never serialized: it falls back to the claim.)
    """
    if signed:
        signer = take_signer()
        if signer is not None:
            return signer, True
    return of_request(request), False
