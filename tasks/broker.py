"""kombu's Redis transport, with one publishing client per channel instead of one per message.

kombu builds a new ``redis.Redis`` for every message it publishes outside its event loop:
each task sent, each fanout event (``task-sent`` from a caller; ``task-received`` and
``task-succeeded`` from a worker). Building one costs ~70 µs of CPU in redis-py 8 (its
reply-callback table is filled anew each time), a few times per request on each side.
The client only borrows connections from the channel's pool per command, so one per pool
serves every message; a new pool (after a reconnect or a fork) gets a new client.

It also lets a caller send Redis commands of its own ahead of its next message, in the
same round trip (:func:`riding`): a build request's submission note goes with it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from kombu import transport as kombu_transports
from kombu.transport import redis as kombu_redis

#: Commands, as (method, *arguments), to send ahead of this context's next queued message.
_riders: ContextVar[Sequence[tuple[Any, ...]]] = ContextVar("buildq_riders", default=())


@contextmanager
def riding(commands: Sequence[tuple[Any, ...]]) -> Iterator[None]:
    """Send ``commands`` ahead of the next message published to a queue in this context, on
    its connection and in order before it; in the same round trip when the producer
    publishes in a batch (``producer.batch()``), the task-sent event included."""
    token = _riders.set(commands)
    try:
        yield
    finally:
        _riders.reset(token)


class Channel(kombu_redis.Channel):
    _publisher: tuple[Any, Any] | None = None

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        riders = _riders.get()
        if riders:
            batch = kwargs.get("_publish_batch")
            if batch is not None:
                for name, *args in riders:
                    batch.add(name, *args)
            else:
                with self.conn_or_acquire() as client:
                    pipe = client.pipeline(transaction=False)
                    for name, *args in riders:
                        getattr(pipe, name)(*args)
                    pipe.execute()
            # Sent (or in the batch): not again should kombu retry the message, nor ahead
            # of another one.
            _riders.set(())
        super()._put(queue, message, **kwargs)

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool
        if self._publisher is None or self._publisher[0] is not pool:
            self._publisher = (pool, self._create_client())
        yield self._publisher[1]


class Transport(kombu_redis.Transport):
    Channel = Channel


def install() -> None:
    """Make ``redis://`` and ``rediss://`` broker URLs use this transport in this process.

    By kombu's scheme aliases rather than Celery's ``broker_transport``, which would also
    rename the scheme in every URL kombu prints back (Flower's broker view parses it).
    """
    for scheme in ("redis", "rediss"):
        kombu_transports.TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
