"""The broker transport: kombu's Redis transport, publishing through one client per pool."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from typing import Any

import redis
from kombu import Connection, Exchange, Queue

from tasks import broker


def test_redis_urls_use_the_transport_and_its_publishes_arrive(redis_url: str) -> None:
    broker.install()
    queue = Queue("buildq-test-broker", Exchange("buildq-test-broker"), "k")
    events = Exchange("buildq-test-events", type="fanout")
    # Fanout messages (Celery's events) are Redis PUBLISHes: listen as Flower's receiver would.
    listener = redis.Redis.from_url(redis_url).pubsub()
    listener.psubscribe("*buildq-test-events*")
    try:
        assert listener.get_message(timeout=5) is not None  # the subscription
        with Connection(redis_url) as conn:
            assert isinstance(conn.transport, broker.Transport)
            # The URL kombu prints back keeps its scheme (Flower's broker view parses it).
            assert conn.as_uri().startswith("redis://")
            channel = conn.default_channel
            producer = conn.Producer(serializer="json")
            for n in range(3):
                producer.publish({"n": n}, exchange=queue.exchange, routing_key="k",
                                 declare=[queue])
                producer.publish({"event": n}, exchange=events, declare=[events])
            got = [queue(channel).get(no_ack=True) for _ in range(3)]
            assert [m.payload for m in got if m is not None] == [{"n": 0}, {"n": 1}, {"n": 2}]
        heard = [listener.get_message(timeout=5) for _ in range(3)]
        bodies = [json.loads(base64.b64decode(json.loads(m["data"])["body"])) if m else None
                  for m in heard]
        assert bodies == [{"event": n} for n in range(3)]
    finally:
        listener.close()


def test_one_publishing_client_per_pool(redis_url: str) -> None:
    broker.install()
    with Connection(redis_url) as conn:
        channel = conn.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second and first.connection_pool is channel.pool
        given = object()
        with channel.conn_or_acquire(given) as passed:
            assert passed is given
        # A reconnect (or a fork) drops the pools: the next publish gets a new client on
        # the new pool, never the old pool's.
        channel._disconnect_pools()
        with channel.conn_or_acquire() as third:
            assert third is not first and third.connection_pool is channel.pool


def _monitored(redis_url: str, act: Any) -> list[tuple[str, list[str]]]:
    """(client address, command words) of every command Redis ran while ``act()`` ran."""
    seen: list[tuple[str, list[str]]] = []
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    with client.monitor() as monitor:
        stop = f"buildq-test-monitor-end-{uuid.uuid4().hex}"

        def listen() -> None:
            for entry in monitor.listen():
                words = str(entry["command"]).split()
                if words[-1:] == [stop]:
                    return
                seen.append((f"{entry.get('client_address')}:{entry.get('client_port')}", words))

        thread = threading.Thread(target=listen, daemon=True)
        thread.start()
        time.sleep(0.2)  # MONITOR answers OK before it streams
        act()
        redis.Redis.from_url(redis_url).echo(stop)
        thread.join(10)
    return seen


def _sequence(seen: list[tuple[str, list[str]]], names: set[str]) -> list[tuple[str, str]]:
    return [(address, words[0].upper()) for address, words in seen if words[0].upper() in names]


def test_riders_go_ahead_of_the_message_in_its_batch(redis_url: str) -> None:
    broker.install()
    queue = Queue("buildq-test-riders", Exchange("buildq-test-riders"), "k")
    events = Exchange("buildq-test-riders-events", type="fanout")
    note = [("hset", "buildq-test-riders-note", "id", "v"),
            ("psetex", "buildq-test-riders-lease", 5000, "1")]

    with Connection(redis_url) as conn:
        producer = conn.Producer(serializer="json")
        producer.publish({"warm": 1}, exchange=queue.exchange, routing_key="k", declare=[queue])
        producer.publish({"warm": 1}, exchange=events, declare=[events])

        def send() -> None:
            with producer.batch(), broker.riding(note):
                producer.publish({"n": 1}, exchange=queue.exchange, routing_key="k")
                producer.publish({"event": 1}, exchange=events)
                producer.publish({"n": 2}, exchange=queue.exchange, routing_key="k")

        seen = _monitored(redis_url, send)
        order = _sequence(seen, {"HSET", "PSETEX", "LPUSH", "PUBLISH"})
        # In order, on one connection, and the note only ahead of the first message.
        assert [name for _, name in order] == ["HSET", "PSETEX", "LPUSH", "PUBLISH", "LPUSH"], seen
        assert len({address for address, _ in order}) == 1, order
        client = redis.Redis.from_url(redis_url)
        assert client.hget("buildq-test-riders-note", "id") == b"v"
        assert 0 < client.pttl("buildq-test-riders-lease") <= 5000


def test_riders_without_a_batch_still_go_first(redis_url: str) -> None:
    broker.install()
    queue = Queue("buildq-test-riders-plain", Exchange("buildq-test-riders-plain"), "k")
    note = [("hset", "buildq-test-riders-plain-note", "id", "v")]
    with Connection(redis_url) as conn:
        producer = conn.Producer(serializer="json")
        producer.publish({"warm": 1}, exchange=queue.exchange, routing_key="k", declare=[queue])

        def send() -> None:
            with broker.riding(note):
                producer.publish({"n": 1}, exchange=queue.exchange, routing_key="k")
                producer.publish({"n": 2}, exchange=queue.exchange, routing_key="k")

        order = _sequence(_monitored(redis_url, send), {"HSET", "LPUSH"})
        assert [name for _, name in order] == ["HSET", "LPUSH", "LPUSH"], order
