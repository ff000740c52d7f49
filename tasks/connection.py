"""The Redis client behind locks, records and events.

With ``BUILDQ_REDIS_URL`` unset, the embedded mode uses an in-process Redis
(fakeredis, with Lua) so the same scripts and keys work without a server.
"""

from __future__ import annotations

import functools
import os
import ssl
import threading
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import redis
from kombu.exceptions import OperationalError

from config.errors import ConfigError, ServiceError
from config.settings import Settings

#: Errors of a Redis that is restarting or unreachable (kombu's, when handing a task to the
#: broker): worth waiting out, not a failure.
REDIS_TROUBLE = (redis.ConnectionError, redis.TimeoutError, OperationalError)
#: How many leases a task waits for an unreachable Redis before it gives up. Every lease
#: has run out by then and the watchdog restarts the build for its requests.
REDIS_PATIENCE_LEASES = 10

_embedded_lock = threading.Lock()
_embedded: list[Any] = []


def _embedded_server() -> Any:
    # One server per process, also when the first callers race from two threads.
    with _embedded_lock:
        if not _embedded:
            import fakeredis

            _embedded.append(fakeredis.FakeServer())
        return _embedded[0]


def redis_client(settings: Settings) -> redis.Redis:
    if settings.embedded:
        import fakeredis

        return fakeredis.FakeRedis(server=_embedded_server(), decode_responses=True)
    return _remote_client(settings.redis_url or "")


@functools.cache
def _remote_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5,
                                health_check_interval=30)


#: ``ssl_cert_reqs`` values of a rediss:// URL, as redis-py and Celery spell them.
_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
#: TLS parameters a rediss:// URL may carry in its query.
_SSL_PATHS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_TLS_FORM = "rediss://:PASSWORD@host:port/0?ssl_ca_certs=/path/ca.pem&ssl_cert_reqs=required"


def redis_ssl_options(url: str) -> dict[str, Any] | None:
    """The TLS options of a ``rediss://`` URL for Celery, None for a plain ``redis://`` one.

    Celery's broker and result backend take TLS settings apart from the URL
    (``broker_use_ssl``, ``redis_backend_use_ssl``): without them its broker speaks plain
    text to the TLS port and its backend refuses a URL without ``ssl_cert_reqs``. The
    certificate is verified unless the URL says otherwise, as redis-py does.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() != "rediss":
        return None
    query = dict(parse_qsl(parts.query))
    reqs = query.get("ssl_cert_reqs", "required")
    level = _CERT_REQS.get(reqs.lower().removeprefix("cert_"))
    if level is None:
        raise ConfigError(f"BUILDQ_REDIS_URL has ssl_cert_reqs={reqs!r}.",
                          f"Use ssl_cert_reqs=required (or leave it out), e.g. {_TLS_FORM}.")
    options: dict[str, Any] = {"ssl_cert_reqs": level}
    for key in _SSL_PATHS:
        if query.get(key):
            path = unquote(query[key])
            if not os.access(path, os.R_OK) or not os.path.isfile(path):
                raise ConfigError(f"BUILDQ_REDIS_URL names {key}={path}, which is not a readable "
                                  "file here.", f"Give the path of a PEM file on this host: {_TLS_FORM}.")
            options[key] = path
    return options


def check_redis(settings: Settings) -> None:
    """Fail early, and clearly, when the configured Redis does not answer or let us in."""
    url = settings.redis_url or ""
    if not settings.embedded:
        redis_ssl_options(url)
    try:
        redis_client(settings).ping()
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError, ValueError) as exc:
        message, hint = describe_redis_failure(exc, url)
        raise ServiceError(message, hint) from None


def describe_redis_failure(exc: Exception, url: str) -> tuple[str, str]:
    """What went wrong reaching ``url`` and how to fix it, without the password."""
    where = redact_url(url)
    detail = scrub(str(exc), url).rstrip(".")
    text = detail.lower()
    tls = urlsplit(url).scheme.lower() == "rediss"
    if isinstance(exc, redis.AuthenticationError) or any(
            word in text for word in ("wrongpass", "noauth", "username-password", "invalid password",
                                      "authentication required")):
        return (f"Redis at {where} refused the login: {detail}.",
                "Set the password the server requires in BUILDQ_REDIS_URL "
                "(redis://:PASSWORD@host:port/0, or redis://USER:PASSWORD@... for an ACL user; "
                "percent-encode @, : and / in it).")
    if "certificate_verify_failed" in text or "certificate verify failed" in text:
        return (f"cannot reach Redis at {where}: its TLS certificate is not trusted ({detail}).",
                "Point ssl_ca_certs at the CA certificate that signed the server's, and reach the "
                f"server by a name its certificate holds: {_TLS_FORM}.")
    if tls and ("wrong version number" in text or "record layer failure" in text
                or "unexpected eof" in text or "eof occurred" in text):
        return (f"cannot reach Redis at {where} over TLS: the port does not speak TLS ({detail}).",
                "Use redis:// for a plain-text port, or the server's TLS port (--tls-port) "
                "with rediss://.")
    if not tls and ("connection reset" in text or "closed by server" in text):
        return (f"cannot reach Redis at {where}: the server closed the connection ({detail}).",
                f"If that port speaks TLS (--tls-port), use rediss:// with its CA: {_TLS_FORM}.")
    if tls and "timeout" in text:
        # A plain-text server waits for a command and never answers the TLS handshake.
        return (f"cannot reach Redis at {where}: {detail}.",
                "Start Redis or fix BUILDQ_REDIS_URL; if that port does not speak TLS, use "
                "redis:// for it.")
    return (f"cannot reach Redis at {where}: {detail}.",
            "Start Redis or fix BUILDQ_REDIS_URL (unset it to build in-process).")


def scrub(text: str, url: str) -> str:
    """``text`` with the URL's password, raw or percent-decoded, replaced by ``***``."""
    password = urlsplit(url).password
    for secret in {password, unquote(password or "")} - {None, ""}:
        text = text.replace(str(secret), "***")
    return text


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
