"""A RabbitMQ queue as a source (aio-pika, robust connection): ``pip install pycloister[rabbitmq]``.

Start one on every node::

    def key(body, meta):                      # meta: SourceMessage
        return body["key"], body["seq"]       # -> handle_cast(body["seq"], body["key"], ...)

    source = await RabbitMQSource.start(manager, queue="orders", key=key)
    ...
    await source.stop()

By default (``mode="partitioned"``) the source reads one queue per partition,
``orders.0`` ... ``orders.<partitions-1>`` (declared durable, single-active-consumer, by
every node as it starts), and each node consumes only the partitions the ring gives it.
Publishers send a key's messages to its partition's queue through the default exchange —
no plugin needed::

    from cloister.sources import partition_name

    await channel.default_exchange.publish(
        aio_pika.Message(body, message_id=msg_id),
        routing_key=partition_name("orders", order_id, partitions=128),
    )

A key's messages are then stored in the order they were published, and the intake spreads
over the nodes as the workers do. Single-active-consumer on every partition queue is the
broker's own guard: should two nodes ever subscribe to one partition (one leaving, one
taking over), RabbitMQ feeds one of them only.

Each message is acknowledged only after the inbox stored it; a malformed one is parked
and acknowledged; one the inbox cannot take right now stays unacknowledged and is
retried, then requeued (``basic.nack`` with requeue). The default message id (the dedup
id) is the AMQP ``message_id`` property when the publisher set one.

``mode="shared"`` reads the one queue ``queue`` as competing consumers: the load spreads,
but two messages for one key may be stored out of order when they are in flight on two
nodes at once. ``single_active_consumer=True`` (declared with the queue) makes RabbitMQ
feed one node at a time, which keeps the queue's order but lets one node read everything.
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


async def declare_partition_queues(
    channel: Any, queue: str, partitions: int, arguments: dict[str, Any] | None = None
) -> list[Any]:
    """Declare the partition queues ``<queue>.0`` ... (durable, single-active-consumer,
    plus ``arguments``) on an aio-pika ``channel``, as the source does when it starts;
    a publisher that may run first calls it so that nothing it sends is unroutable."""
    declared = {**(arguments or {}), "x-single-active-consumer": True}
    return [
        await channel.declare_queue(f"{queue}.{p}", durable=True, arguments=declared)
        for p in range(partitions)
    ]


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

    def __init__(self, meta: SourceMessage, message: Any, partition: int | None) -> None:
        super().__init__(meta, partition)
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
    - ``queue``: the queue to consume (shared mode), or the prefix of the partition queues
      ``<queue>.<p>`` (partitioned mode, the default; see the module documentation).
    - ``prefetch``: unacknowledged messages this node holds at most, per partition in
      partitioned mode (default 256).
    - ``declare``: declare the queue(s) (durable) if they do not exist (default True); with
      False they must exist. ``arguments`` go into the declaration, and
      ``single_active_consumer`` too in shared mode (every partition queue is
      single-active-consumer); a queue that exists with other arguments is refused by
      RabbitMQ.
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
        # partitioned mode: a channel per partition read (closing it gives back the rest)
        self._partition_channels: dict[int, Any] = {}
        self._partition_consumers: dict[int, tuple[Any, str]] = {}

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
        if self.partitions is not None:
            await self._declare_partitions()
            return
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

    async def _declare_partitions(self) -> None:
        assert self.partitions is not None
        try:
            if self.declare:
                await declare_partition_queues(
                    self._channel, self.queue_name, self.partitions, self.arguments
                )
            else:
                for p in range(self.partitions):
                    await self._channel.get_queue(f"{self.queue_name}.{p}", ensure=True)
        except Exception as exc:
            hint = (
                "one exists with other arguments (a queue first declared without "
                "single-active-consumer?); delete it or pass declare=False to use them as "
                "they are"
                if self.declare
                else "one does not exist; create them or pass declare=True"
            )
            raise SourceError(
                f"source {self.name}: cannot use the partition queues "
                f"{self.queue_name}.0..{self.partitions - 1} ({describe(exc)}): {hint}"
            ) from exc

    async def _start_partition(self, partition: int) -> None:
        channel = await self._connection.channel()
        self._partition_channels[partition] = channel
        await channel.set_qos(prefetch_count=self.prefetch)
        queue = await channel.get_queue(f"{self.queue_name}.{partition}", ensure=False)

        async def on_message(message: Any) -> None:
            self._accept(self._delivery(message, partition))

        self._partition_consumers[partition] = (queue, await queue.consume(on_message))

    async def _stop_partition(self, partition: int) -> None:
        consumer = self._partition_consumers.pop(partition, None)
        if consumer is not None:
            queue, tag = consumer
            await queue.cancel(tag)

    async def _forget_partition(self, partition: int) -> None:
        channel = self._partition_channels.pop(partition, None)
        if channel is not None and not channel.is_closed:
            await channel.close()  # whatever is still unacknowledged goes back, in order

    async def _on_message(self, message: Any) -> None:
        self._accept(self._delivery(message, None))

    def _delivery(self, message: Any, partition: int | None) -> _AmqpDelivery:
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
        return _AmqpDelivery(meta, message, partition)

    async def _stop_intake(self) -> None:
        if self._queue is not None and self._consumer_tag is not None:
            tag, self._consumer_tag = self._consumer_tag, None
            await self._queue.cancel(tag)

    async def _disconnect(self) -> None:
        for partition in list(self._partition_channels):
            try:
                await self._forget_partition(partition)
            except Exception as exc:
                self.log.debug("source %s: closing a channel: %s", self.name, describe(exc))
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
