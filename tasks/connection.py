"""The Redis client behind locks, records and events.

With ``BUILDQ_REDIS_URL`` unset, the embedded mode uses an in-process Redis
(fakeredis, with Lua) so the same scripts and keys work without a server.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import redis

from config.errors import ServiceError
from config.settings import Settings

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


def check_redis(settings: Settings) -> None:
    """Fail early, and clearly, when the configured Redis does not answer."""
    try:
        redis_client(settings).ping()
    except (redis.ConnectionError, redis.TimeoutError, ValueError) as exc:
        raise ServiceError(
            f"cannot reach Redis at {redact_url(settings.redis_url or '')}: {str(exc).rstrip('.')}.",
            "Start Redis or fix BUILDQ_REDIS_URL (unset it to build in-process).",
        ) from None


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
