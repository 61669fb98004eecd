"""Broker sources: messages from a broker queue into the durable inbox, acked once stored.

Run a source on every node; any node may take any message, and the inbox brings it to
the worker that owns its key (the broker in ``seed/zero-cost-distribution.md``)::

    from cloister.sources import RabbitMQSource

    def key(body, meta):                       # body: decoded JSON; meta: SourceMessage
        return body["key"], body["payload"]    # or (key, message, msg_id)

    async with RabbitMQSource(manager, queue="orders", key=key) as source:
        ...                                     # source.counters: received, stored, ...

- :class:`RabbitMQSource`: a RabbitMQ queue (aio-pika; ``pip install pycloister[rabbitmq]``).
- :class:`JetStreamSource`: a NATS JetStream stream, through a durable pull consumer.
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
from cloister.sources.rabbitmq import RabbitMQSource

__all__ = [
    "Decoder",
    "HasInbox",
    "InboxTarget",
    "JetStreamSource",
    "KeyFunction",
    "MissingDependencyError",
    "RabbitMQSource",
    "Source",
    "SourceError",
    "SourceMessage",
]
