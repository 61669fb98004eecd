"""A RabbitMQ queue as a source (aio-pika, robust connection): ``pip install pycloister[rabbitmq]``.

Start one on every node; RabbitMQ spreads the queue's messages over them::

    def key(body, meta):                      # meta: SourceMessage
        return body["key"], body["seq"]       # -> handle_cast(body["seq"], body["key"], ...)

    source = await RabbitMQSource.start(manager, queue="orders", key=key)
    ...
    await source.stop()

Each message is acknowledged only after the inbox stored it; a malformed one is parked
and acknowledged; one the inbox cannot take right now stays unacknowledged and is
retried, then requeued (``basic.nack`` with requeue). The default message id (the dedup
id) is the AMQP ``message_id`` property when the publisher set one.

With several nodes consuming, two messages for one key may be stored out of order when
they are in flight on two nodes at once. ``single_active_consumer=True`` (declared with
the queue) makes RabbitMQ feed one node at a time, the others standing by, which keeps
the queue's order exactly; the inbox still spreads the work over every node.
"""

from __future__ import annotations

import importlib
from typing import Any, Unpack

from cloister.errors import ConfigurationError
from cloister.sources.base import (
    Delivery,
    InboxTarget,
    KeyFunction,
    MissingDependencyError,
    Source,
    SourceError,
    SourceMessage,
    SourceOptions,
    describe,
    mask_url,
)

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"


def import_aio_pika() -> Any:
    """The ``aio_pika`` module, or a clear error naming the extra to install."""
    try:
        return importlib.import_module("aio_pika")
    except ImportError as exc:
        raise MissingDependencyError(
            "RabbitMQSource needs aio-pika, which is not installed: "
            "pip install 'pycloister[rabbitmq]'"
        ) from exc


class _AmqpDelivery(Delivery):
    __slots__ = ("message",)

    def __init__(self, meta: SourceMessage, message: Any) -> None:
        super().__init__(meta)
        self.message = message

    async def ack(self) -> None:
        await self.message.ack()

    async def release(self) -> None:
        await self.message.nack(requeue=True)

    def stale(self) -> bool:
        return bool(self.message.channel.is_closed)


class RabbitMQSource(Source):
    """Messages from a RabbitMQ queue into an inbox (a manager's).

    - ``url``: the broker (default ``amqp://guest:guest@127.0.0.1:5672/``), or
      ``connection``: an aio-pika connection of yours (then it is not closed on stop).
    - ``queue``: the queue to consume.
    - ``prefetch``: unacknowledged messages this node holds at most (default 256).
    - ``declare``: declare the queue (durable) if it does not exist (default True); with
      False it must exist. ``arguments`` and ``single_active_consumer`` go into the
      declaration (a queue that exists with other arguments is refused by RabbitMQ).
    - plus the options of :class:`~cloister.sources.Source` (``key``, ``decode``, ...).
    """

    kind = "rabbitmq"

    def __init__(
        self,
        target: InboxTarget,
        url: str = DEFAULT_URL,
        *,
        queue: str,
        key: KeyFunction,
        prefetch: int = 256,
        declare: bool = True,
        arguments: dict[str, Any] | None = None,
        single_active_consumer: bool = False,
        connection: Any = None,
        **options: Unpack[SourceOptions],
    ) -> None:
        if not isinstance(queue, str) or not queue:
            raise ConfigurationError(f"queue must be a non-empty string, got {queue!r}")
        if not isinstance(prefetch, int) or prefetch < 1:
            raise ConfigurationError(f"prefetch must be an int >= 1, got {prefetch!r}")
        options.setdefault("name", f"rabbitmq.{queue}")
        super().__init__(target, key=key, **options)
        self.url = url
        self.queue_name = queue
        self.prefetch = prefetch
        self.declare = declare
        self.arguments = dict(arguments or {})
        if single_active_consumer:
            self.arguments["x-single-active-consumer"] = True
        self._connection: Any = connection
        self._owns_connection = connection is None
        self._channel: Any = None
        self._queue: Any = None
        self._consumer_tag: str | None = None

    async def _connect(self) -> None:
        aio_pika = import_aio_pika()
        if self._connection is None:
            try:
                self._connection = await aio_pika.connect_robust(self.url)
            except Exception as exc:
                raise SourceError(
                    f"source {self.name}: cannot connect to RabbitMQ at {mask_url(self.url)} "
                    f"({describe(exc)}); is the broker running and the URL right?"
                ) from exc
        self._channel = await self._connection.channel()
        await self._channel.set_qos(prefetch_count=self.prefetch)
        try:
            if self.declare:
                self._queue = await self._channel.declare_queue(
                    self.queue_name, durable=True, arguments=self.arguments or None
                )
            else:
                self._queue = await self._channel.get_queue(self.queue_name, ensure=True)
        except Exception as exc:
            hint = (
                "it exists with other arguments; declare=False uses it as it is"
                if self.declare
                else "it does not exist; create it or pass declare=True"
            )
            raise SourceError(
                f"source {self.name}: cannot use queue {self.queue_name!r} ({describe(exc)}): "
                f"{hint}"
            ) from exc
        self._consumer_tag = await self._queue.consume(self._on_message)

    async def _on_message(self, message: Any) -> None:
        headers = message.headers
        meta = SourceMessage(
            source=self.name,
            body=message.body,
            msg_id=message.message_id,
            subject=message.routing_key,
            headers=headers if headers is not None else {},
            redelivered=bool(message.redelivered),
            content_type=message.content_type,
            raw=message,
        )
        self._accept(_AmqpDelivery(meta, message))

    async def _stop_intake(self) -> None:
        if self._queue is not None and self._consumer_tag is not None:
            tag, self._consumer_tag = self._consumer_tag, None
            await self._queue.cancel(tag)

    async def _disconnect(self) -> None:
        channel, self._channel = self._channel, None
        connection, self._connection = self._connection, None
        try:
            if channel is not None:
                await channel.close()  # whatever is still unacknowledged goes back
        except Exception as exc:
            self.log.debug("source %s: closing the channel: %s", self.name, describe(exc))
        try:
            if connection is not None and self._owns_connection:
                await connection.close()
        except Exception as exc:
            self.log.debug("source %s: closing the connection: %s", self.name, describe(exc))
