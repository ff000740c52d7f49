"""One notification: an HTTP POST of a record, signed with an HMAC of its body.

Headers: ``Content-Type: application/json``, ``X-Buildq-Delivery`` (the same id on every
retry of one delivery, so a receiver can drop repeats), ``X-Buildq-Event: request.ended``
and, with a secret, ``X-Buildq-Signature: sha256=<hex HMAC-SHA256 of the body>``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.error
import urllib.request
from typing import Any

from config.errors import BuildqError, TransientError

#: Seconds a receiver has to answer one POST.
POST_TIMEOUT = 10.0


class NotifyError(BuildqError):
    """The receiver refused the notification (a 4xx): retrying would not help."""

    kind = "notify"


class TransientNotifyError(TransientError, NotifyError):
    """The receiver answered 5xx or could not be reached: worth a retry."""


def body_of(record: dict[str, Any]) -> bytes:
    """The exact bytes POSTed (and signed)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def signature(body: bytes, secret: str) -> str:
    """The ``X-Buildq-Signature`` header's value for ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post(url: str, body: bytes, secret: str | None, delivery: str,
         timeout: float = POST_TIMEOUT) -> int:
    """POST ``body`` to ``url``; the receiver's status when it is 2xx or 3xx."""
    headers = {"Content-Type": "application/json", "User-Agent": "buildq",
               "X-Buildq-Delivery": delivery, "X-Buildq-Event": "request.ended"}
    if secret:
        headers["X-Buildq-Signature"] = signature(body, secret)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise TransientNotifyError(f"{url} answered {exc.code}.") from None
        raise NotifyError(f"{url} refused the notification with {exc.code}.",
                          "Check the receiver's URL and its signature check.") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TransientNotifyError(f"cannot reach {url}: {reason}.") from None
