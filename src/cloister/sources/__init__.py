"""Broker sources: messages from a broker queue into the durable inbox, acked once stored.

Run a source on every node that runs the manager; the inbox brings each message to the
worker that owns its key (the broker in ``seed/zero-cost-distribution.md``)::

    from cloister.sources import RabbitMQSource

    def key(body, meta):                       # body: decoded JSON; meta: SourceMessage
        return body["key"], body["payload"]    # or (key, message, msg_id)

    async with RabbitMQSource(manager, queue="orders", key=key) as source:
        ...                                     # source.counters: received, stored, ...

- :class:`RabbitMQSource`: a RabbitMQ queue (aio-pika; ``pip install pycloister[rabbitmq]``).
- :class:`JetStreamSource`: a NATS JetStream stream, through durable pull consumers.
- :class:`RedisStreamsSource`: Redis streams through a consumer group (redis-py;
  ``pip install pycloister[redis]``).
- By default a source reads partitions (one queue, stream or subject per partition; a
  publisher sends key ``k`` to :func:`partition_name` ``(prefix, k, partitions)``) and each node
  reads the partitions the ring gives it: a key's order is kept and the intake spreads
  (:mod:`cloister.sources.partitions`). ``mode="shared"`` reads one queue, competing.
- A source takes the manager (anything with an ``inbox``: :class:`HasInbox`) or the
  :class:`~cloister.store.inbox.Inbox` itself.
- :class:`Source`: what they share (see :mod:`cloister.sources.base` for the guarantees).
"""

from __future__ import annotations

from cloister.sources.base import (
    HasInbox,
    InboxTarget,
    KeyFunction,
    MissingDependencyError,
    Source,
    SourceError,
    SourceMessage,
)
from cloister.sources.decoding import Decoder
from cloister.sources.jetstream import JetStreamSource
from cloister.sources.partitions import partition_name, partition_of
from cloister.sources.rabbitmq import RabbitMQSource
from cloister.sources.redis_streams import RedisStreamsSource

__all__ = [
    "Decoder",
    "HasInbox",
    "InboxTarget",
    "JetStreamSource",
    "KeyFunction",
    "MissingDependencyError",
    "RabbitMQSource",
    "RedisStreamsSource",
    "Source",
    "SourceError",
    "SourceMessage",
    "partition_name",
    "partition_of",
]
