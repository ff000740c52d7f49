"""Which pools have live workers: a short-lived key per worker, renewed while it runs."""

from __future__ import annotations

import redis

from tasks.keys import presence_key

#: Seconds a worker's presence key outlives its last renewal.
PRESENCE_TTL = 30


def announce(client: redis.Redis, pool: str, hostname: str) -> None:
    client.set(presence_key(pool, hostname), "1", ex=PRESENCE_TTL)


def pool_alive(client: redis.Redis, pool: str) -> bool:
    try:
        return any(True for _ in client.scan_iter(match=presence_key(pool, "*"), count=100))
    except redis.RedisError:
        return False
