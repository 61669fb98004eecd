"""A NATS JetStream stream (one you already have) as a source.

Every node runs the source with the same ``durable`` name::

    def key(body, meta):                      # meta.subject, meta.sequence, meta.headers
        return body["key"], body["seq"]

    source = await JetStreamSource.start(
        manager, servers="nats://127.0.0.1:4222", stream="ORDERS", subject="orders",
        durable="orders-inbox", key=key,
    )

By default (``mode="partitioned"``) a publisher sends a key's messages to its partition's
subject, ``orders.<partition>`` (the stream captures ``orders.*``)::

    from cloister.sources import partition_name

    await js.publish(partition_name("orders", order_id, partitions=128), body)

and the source reads each partition through its own durable pull consumer
(``<durable>-<partition>``, filtered on that subject, created from the start of the
stream when missing); each node fetches only from the partitions the ring gives it, so a
key's messages are stored in the order the stream holds them. ``mode="shared"``: every
node fetches from one durable consumer (``subject``, if given, is its filter, wildcards
allowed) and JetStream hands each message to one of them — no order between nodes.

A message is acknowledged only after the inbox stored it; a malformed one is parked and
acknowledged; one the inbox cannot take right now stays unacknowledged (kept alive with
``in_progress``), is retried and then given back with ``nak`` so any node may take it. The
default message id is the ``Nats-Msg-Id`` header when the publisher set one, otherwise
``"<stream>:<stream sequence>"``, which is the same on every redelivery: a message stored
twice (its ack lost) is dropped by the inbox the second time.
"""

from __future__ import annotations

import asyncio
from typing import Any, Unpack

import nats
from nats.js import api
from nats.js.errors import NotFoundError

from cloister._backoff import Backoff
from cloister._tasks import wait_event
from cloister.errors import ConfigurationError
from cloister.sources.base import (
    Delivery,
    InboxTarget,
    KeyFunction,
    Source,
    SourceError,
    SourceMessage,
    SourceOptions,
    check_batch,
    check_names,
    describe,
)

MSG_ID_HEADER = "Nats-Msg-Id"


class _JetStreamDelivery(Delivery):
    __slots__ = ("msg",)

    def __init__(self, meta: SourceMessage, msg: Any, partition: int | None) -> None:
        super().__init__(meta, partition)
        self.msg = msg

    async def ack(self) -> None:
        await self.msg.ack()

    async def release(self) -> None:
        await self.msg.nak()

    async def touch(self) -> None:
        await self.msg.in_progress()


class JetStreamSource(Source):
    """Messages from a JetStream stream into an inbox, through a durable consumer.

    - ``servers``: NATS URL(s) (default ``nats://127.0.0.1:4222``), or ``nc``: a connected
      ``nats.aio.client.Client`` of yours (then it is not closed on stop).
    - ``stream``: the stream, which must exist.
    - ``subject``: partitioned mode (the default): the prefix of the partition subjects
      ``<subject>.<p>`` (required, no wildcards); shared mode: a filter inside the stream
      (default: all of it).
    - ``durable``: the consumer's name, the same on every node (default ``"cloister"``;
      partitioned: ``<durable>-<p>`` per partition). Created if missing (explicit acks,
      unlimited deliveries, ``ack_wait``, ``max_ack_pending``, from the start of the
      stream); an existing one is used as it is.
    - ``batch``: messages per fetch (default 100); ``max_in_flight``: messages this node
      holds unacknowledged at most (default 2 x batch).
    - plus the options of :class:`~cloister.sources.Source` (``key``, ``decode``, ...).
    """

    kind = "jetstream"

    def __init__(
        self,
        target: InboxTarget,
        servers: str | list[str] = "nats://127.0.0.1:4222",
        *,
        stream: str,
        key: KeyFunction,
        subject: str | None = None,
        durable: str = "cloister",
        nc: Any = None,
        batch: int = 100,
        max_in_flight: int | None = None,
        ack_wait: float = 30.0,
        max_ack_pending: int = 1000,
        fetch_timeout: float = 1.0,
        **options: Unpack[SourceOptions],
    ) -> None:
        check_names(stream=stream, durable=durable)
        max_in_flight = check_batch(batch, max_in_flight, batches=2)
        if not ack_wait > 0 or not fetch_timeout > 0:
            raise ConfigurationError("ack_wait and fetch_timeout must be > 0 seconds")
        options.setdefault("name", f"jetstream.{stream}.{durable}")
        super().__init__(target, key=key, **options)
        if self.partitions is not None and (
            not isinstance(subject, str) or not subject or any(c in subject for c in "*> ")
        ):
            raise ConfigurationError(
                f"source {self.name}: partitioned mode reads the subjects <subject>.<p>: "
                f"subject must be their prefix without wildcards (e.g. 'orders' for a "
                f"stream on 'orders.*'), got {subject!r}; or use mode='shared'"
            )
        self.servers = servers
        self.stream = stream
        self.subject = subject
        self.durable = durable
        self.batch = batch
        self.max_in_flight = max_in_flight
        self.ack_wait = ack_wait
        self.max_ack_pending = max_ack_pending
        self.fetch_timeout = fetch_timeout
        self._nc: Any = nc
        self._owns_nc = nc is None
        self._sub: Any = None
        self._pulling: asyncio.Task[None] | None = None
        self._room = asyncio.Event()
        self._js: Any = None
        # partitioned mode: a subscription and a fetch task per partition read
        self._partition_subs: dict[int, Any] = {}
        self._partition_pulls: dict[int, asyncio.Task[None]] = {}

    async def _connect(self) -> None:
        if self._nc is None:
            try:
                self._nc = await nats.connect(
                    self.servers, max_reconnect_attempts=-1, name=f"cloister {self.name}"
                )
            except Exception as exc:
                raise SourceError(
                    f"source {self.name}: cannot connect to NATS at {self.servers} "
                    f"({describe(exc)}); is the server running?"
                ) from exc
        js = self._nc.jetstream()
        try:
            await js.stream_info(self.stream)
        except NotFoundError:
            raise SourceError(
                f"source {self.name}: stream {self.stream!r} does not exist; a JetStream "
                "source reads a stream you created"
            ) from None
        self._js = js
        if self.partitions is not None:
            return  # each partition's consumer is made as the partition is taken
        await self._ensure_consumer(js, self.durable, self.subject)
        self._sub = await js.pull_subscribe_bind(durable=self.durable, stream=self.stream)
        self._pulling = self._supervisor.spawn(self._pull_loop(self._sub, None), "fetch")

    async def _start_partition(self, partition: int) -> None:
        durable = f"{self.durable}-{partition}"
        await self._ensure_consumer(self._js, durable, f"{self.subject}.{partition}")
        sub = await self._js.pull_subscribe_bind(durable=durable, stream=self.stream)
        self._partition_subs[partition] = sub
        self._partition_pulls[partition] = self._supervisor.spawn(
            self._pull_loop(sub, partition), f"fetch {partition}"
        )

    async def _stop_partition(self, partition: int) -> None:
        pulling = self._partition_pulls.pop(partition, None)
        if pulling is not None:
            await self._end_pulling(pulling)

    async def _forget_partition(self, partition: int) -> None:
        sub = self._partition_subs.pop(partition, None)
        if sub is not None:
            await sub.unsubscribe()  # the durable consumer stays, for the next owner

    async def _ensure_consumer(self, js: Any, durable: str, subject: str | None) -> None:
        try:
            info = await js.consumer_info(self.stream, durable)
        except NotFoundError:
            config = api.ConsumerConfig(
                durable_name=durable,
                ack_policy=api.AckPolicy.EXPLICIT,
                deliver_policy=api.DeliverPolicy.ALL,
                ack_wait=self.ack_wait,
                max_deliver=-1,  # never let the server drop a message we did not store
                max_ack_pending=self.max_ack_pending,
                filter_subject=subject,
            )
            try:
                await js.add_consumer(self.stream, config=config)
            except Exception as exc:  # another node may have created it a moment ago
                try:
                    await js.consumer_info(self.stream, durable)
                except NotFoundError:
                    raise SourceError(
                        f"source {self.name}: cannot create consumer {durable!r} on "
                        f"stream {self.stream!r} ({describe(exc)})"
                    ) from exc
            return
        wanted = subject
        have = info.config.filter_subject
        if wanted is not None and have != wanted:
            self.log.warning(
                "source %s: consumer %s exists with filter %r, not %r; using it as it is",
                self.name,
                durable,
                have,
                wanted,
            )

    async def _pull_loop(self, sub: Any, partition: int | None) -> None:
        backoff = Backoff(*self.retry_backoff)
        while self.state == "running" and (partition is None or partition in self._reading):
            room = self.max_in_flight - self.in_flight
            if room < self.batch:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                msgs = await sub.fetch(self.batch, timeout=self.fetch_timeout)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except Exception as exc:
                self.log.warning("source %s: fetch failed: %s", self.name, describe(exc))
                await wait_event(self._stopping, backoff.next())
                continue
            backoff.reset()
            for msg in msgs:
                self._accept(self._delivery(msg, partition))

    def _delivery(self, msg: Any, partition: int | None) -> _JetStreamDelivery:
        metadata = msg.metadata
        headers = msg.headers or {}
        sequence = metadata.sequence.stream
        msg_id = headers.get(MSG_ID_HEADER) or f"{metadata.stream}:{sequence}"
        meta = SourceMessage(
            source=self.name,
            body=msg.data,
            msg_id=msg_id,
            subject=msg.subject,
            headers=headers,
            redelivered=metadata.num_delivered > 1,
            sequence=sequence,
            content_type=headers.get("Content-Type"),
            raw=msg,
        )
        return _JetStreamDelivery(meta, msg, partition)

    def _job_done(self) -> None:
        if self.max_in_flight - self.in_flight >= self.batch:
            self._room.set()

    async def _stop_intake(self) -> None:
        pulling, self._pulling = self._pulling, None
        if pulling is not None:
            await self._end_pulling(pulling)

    async def _end_pulling(self, pulling: asyncio.Task[None]) -> None:
        self._room.set()
        # A fetch under way returns within fetch_timeout (later on a loaded machine); what
        # it brings is given back (nak). Cancelled, it would leave what the server sent
        # unanswered until ack_wait, and a key's next messages would overtake those.
        done, _ = await asyncio.wait({pulling}, timeout=self.fetch_timeout + self.drain_timeout)
        if not done:
            self.log.warning(
                "source %s: a fetch did not return in %ss; what it held comes back after "
                "ack_wait (%ss)",
                self.name,
                self.fetch_timeout + self.drain_timeout,
                self.ack_wait,
            )
            pulling.cancel()

    async def _disconnect(self) -> None:
        for partition in list(self._partition_subs):
            try:
                await self._forget_partition(partition)
            except Exception as exc:
                self.log.debug("source %s: unsubscribe: %s", self.name, describe(exc))
        sub, self._sub = self._sub, None
        nc, self._nc = self._nc, None
        try:
            if sub is not None:
                await sub.unsubscribe()  # the durable consumer stays, for the other nodes
        except Exception as exc:
            self.log.debug("source %s: unsubscribe: %s", self.name, describe(exc))
        try:
            if nc is not None and self._owns_nc:
                await nc.close()
        except Exception as exc:
            self.log.debug("source %s: closing the connection: %s", self.name, describe(exc))
