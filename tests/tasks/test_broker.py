"""The broker transport: kombu's Redis transport, publishing through one client per pool."""

from __future__ import annotations

import base64
import json

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
