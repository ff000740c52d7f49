"""Which pools have live workers: a short-lived key per worker, renewed while it runs."""

from __future__ import annotations

import json

import redis

from tasks.keys import presence_key

#: Seconds a worker's presence key outlives its last renewal.
PRESENCE_TTL = 30


def announce(client: redis.Redis, pool: str, hostname: str,
             platforms: list[str] | None = None) -> None:
    """Say this worker is alive; a docker-pool worker says which platforms it builds."""
    value = json.dumps({"platforms": platforms}) if platforms is not None else "1"
    client.set(presence_key(pool, hostname), value, ex=PRESENCE_TTL)


def platforms_of(client: redis.Redis, pool: str) -> dict[str, list[str]]:
    """The platforms each live worker of ``pool`` advertised, by its node name (workers
    that advertised none are left out)."""
    keys = list(client.scan_iter(match=presence_key(pool, "*"), count=100))
    found: dict[str, list[str]] = {}
    for key, raw in zip(keys, client.mget(keys) if keys else [], strict=True):
        try:
            platforms = json.loads(raw)["platforms"] if raw else None
        except (ValueError, TypeError, KeyError):
            continue
        if isinstance(platforms, list):
            name = key.decode() if isinstance(key, bytes) else str(key)
            found[name.removeprefix(presence_key(pool, ""))] = [str(p) for p in platforms]
    return found


def pool_alive(client: redis.Redis, pool: str) -> bool:
    try:
        return any(True for _ in client.scan_iter(match=presence_key(pool, "*"), count=100))
    except redis.RedisError:
        return False
