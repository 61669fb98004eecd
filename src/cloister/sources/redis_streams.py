"""Redis Streams as a source (redis-py >= 5, asyncio): ``pip install pycloister[redis]``.

Start one on every node; they read through one consumer group::

    def key(body, meta):                      # meta.headers: the entry's other fields
        return body["key"], body["seq"]

    source = await RedisStreamsSource.start(
        manager, "redis://127.0.0.1:6379/0", stream="orders", key=key
    )

By default (``mode="partitioned"``) the source reads one stream per partition,
``orders.0`` ... ``orders.<partitions-1>``, and each node reads only the partitions the
ring gives it. A publisher adds a key's entries to its partition's stream, the body in the
field ``body``::

    from cloister.sources import partition_name

    await redis.xadd(partition_name("orders", order_id, partitions=128),
                     {"body": json.dumps(order), "msg_id": f"order-{order_id}-{seq}"})

An entry is acknowledged (``XACK``) only after the inbox stored it; a malformed one (no
body field, a body that does not decode, a key function that fails) is parked in the
inbox's dead letters with the reason, then acknowledged. An entry the inbox cannot take
stays pending. Pending entries are never lost: a node taking a partition over first claims
every entry still pending in it (``XAUTOCLAIM``, whoever held it: the previous owner that
crashed, or this node before a restart) and stores them, oldest first, before it reads new
ones; and every ``claim_interval`` seconds each node claims the entries of its streams
that nobody touched for ``claim_idle`` seconds (a consumer that died in shared mode).

The default message id (the dedup id) is the entry's ``msg_id`` field when the publisher
set one, otherwise ``"<stream>:<entry id>"``, the same on every redelivery.

``mode="shared"``: every node reads the stream ``stream`` through the group, as competing
consumers: the load spreads, a key's order is not kept.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import socket
from typing import Any, Unpack

from cloister._backoff import Backoff
from cloister._tasks import wait_event
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
    check_batch,
    check_names,
    describe,
    mask_url,
)

DEFAULT_URL = "redis://127.0.0.1:6379/0"


def import_redis() -> Any:
    """The ``redis.asyncio`` module, or a clear error naming the extra to install."""
    try:
        return importlib.import_module("redis.asyncio")
    except ImportError as exc:
        raise MissingDependencyError(
            "RedisStreamsSource needs redis-py >= 5, which is not installed: "
            "pip install 'pycloister[redis]'"
        ) from exc


class _StreamDelivery(Delivery):
    __slots__ = ("entry_id", "source", "stream")

    def __init__(
        self,
        meta: SourceMessage,
        source: RedisStreamsSource,
        stream: str,
        entry_id: bytes,
        partition: int | None,
    ) -> None:
        super().__init__(meta, partition)
        self.source = source
        self.stream = stream
        self.entry_id = entry_id

    async def ack(self) -> None:
        self.source._holding.discard((self.stream, self.entry_id))
        await self.source._acks.ack(self.stream, self.entry_id)

    async def release(self) -> None:
        # It stays pending: the partition's next owner claims it as it takes over (shared
        # mode: any node claims it once it was idle claim_idle seconds).
        self.source._holding.discard((self.stream, self.entry_id))

    async def touch(self) -> None:
        source = self.source
        await source._client().xclaim(
            self.stream, source.group, source.consumer, 0, [self.entry_id], justid=True
        )  # resets the idle time: the periodic claim leaves it to us


class _Acks:
    """XACKs gathered while one is on the wire and sent together, one pipeline per
    round: a node acknowledging thousands of entries a second needs a few connections,
    not one per entry."""

    def __init__(self, source: RedisStreamsSource) -> None:
        self.source = source
        self.pending: dict[str, list[bytes]] = {}
        self.waiting: list[asyncio.Future[None]] = []
        self.wake = asyncio.Event()

    async def ack(self, stream: str, entry_id: bytes) -> None:
        """Acknowledge ``entry_id`` of ``stream``; returns once Redis confirmed it."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.setdefault(stream, []).append(entry_id)
        self.waiting.append(done)
        self.wake.set()
        await done

    async def run(self) -> None:
        """Send what was gathered, round after round, until cancelled."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            pending, self.pending = self.pending, {}
            waiting, self.waiting = self.waiting, []
            try:
                async with self.source._client().pipeline(transaction=False) as pipe:
                    for stream, ids in pending.items():
                        pipe.xack(stream, self.source.group, *ids)
                    await pipe.execute()
            except Exception as exc:
                for done in waiting:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for done in waiting:
                if not done.done():
                    done.set_result(None)


class RedisStreamsSource(Source):
    """Entries of Redis streams into an inbox (a manager's), through a consumer group.

    - ``url``: the server (default ``redis://127.0.0.1:6379/0``), or ``redis``: a
      ``redis.asyncio.Redis`` of yours, created with ``decode_responses=False`` and the
      default protocol (RESP2); then it is not closed on stop.
    - ``stream``: the stream (shared mode), or the prefix of the partition streams
      ``<stream>.<p>`` (partitioned mode, the default).
    - ``group``: the consumer group, the same on every node (default ``"cloister"``),
      created (from the start of the stream, creating the stream) if missing.
    - ``consumer``: this node's consumer name (default: the cluster node's name, else
      ``host-pid``); unique per node.
    - ``field``: the entry field holding the body (default ``"body"``); the other fields
      are the message's ``headers``.
    - ``batch``: entries per read and stream (default 100); ``max_in_flight``: entries this
      node holds unacknowledged at most (default 4 x batch); ``block``: seconds one read
      waits for new entries (default 0.5; also how soon a partition taken is read).
    - ``claim_idle``, ``claim_interval``: claim entries pending that long (default 60 s),
      that often (default 10 s).
    - plus the options of :class:`~cloister.sources.Source` (``key``, ``decode``, ...).
    """

    kind = "redis"

    def __init__(
        self,
        target: InboxTarget,
        url: str = DEFAULT_URL,
        *,
        stream: str,
        key: KeyFunction,
        group: str = "cloister",
        consumer: str | None = None,
        field: str = "body",
        batch: int = 100,
        max_in_flight: int | None = None,
        block: float = 0.5,
        claim_idle: float = 60.0,
        claim_interval: float = 10.0,
        redis: Any = None,
        **options: Unpack[SourceOptions],
    ) -> None:
        check_names(stream=stream, group=group, field=field)
        max_in_flight = check_batch(batch, max_in_flight, batches=4)
        for option, seconds in (
            ("block", block),
            ("claim_idle", claim_idle),
            ("claim_interval", claim_interval),
        ):
            if not isinstance(seconds, int | float) or seconds <= 0:
                raise ConfigurationError(f"{option} must be a number of seconds > 0")
        options.setdefault("name", f"redis.{stream}.{group}")
        super().__init__(target, key=key, **options)
        if consumer is None:
            node = self.cluster.node if self.cluster is not None else None
            consumer = node or f"{socket.gethostname()}-{os.getpid()}"
        self.url = url
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.field = field.encode()
        self.batch = batch
        self.max_in_flight = max_in_flight
        self.block = block
        self.claim_idle = claim_idle
        self.claim_interval = claim_interval
        self._redis: Any = redis
        self._owns_redis = redis is None
        self._partition_of_stream: dict[str, int] = {}
        # the streams the reader may read: a partition's once its pending entries are claimed
        self._open: dict[str, int | None] = {}
        self._reading_now: frozenset[str] = frozenset()
        self._read_done = asyncio.Event()
        self._room = asyncio.Event()
        self._holding: set[tuple[str, bytes]] = set()  # (stream, entry id) in flight here
        self._acks = _Acks(self)

    def stream_of(self, partition: int) -> str:
        """The name of ``partition``'s stream."""
        return f"{self.stream}.{partition}"

    def _client(self) -> Any:
        if self._redis is None:
            raise SourceError(f"source {self.name}: not connected to Redis")
        return self._redis

    # -- connecting -------------------------------------------------------------------------

    async def _connect(self) -> None:
        redis = import_redis()
        if self._redis is None:
            # a blocking pool: a burst waits for a connection instead of failing
            pool = redis.BlockingConnectionPool.from_url(
                self.url, decode_responses=False, max_connections=16, timeout=self.put_timeout
            )
            self._redis = redis.Redis(connection_pool=pool)
        try:
            await self._redis.ping()
        except Exception as exc:
            raise SourceError(
                f"source {self.name}: cannot connect to Redis at {mask_url(self.url)} "
                f"({describe(exc)}); is the server running and the URL right?"
            ) from exc
        if self.partitions is None:
            streams = [self.stream]
        else:
            streams = [self.stream_of(p) for p in range(self.partitions)]
            self._partition_of_stream = {s: p for p, s in enumerate(streams)}
        for stream in streams:
            await self._ensure_group(stream)
        if self.partitions is None:
            self._open[self.stream] = None
        self._supervisor.spawn(self._acks.run(), "ack")
        self._supervisor.spawn(self._read_loop(), "read")
        self._supervisor.spawn(self._claim_loop(), "claim")

    async def _ensure_group(self, stream: str) -> None:
        try:
            await self._client().xgroup_create(stream, self.group, id="0", mkstream=True)
        except Exception as exc:
            if "BUSYGROUP" not in str(exc):  # it exists: the other nodes share it
                raise SourceError(
                    f"source {self.name}: cannot create consumer group {self.group!r} on "
                    f"stream {stream!r} ({describe(exc)})"
                ) from exc

    # -- partitions -------------------------------------------------------------------------

    async def _start_partition(self, partition: int) -> None:
        stream = self.stream_of(partition)
        await self._claim(stream, partition, min_idle=0, redelivered=True)
        self._open[stream] = partition

    async def _stop_partition(self, partition: int) -> None:
        stream = self.stream_of(partition)
        self._open.pop(stream, None)
        # a read under way that includes it ends within `block`: what it brings is ours
        # until it is given back, never read by this node after the next owner claimed
        while stream in self._reading_now:
            self._read_done.clear()
            if not await wait_event(self._read_done, self.block + 5.0):
                break  # the reader is stuck on the server: its entries stay pending

    # -- reading ----------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        backoff = Backoff(*self.retry_backoff)
        block_ms = max(1, int(self.block * 1000))
        while self.state == "running":
            if self.max_in_flight - self.in_flight < self.batch:
                self._room.clear()
                await wait_event(self._room, self.block)
                continue
            streams = {s: ">" for s in self._open}
            if not streams:
                await wait_event(self._stopping, self.block)
                continue
            self._reading_now = frozenset(streams)
            try:
                answer = await self._client().xreadgroup(
                    self.group, self.consumer, streams, count=self.batch, block=block_ms
                )
            except Exception as exc:
                self._reading_now = frozenset()
                self._read_done.set()
                await self._read_failed(exc, streams)
                await wait_event(self._stopping, backoff.next())
                continue
            backoff.reset()
            for stream, entries in _by_stream(answer):
                self._take_entries(stream, entries, redelivered=False)
            self._reading_now = frozenset()
            self._read_done.set()

    async def _read_failed(self, exc: Exception, streams: dict[str, str]) -> None:
        self.log.warning("source %s: reading failed: %s", self.name, describe(exc))
        if "NOGROUP" in str(exc):  # the stream or the group was deleted: make them again
            for stream in streams:
                try:
                    await self._ensure_group(stream)
                except SourceError as error:
                    self.log.warning("source %s: %s", self.name, error)

    async def _claim_loop(self) -> None:
        idle_ms = int(self.claim_idle * 1000)
        while not await wait_event(self._stopping, self.claim_interval):
            for stream, partition in list(self._open.items()):
                try:
                    await self._claim(stream, partition, min_idle=idle_ms, redelivered=True)
                except Exception as exc:
                    self.log.warning(
                        "source %s: claiming idle entries of %s failed: %s",
                        self.name,
                        stream,
                        describe(exc),
                    )

    async def _claim(
        self, stream: str, partition: int | None, *, min_idle: int, redelivered: bool
    ) -> None:
        """Claim the entries of ``stream`` pending ``min_idle`` ms or more (with their
        previous consumer or with us), oldest first, and take them in."""
        start: Any = "0-0"
        while self.state == "running":
            while self.max_in_flight - self.in_flight < self.batch and self.state == "running":
                self._room.clear()
                await wait_event(self._room, self.block)
            answer = await self._client().xautoclaim(
                stream, self.group, self.consumer, min_idle, start_id=start, count=self.batch
            )
            start, entries = answer[0], answer[1]
            self._take_entries(stream, entries, redelivered=redelivered, partition=partition)
            if start in (b"0-0", "0-0"):
                return

    def _take_entries(
        self,
        stream: Any,
        entries: list[Any],
        *,
        redelivered: bool,
        partition: int | None = None,
    ) -> None:
        name = stream.decode() if isinstance(stream, bytes) else str(stream)
        if partition is None:
            partition = self._partition_of_stream.get(name)
        for entry_id, fields in entries:
            if fields is None or (name, entry_id) in self._holding:
                continue  # deleted meanwhile, or in flight here already (a claim's overlap)
            self._holding.add((name, entry_id))
            self._accept(self._delivery(name, entry_id, fields, partition, redelivered))

    def _delivery(
        self,
        stream: str,
        entry_id: bytes,
        fields: dict[bytes, bytes],
        partition: int | None,
        redelivered: bool,
    ) -> _StreamDelivery:
        body = fields.get(self.field)
        headers = {
            _text(k): _text(v) for k, v in fields.items() if k != self.field and k != b"msg_id"
        }
        entry = _text(entry_id)
        given = fields.get(b"msg_id")
        msg_id = _text(given) if given is not None else f"{stream}:{entry}"
        meta = SourceMessage(
            source=self.name,
            body=body if body is not None else b"",
            msg_id=msg_id,
            subject=stream,
            headers=headers,
            redelivered=redelivered,
            raw=(stream, entry, fields),
        )
        delivery = _StreamDelivery(meta, self, stream, entry_id, partition)
        if body is None:
            delivery.problem = f"entry {entry} has no {_text(self.field)!r} field"
        return delivery

    def _job_done(self) -> None:
        if self.max_in_flight - self.in_flight >= self.batch:
            self._room.set()

    async def _stop_intake(self) -> None:
        self._open.clear()
        self._room.set()

    async def _disconnect(self) -> None:
        redis, self._redis = self._redis, None
        try:
            if redis is not None and self._owns_redis:
                await redis.aclose()
                await redis.connection_pool.disconnect()
        except Exception as exc:
            self.log.debug("source %s: closing the connection: %s", self.name, describe(exc))


def _by_stream(answer: Any) -> list[tuple[Any, list[Any]]]:
    """XREADGROUP's answer (RESP2, redis-py's default) as ``[(stream, entries)]``."""
    return [(stream, entries) for stream, entries in answer or ()]


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
