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


def of_task(request: Any) -> tuple[str | None, bool]:
    """Who a task's message says asked, and whether that is verified."""
    return of_request(request), False
