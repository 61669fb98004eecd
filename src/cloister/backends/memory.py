"""The embedded backend, ``memory://NAME``: every node of a cluster in one process.

It is a test double with the same contract as the network backend — not a happy-path
fake. The shared medium (a :class:`MemoryWorld`) enforces TTLs with its own timers, so a
node that stops heartbeating expires exactly as it would on NATS, and it can inject the
failures real deployments see:

- :meth:`MemoryWorld.crash` — the node dies as if by ``kill -9``: no goodbye, its keys
  stay until their TTL runs out, requests to it fail at once with "no responders".
- :meth:`MemoryWorld.partition` — the nodes lose the medium: their operations raise
  :class:`~cloister.errors.BackendUnavailableError`, their watches go silent (events are
  lost, not queued), requests to them time out; :meth:`MemoryWorld.heal` reconnects them
  and fires their reconnect callbacks.
- :meth:`MemoryWorld.delay` — every operation of a node takes that much longer
  (slow heartbeats, slow replies).
- :meth:`MemoryWorld.elect` — the medium loses its leader for a while: bucket and log
  operations fail for every node, and TTLs start afresh once a new leader is elected.
- :meth:`MemoryWorld.lose_data` — the medium comes back with an empty store, as a
  nats-server restarted without its data: every bucket and log is empty, revisions and
  sequences count from 1 again, consumers are gone, every node reconnects, and one of
  them (the one that re-creates the streams on NATS) is told of the loss.

Guarded writes (:class:`~cloister.backends.Guard`) are checked against the guard key's
last change — deletes and expiries included, as NATS keeps a subject's last sequence —
atomically with the write.

Nodes opened with the same ``memory://NAME`` share one world; different names are
different worlds. Payloads cross as bytes only, as on a real wire. A world names its
buckets, logs, nodes and topics as the NATS backend does (:mod:`cloister.backends._names`),
and refuses the names NATS refuses.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from cloister._tasks import Supervisor
from cloister.backends import _names
from cloister.backends.base import (
    PENDING_MESSAGES,
    TOPIC_PENDING_BYTES,
    Backend,
    Entry,
    Guard,
    KeyValue,
    KVEvent,
    KVOp,
    Log,
    LogConsumer,
    LogRecord,
    MessageHandler,
    PartitionBusyError,
    RequestHandler,
    ServeLimits,
    Subscription,
    check_prefix,
)
from cloister.errors import (
    BackendUnavailableError,
    ConfigurationError,
    FencedWriteError,
    KeyExistsError,
    NoSuchNodeError,
    RemoteError,
    RequestTimeoutError,
    RevisionMismatchError,
)

log = logging.getLogger("cloister.backends.memory")

_KEY = re.compile(r"^[A-Za-z0-9_=.-]+$")
_WORLDS: dict[str, MemoryWorld] = {}


def world(name: str) -> MemoryWorld:
    """The world called ``name`` (created on first use): what ``memory://NAME`` opens."""
    found = _WORLDS.get(name)
    if found is None:
        found = _WORLDS[name] = MemoryWorld(name)
    return found


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY.match(key):
        raise ConfigurationError(f"invalid key {key!r}: use a non-empty string of [A-Za-z0-9_=.-]")


@dataclass(slots=True)
class _Item:
    value: bytes
    revision: int
    expiry: asyncio.TimerHandle | None = None
    ttl: float | None = None


@dataclass(slots=True, eq=False)
class _Watcher:
    owner: MemoryBackend
    prefix: str = ""
    queue: asyncio.Queue[KVEvent] = field(default_factory=asyncio.Queue)


class _TokenTree:
    """The keys of a bucket by their dot-separated tokens, as NATS's subject tree keeps
    subjects: a prefix listing walks to the prefix and reads only the keys below it."""

    _LEAF = ""  # tokens are never empty, so this child marks "a key ends here"

    def __init__(self) -> None:
        self._root: dict[str, Any] = {}

    def add(self, key: str) -> None:
        node = self._root
        for token in key.split("."):
            node = node.setdefault(token, {})
        node[self._LEAF] = True

    def discard(self, key: str) -> None:
        tokens = key.split(".")
        path = [self._root]
        for token in tokens:
            child = path[-1].get(token)
            if child is None:
                return
            path.append(child)
        path[-1].pop(self._LEAF, None)
        for depth in range(len(tokens), 0, -1):  # prune the branches left empty
            if path[depth]:
                break
            del path[depth - 1][tokens[depth - 1]]

    def under(self, prefix: str) -> list[str]:
        """Every key starting with ``prefix`` (whole tokens ending with '.', or '')."""
        node = self._root
        tokens = prefix.split(".")[:-1]
        for token in tokens:
            child = node.get(token)
            if child is None:
                return []
            node = child
        found: list[str] = []
        stack: list[tuple[dict[str, Any], list[str]]] = [(node, tokens)]
        while stack:
            node, path = stack.pop()
            for token, child in node.items():
                if token == self._LEAF:
                    if len(path) > len(tokens):  # "a." covers "a.x", not "a" itself
                        found.append(".".join(path))
                else:
                    stack.append((child, [*path, token]))
        return found


class _Bucket:
    """One bucket's data. Revisions are per bucket and strictly increasing."""

    def __init__(self) -> None:
        self.items: dict[str, _Item] = {}
        self.tree = _TokenTree()
        self.revisions = itertools.count(1)
        self.watchers: list[_Watcher] = []
        self.electing = False  # no leader: nothing expires (see MemoryWorld.elect)
        # The revision of each key's last change, deletes and expiries included (what NATS
        # keeps as the subject's last sequence): guards are checked against it.
        self.last: dict[str, int] = {}

    def hold_expiries(self) -> None:
        """The leader is gone: no TTL runs out until a new one counts them afresh."""
        self.electing = True
        for item in self.items.values():
            if item.expiry is not None:
                item.expiry.cancel()
                item.expiry = None

    def wipe(self) -> None:
        """Lose everything, as a stream re-created empty: no key, revisions from 1. The
        watchers stay and see nothing of it (the lost keys send no delete)."""
        for item in self.items.values():
            if item.expiry is not None:
                item.expiry.cancel()
        self.items.clear()
        self.last.clear()
        self.revisions = itertools.count(1)

    def restart_expiries(self) -> None:
        """A new leader took over: it counts every TTL from now (as NATS's does)."""
        self.electing = False
        loop = asyncio.get_running_loop()
        for key, item in self.items.items():
            if item.ttl is not None and item.expiry is None:
                item.expiry = loop.call_later(item.ttl, self._expire, key, item.revision)

    def check(self, guards: Iterable[Guard | None], name: str, what: str) -> None:
        """Raise :class:`FencedWriteError` unless every one of ``guards`` holds now."""
        failed: dict[str, tuple[int, int | None]] = {}
        for guard in guards:
            if guard is not None:
                actual = self.last.get(guard.key, 0)
                if actual != guard.revision:
                    failed[guard.key] = (guard.revision, actual)
        if failed:
            raise FencedWriteError(name, failed, what)

    def write(self, key: str, value: bytes, ttl: float | None) -> int:
        old = self.items.get(key)
        if old is not None and old.expiry is not None:
            old.expiry.cancel()
        elif old is None:
            self.tree.add(key)
        revision = self.last[key] = next(self.revisions)
        item = self.items[key] = _Item(value, revision, ttl=ttl)
        if ttl is not None and not self.electing:
            loop = asyncio.get_running_loop()
            item.expiry = loop.call_later(ttl, self._expire, key, revision)
        self._notify(KVEvent(KVOp.PUT, key, value, revision))
        return revision

    def remove(self, key: str, op: KVOp) -> None:
        item = self.items.pop(key)
        self.tree.discard(key)
        if item.expiry is not None:
            item.expiry.cancel()
        revision = self.last[key] = next(self.revisions)
        self._notify(KVEvent(op, key, None, revision))

    def _expire(self, key: str, revision: int) -> None:
        item = self.items.get(key)
        if item is not None and item.revision == revision:
            self.remove(key, KVOp.EXPIRE)

    def _notify(self, event: KVEvent) -> None:
        for watcher in self.watchers:
            # A cut-off watcher loses events, as on a network.
            if watcher.owner.reachable and event.key.startswith(watcher.prefix):
                watcher.queue.put_nowait(event)


class MemoryKV(KeyValue):
    """A bucket as one node sees it: every call goes through the node's fault injection."""

    def __init__(self, owner: MemoryBackend, name: str, bucket: _Bucket) -> None:
        self.name = name
        self._owner = owner
        self._bucket = bucket

    async def get(self, key: str, *, consistent: bool = False) -> Entry | None:
        # Memory is always consistent: ``consistent`` changes nothing.
        await self._owner._io()
        item = self._bucket.items.get(key)
        return None if item is None else Entry(key, item.value, item.revision)

    async def put(self, key: str, value: bytes, *, guard: Guard | None = None) -> int:
        _check_key(key)
        await self._owner._io()
        self._bucket.check((guard,), self.name, f"put {key!r}")
        return self._bucket.write(key, bytes(value), None)

    async def put_many(
        self,
        items: Mapping[str, bytes],
        *,
        guard: Guard | None = None,
        guards: Mapping[str, Guard] | None = None,
    ) -> None:
        for key in items:
            _check_key(key)
        await self._owner._io()  # then every write, or none if the medium is away
        # Checked and written with no await in between: atomic, as one NATS batch.
        used = {guards.get(key, guard) for key in items} if guards else (guard,)
        self._bucket.check(used, self.name, f"put {len(items)} keys")
        for key, value in items.items():
            self._bucket.write(key, bytes(value), None)

    async def create(self, key: str, value: bytes, *, ttl: float | None = None) -> int:
        _check_key(key)
        await self._owner._io()
        if key in self._bucket.items:
            raise KeyExistsError(f"key {key!r} already exists in bucket {self.name!r}")
        return self._bucket.write(key, bytes(value), ttl)

    async def update(
        self, key: str, value: bytes, *, revision: int, ttl: float | None = None
    ) -> int:
        _check_key(key)
        await self._owner._io()
        item = self._bucket.items.get(key)
        if item is None or item.revision != revision:
            now = None if item is None else item.revision
            raise RevisionMismatchError(
                f"key {key!r} in bucket {self.name!r} is at revision {now}, not {revision}"
            )
        return self._bucket.write(key, bytes(value), ttl)

    async def delete(self, key: str, *, revision: int | None = None) -> None:
        await self._owner._io()
        item = self._bucket.items.get(key)
        if item is None:
            if revision is not None:
                raise RevisionMismatchError(f"key {key!r} is gone; expected revision {revision}")
            return
        if revision is not None and item.revision != revision:
            raise RevisionMismatchError(
                f"key {key!r} is at revision {item.revision}, not {revision}"
            )
        self._bucket.remove(key, KVOp.DELETE)

    async def entries(self, *, consistent: bool = False, prefix: str = "") -> dict[str, Entry]:
        check_prefix(prefix)
        await self._owner._io()
        items = self._bucket.items
        if prefix:
            found = {}
            for key in self._bucket.tree.under(prefix):
                item = items[key]
                found[key] = Entry(key, item.value, item.revision)
        else:
            found = {k: Entry(k, i.value, i.revision) for k, i in items.items()}
        self.entries_read += len(found)
        return found

    def watch(self, *, prefix: str = "") -> AbstractAsyncContextManager[AsyncIterator[KVEvent]]:
        check_prefix(prefix)
        return self._watch(prefix)

    @asynccontextmanager
    async def _watch(self, prefix: str) -> AsyncIterator[AsyncIterator[KVEvent]]:
        await self._owner._io()
        watcher = _Watcher(self._owner, prefix)
        self._bucket.watchers.append(watcher)
        try:
            yield _drain(watcher.queue)
        finally:
            self._bucket.watchers.remove(watcher)


async def _drain(queue: asyncio.Queue[KVEvent]) -> AsyncIterator[KVEvent]:
    while True:
        yield await queue.get()


@dataclass(slots=True)
class _Partition:
    """One partition: records by sequence (acked ones removed) and its one claimant."""

    records: dict[int, tuple[bytes, str | None, float]] = field(default_factory=dict)
    """sequence -> (data, msg_id, stored at: ``time.time()``)"""
    deliveries: dict[int, int] = field(default_factory=dict)
    claimant: str | None = None
    consumer: _MemoryConsumer | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


class _LogData:
    """A log's partitions, sequence counter and dedup window, shared by every node."""

    def __init__(self, partitions: int, dedup_window: float) -> None:
        self.partitions = [_Partition() for _ in range(partitions)]
        self.sequence = itertools.count(1)
        self.dedup_window = dedup_window
        self.seen: dict[str, tuple[int, float]] = {}  # msg_id -> (sequence, expires at)
        self.purge_at = 10_000

    def wipe(self) -> None:
        """Lose every record and consumer, as a stream re-created empty: sequences and the
        dedup window start afresh, and a consumer that held a partition finds it gone."""
        for partition in self.partitions:
            partition.records.clear()
            partition.deliveries.clear()
            partition.claimant = partition.consumer = None
            partition.arrived.set()  # a fetch waiting on it looks again, and finds it gone
        self.sequence = itertools.count(1)
        self.seen.clear()

    def dedup(self, msg_id: str, now: float) -> int | None:
        if len(self.seen) > self.purge_at:  # forget expired ids now and then, not each time
            self.seen = {k: v for k, v in self.seen.items() if v[1] > now}
            self.purge_at = max(10_000, 2 * len(self.seen))  # amortised O(1) per append
        found = self.seen.get(msg_id)
        return found[0] if found is not None and found[1] > now else None


class MemoryLog(Log):
    """A partitioned log as one node sees it (through its fault injection)."""

    def __init__(self, owner: MemoryBackend, name: str, data: _LogData) -> None:
        self.name = name
        self.partitions = len(data.partitions)
        self._owner = owner
        self._data = data

    def _partition(self, partition: int) -> _Partition:
        if not 0 <= partition < self.partitions:
            raise ConfigurationError(
                f"log {self.name!r} has partitions 0..{self.partitions - 1}, not {partition}"
            )
        return self._data.partitions[partition]

    async def append(self, partition: int, data: bytes, *, msg_id: str | None = None) -> int:
        target = self._partition(partition)
        owner = self._owner
        if owner.latency:
            await owner._io()
        else:
            owner._check()  # the hot path of every put: no coroutine when there is no delay
        now = 0.0
        if msg_id is not None:
            now = asyncio.get_running_loop().time()
            original = self._data.dedup(msg_id, now)
            if original is not None:
                return original
        sequence = next(self._data.sequence)
        target.records[sequence] = (bytes(data), msg_id, time.time())
        if msg_id is not None:
            self._data.seen[msg_id] = (sequence, now + self._data.dedup_window)
        if target.consumer is not None:
            target.consumer.pending.append(sequence)
        target.arrived.set()
        return sequence

    async def claim(self, partition: int, consumer: str) -> LogConsumer:
        target = self._partition(partition)
        await self._owner._io()
        if target.claimant is not None and target.claimant != consumer:
            raise PartitionBusyError(
                f"partition {partition} of log {self.name!r} is held by {target.claimant!r}"
            )
        target.claimant = consumer
        target.consumer = _MemoryConsumer(self._owner, self.name, partition, consumer, target)
        return target.consumer

    async def evict(self, partition: int, consumer: str) -> None:
        target = self._partition(partition)
        await self._owner._io()
        if target.claimant == consumer:
            target.claimant = target.consumer = None

    async def claimants(self, partition: int) -> list[str]:
        target = self._partition(partition)
        await self._owner._io()
        return [] if target.claimant is None else [target.claimant]

    async def claimed(self) -> dict[int, list[str]]:
        await self._owner._io()
        return {
            n: [p.claimant] for n, p in enumerate(self._data.partitions) if p.claimant is not None
        }

    async def depth(self, partition: int | None = None) -> int:
        await self._owner._io()
        if partition is not None:
            return len(self._partition(partition).records)
        return sum(len(p.records) for p in self._data.partitions)


class _MemoryConsumer(LogConsumer):
    def __init__(
        self, owner: MemoryBackend, log: str, partition: int, name: str, target: _Partition
    ) -> None:
        self.partition = partition
        self.name = name
        self._owner = owner
        self._log = log
        self._target = target
        # Sequences not yet delivered to this consumer, oldest first: everything unacked
        # when it claimed the partition, then each append.
        self.pending: deque[int] = deque(target.records)

    def _check_claim(self) -> None:
        if self._target.consumer is not self:
            raise PartitionBusyError(
                f"consumer {self.name!r} no longer holds partition {self.partition} "
                f"of log {self._log!r}"
            )

    async def fetch(self, batch: int, timeout: float) -> list[LogRecord]:
        target = self._target
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            await self._owner._io()
            self._check_claim()
            found: list[LogRecord] = []
            pending, records = self.pending, target.records
            while pending and len(found) < batch:
                sequence = pending.popleft()
                record = records.get(sequence)
                if record is None:
                    continue  # acked meanwhile
                deliveries = target.deliveries[sequence] = target.deliveries.get(sequence, 0) + 1
                found.append(
                    LogRecord(
                        self.partition, sequence, record[0], record[1], deliveries, None, record[2]
                    )
                )
            if found:
                return found
            target.arrived.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return []
            try:
                async with asyncio.timeout(remaining):
                    await target.arrived.wait()
            except TimeoutError:
                return []

    async def ack(self, record: LogRecord) -> None:
        await self._owner._io()
        self._check_claim()
        self._target.records.pop(record.sequence, None)
        self._target.deliveries.pop(record.sequence, None)

    async def ack_many(self, records: list[LogRecord]) -> None:
        await self._owner._io()
        self._check_claim()
        live, deliveries = self._target.records, self._target.deliveries
        for record in records:
            live.pop(record.sequence, None)
            deliveries.pop(record.sequence, None)

    async def release(self) -> None:
        await self._owner._io()
        # By name, as NATS deletes the durable named after the consumer: a claim made
        # since under the same name (by another process that took the name) goes too.
        if self._target.claimant == self.name:
            self._target.claimant = self._target.consumer = None


class _MemorySubscription(Subscription):
    def __init__(self, owner: MemoryBackend, topic: str, subject: str, handler: MessageHandler):
        self.owner = owner
        self.topic = topic
        self.key = subject
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.pending_bytes = 0
        #: Messages dropped because the queue was full, as nats-py drops them.
        self.dropped = 0
        self._handler = handler
        self._pump = owner._supervisor.spawn(self._run(), f"subscription {topic}")

    def offer(self, payload: bytes) -> None:
        """Queue ``payload`` unless the queue is full (NATS's bounds: then dropped)."""
        full = self.queue.qsize() >= PENDING_MESSAGES
        if full or self.pending_bytes + len(payload) >= TOPIC_PENDING_BYTES:
            self.dropped += 1
            return
        self.pending_bytes += len(payload)
        self.queue.put_nowait(payload)

    async def _run(self) -> None:
        while True:
            payload = await self.queue.get()
            self.pending_bytes -= len(payload)
            try:
                await self._handler(payload)
            except Exception:
                log.exception("subscriber of %r on node %s failed", self.topic, self.owner.node)

    async def close(self) -> None:
        subscribers = self.owner._world._topics.get(self.key, [])
        if self in subscribers:
            subscribers.remove(self)
        self._pump.cancel()


class MemoryWorld:
    """The shared medium of ``memory://NAME``, with failure injection for tests."""

    def __init__(self, name: str) -> None:
        self.name = name
        # Keyed by the names the NATS backend gives them (bucket, stream, subject).
        self._buckets: dict[str, _Bucket] = {}
        self._logs: dict[str, _LogData] = {}
        self._servers: dict[str, tuple[MemoryBackend, RequestHandler]] = {}
        self._topics: dict[str, list[_MemorySubscription]] = {}
        self._handles: list[MemoryBackend] = []
        self.electing = False
        #: What the world's backends report as :attr:`Backend.failover_time` (0: this
        #: medium never elects; a test that calls :meth:`elect` sets it as a server would).
        self.failover_time = 0.0

    # -- failure injection -------------------------------------------------------------

    def elect(self, seconds: float) -> None:
        """The medium loses its leader for ``seconds``: every bucket and log operation of
        every node fails as unavailable, nothing expires meanwhile, and the new leader
        counts each TTL afresh from its takeover — what an R3 stream-leader election on
        NATS does. Requests between nodes keep working (they need no stream)."""
        self.electing = True
        for bucket in self._buckets.values():
            bucket.hold_expiries()
        asyncio.get_running_loop().call_later(seconds, self._elected)

    def _elected(self) -> None:
        self.electing = False
        for bucket in self._buckets.values():
            bucket.restart_expiries()

    def lose_data(self) -> None:
        """The medium comes back with an empty store — a nats-server restarted with its
        store directory deleted: every bucket and log is emptied (revisions and sequences
        count from 1 again, consumers are gone), every connected node reconnects (its
        reconnect callbacks run), and the first of each cluster, as the node that creates
        the lost streams again on NATS, is told of the loss (``on_data_loss``)."""
        for bucket in self._buckets.values():
            bucket.wipe()
        for data in self._logs.values():
            data.wipe()
        told: set[str] = set()
        for handle in list(self._handles):
            if not handle.reachable:
                continue  # cut off or crashed: it finds out when it reconnects
            for callback in list(handle._reconnect_callbacks):
                callback()
            if handle.cluster not in told:
                told.add(handle.cluster)
                for lost in list(handle._data_loss_callbacks):
                    lost("re-created the streams: the medium had lost them")

    def crash(self, node: str) -> None:
        """Kill ``node`` as ``kill -9`` would: no leave, its keys expire on their TTL.

        The medium drops the node's connection for good (``on_closed``), and the node, as
        a process that lost its medium, stops everything at once."""
        for handle in self._find(node):
            handle._crash()

    def partition(self, nodes: Iterable[str]) -> None:
        """Cut ``nodes`` off the medium until :meth:`heal`."""
        for name in nodes:
            for handle in self._find(name):
                handle.partitioned = True

    def heal(self, nodes: Iterable[str] | None = None) -> None:
        """Reconnect partitioned nodes (all of them by default)."""
        names = None if nodes is None else set(nodes)
        for handle in list(self._handles):
            if handle.partitioned and (names is None or handle.node in names):
                handle.partitioned = False
                for callback in list(handle._reconnect_callbacks):
                    callback()

    def delay(self, node: str, seconds: float) -> None:
        """Make every operation of ``node`` take ``seconds`` longer (0 to undo)."""
        for handle in self._find(node):
            handle.latency = seconds

    def _find(self, node: str) -> list[MemoryBackend]:
        found = [h for h in self._handles if h.node == node and not h.crashed]
        if not found:
            raise ConfigurationError(f"no live node named {node!r} in memory://{self.name}")
        return found

    # -- plumbing for MemoryBackend ------------------------------------------------------

    def bucket(self, cluster: str, name: str) -> _Bucket:
        return self._buckets.setdefault(_names.bucket_name(cluster, name), _Bucket())

    def existing_log(self, cluster: str, name: str) -> _LogData | None:
        return self._logs.get(_names.log_stream(cluster, name))

    def log(self, cluster: str, name: str, partitions: int, dedup_window: float) -> _LogData:
        stream = _names.log_stream(cluster, name)
        data = self._logs.get(stream)
        if data is None:
            data = self._logs[stream] = _LogData(partitions, dedup_window)
        elif len(data.partitions) != partitions:
            raise ConfigurationError(
                f"log {name!r} exists with {len(data.partitions)} partitions, not {partitions}; "
                "the partition count of a log is fixed for its lifetime"
            )
        return data


class MemoryBackend(Backend):
    """One node's handle on a :class:`MemoryWorld`."""

    def __init__(self, world_name: str, cluster: str, node: str) -> None:
        self.url = f"memory://{world_name}"
        self.cluster = _names.check_cluster(cluster)
        self.node = _names.check_token("node name", node)
        self._subject = _names.node_subject(cluster, node)
        self._world = world(world_name)
        self._supervisor = Supervisor(f"memory-backend {node}")
        self._reconnect_callbacks: list[Callable[[], None]] = []
        self._closed_callbacks: list[Callable[[], None]] = []
        self._data_loss_callbacks: list[Callable[[str], None]] = []
        self._serve_limits: ServeLimits | None = None
        self._requests_running = 0  # requests to this node whose handler runs
        self.crashed = False
        self.partitioned = False
        self.latency = 0.0
        self._connected = False

    @property
    def world(self) -> MemoryWorld:
        """The shared medium this handle is attached to."""
        return self._world

    @property
    def reachable(self) -> bool:
        """True while this node can talk to the medium."""
        return self._connected and not self.crashed and not self.partitioned

    @property
    def connected(self) -> bool:
        """See :attr:`reachable` (a partitioned node is cut off from the medium)."""
        return self.reachable

    @property
    def failover_time(self) -> float:
        """See :attr:`MemoryWorld.failover_time`."""
        return self._world.failover_time

    async def _io(self, *, streams: bool = True) -> None:
        """Every operation passes here: fault injection happens in one place."""
        if self.latency:
            await asyncio.sleep(self.latency)
        self._check(streams=streams)

    def _check(self, *, streams: bool = True) -> None:
        """Raise as the network would for a node that cannot reach the medium now
        (``streams``: the operation needs the medium's leader, which may be away)."""
        if not self._connected or self.crashed:
            raise BackendUnavailableError(f"node {self.node} is not connected to {self.url}")
        if self.partitioned:
            raise BackendUnavailableError(
                f"node {self.node} cannot reach {self.url} (partitioned); retrying may help"
            )
        if streams and self._world.electing:
            raise BackendUnavailableError(
                f"{self.url} is electing a leader; retrying in a moment will succeed"
            )

    async def connect(self) -> None:
        self._connected = True
        self._world._handles.append(self)

    async def close(self) -> None:
        self._drop_registrations()
        self._connected = False
        if self in self._world._handles:
            self._world._handles.remove(self)
        await self._supervisor.close()

    def _drop_registrations(self) -> None:
        if self._world._servers.get(self._subject, (None,))[0] is self:
            del self._world._servers[self._subject]
        for subscribers in self._world._topics.values():
            subscribers[:] = [s for s in subscribers if s.owner is not self]

    def _crash(self) -> None:
        self.crashed = True
        self._drop_registrations()
        for callback in list(self._closed_callbacks):
            callback()

    async def kv(self, bucket: str, *, ttl_keys: bool = False) -> KeyValue:
        _names.check_name("bucket name", bucket)
        await self._io()
        return MemoryKV(self, bucket, self._world.bucket(self.cluster, bucket))

    async def log(
        self,
        name: str,
        *,
        partitions: int,
        dedup_window: float = 120.0,
        replicas: int | None = None,
    ) -> Log:
        _names.check_name("log name", name)
        if not isinstance(partitions, int) or partitions < 1:
            raise ConfigurationError(f"partitions must be a whole number >= 1, got {partitions!r}")
        await self._io()
        return MemoryLog(self, name, self._world.log(self.cluster, name, partitions, dedup_window))

    async def existing_log(self, name: str) -> Log | None:
        _names.check_name("log name", name)
        await self._io()
        data = self._world.existing_log(self.cluster, name)
        return None if data is None else MemoryLog(self, name, data)

    def _request_done(self, _task: asyncio.Task[None]) -> None:
        self._requests_running -= 1

    async def serve(self, handler: RequestHandler, limits: ServeLimits | None = None) -> None:
        await self._io(streams=False)
        self._serve_limits = limits
        self._world._servers[self._subject] = (self, handler)

    async def request(self, node: str, payload: bytes, *, timeout: float) -> bytes:
        await self._io(streams=False)
        target = self._world._servers.get(_names.node_subject(self.cluster, node))
        if target is None:
            raise NoSuchNodeError(f"no responders for node {node!r} in cluster {self.cluster!r}")
        server, handler = target
        limits = server._serve_limits
        if (
            limits is not None
            and server.reachable
            and server._requests_running >= limits.max_concurrent
        ):
            # As on NATS: the serving node refuses at once what it has no room for.
            return limits.refuse(bytes(payload))
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[bytes] = loop.create_future()

        async def answer() -> None:
            if server.latency:
                await asyncio.sleep(server.latency)
            try:
                result = await handler(bytes(payload))
            except Exception as exc:
                if not reply.done():
                    reply.set_exception(RemoteError(f"node {node} failed: {exc!r}"))
                raise
            if server.reachable and self.reachable and not reply.done():
                reply.set_result(result)

        if server.reachable:
            server._requests_running += 1  # counted from now until done, as on NATS
            task = server._supervisor.spawn(answer(), f"request to {node}")
            task.add_done_callback(server._request_done)
        try:
            async with asyncio.timeout(timeout):
                return await reply
        except TimeoutError:
            raise RequestTimeoutError(f"node {node!r} did not answer within {timeout:g}s") from None
        finally:
            reply.cancel()

    async def publish(self, topic: str, payload: bytes) -> None:
        await self._io(streams=False)
        subject = _names.topic_subject(self.cluster, topic)
        for subscription in self._world._topics.get(subject, []):
            if subscription.owner.reachable:
                subscription.offer(bytes(payload))

    async def subscribe(self, topic: str, handler: MessageHandler) -> Subscription:
        await self._io(streams=False)
        subject = _names.topic_subject(self.cluster, topic)
        subscription = _MemorySubscription(self, topic, subject, handler)
        self._world._topics.setdefault(subject, []).append(subscription)
        return subscription

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        self._reconnect_callbacks.append(callback)

    def on_closed(self, callback: Callable[[], None]) -> None:
        self._closed_callbacks.append(callback)

    def on_data_loss(self, callback: Callable[[str], None]) -> None:
        self._data_loss_callbacks.append(callback)
