"""The backend protocol: everything the cluster needs from the outside world.

A backend is one node's connection to the shared medium of one cluster. It offers three
small services, and nothing above this layer talks to the outside any other way:

- **Key-value buckets** (:class:`KeyValue`): get/put (and ``put_many``), ``create``
  (only if absent), ``update`` (compare-and-set on the revision), delete, a full listing,
  a live watch, and a per-key TTL after which the key expires and watchers see
  :attr:`KVOp.EXPIRE`. ``put`` and ``put_many`` take a :class:`Guard`: the medium stores
  the write only while another key of the bucket (a claim) is still at a given revision
  — fencing that the medium enforces, not the writer.
  Membership records, the sentry lease and the published epoch live here.
- **Transport** (:meth:`Backend.serve` / :meth:`Backend.request`, :meth:`Backend.publish`
  / :meth:`Backend.subscribe`): request/reply addressed to one node, and fan-out topics.
  Payloads are bytes; the layers above encode them (msgpack, never pickle).
- **Partitioned logs** (:class:`Log`): durable, append-only work queues split into a fixed
  number of partitions. A record stays until acknowledged; each partition has at most one
  consumer at a time, and the medium refuses a second one (:class:`PartitionBusyError`);
  a new consumer starts from the oldest unacknowledged record, so nothing is lost and
  order is kept when a partition changes hands. Appends may carry a message id: a
  duplicate within the dedup window is dropped. The durable inbox lives here.
- **Lifecycle**: :meth:`Backend.connect`, :meth:`Backend.close`,
  :meth:`Backend.on_reconnect` so the cluster can reconcile after an outage, and
  :meth:`Backend.on_closed` for a connection lost for good (the node stops), and
  :meth:`Backend.on_data_loss` for a medium that came back without its data.

Two implementations share this contract, as httpx's transports do: ``memory://NAME``
(:mod:`cloister.backends.memory`, every node in one process, with crash/partition/delay
injection) and ``nats://host:port[,host:port]`` (:mod:`cloister.backends.nats`).

Failure semantics every implementation follows:

- An unreachable medium raises :class:`~cloister.errors.BackendUnavailableError`.
- ``request`` to a node nobody serves fails fast with
  :class:`~cloister.errors.NoSuchNodeError` ("no responders"); to a node that serves but
  does not answer in time, :class:`~cloister.errors.RequestTimeoutError`.
- TTLs are enforced by the medium, not by the node that wrote the key: a crashed node's
  keys expire on their own.
"""

from __future__ import annotations

import asyncio
import enum
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from cloister.errors import BackendError, ConfigurationError, FencedWriteError
from cloister.schema import UNSIGNED, Keyring

RequestHandler = Callable[[bytes], Awaitable[bytes]]
"""Answers one request addressed to this node: payload in, reply out."""

MessageHandler = Callable[[bytes], Awaitable[None]]
"""Receives one message published on a topic."""

TOPIC_PENDING_BYTES = 8 * 1024 * 1024
"""Bytes of topic messages a subscription queues for its handler; past that (a flood),
further messages are dropped, as core publish/subscribe is at most once anyway."""

PENDING_MESSAGES = 4096
"""Messages a subscription (topic or requests) queues for its handler: the count bound
next to the byte bound, so a flood of tiny messages cannot pile up objects either."""


@dataclass(frozen=True, slots=True)
class ServeLimits:
    """How much a node takes on at once when it answers requests (:meth:`Backend.serve`).

    A request that arrives while ``max_concurrent`` handler calls are running, or while
    ``max_pending_bytes`` of requests already wait for one, is not run: it is answered
    at once with ``refuse(request)`` (a cheap, synchronous call that builds the reply
    saying the node is busy). So a flood costs a bounded amount of memory and every
    caller gets an answer fast, busy or not.
    """

    max_concurrent: int
    max_pending_bytes: int
    refuse: Callable[[bytes], bytes]


@dataclass(frozen=True, slots=True)
class Entry:
    """The current value of a key and its revision (strictly increasing per bucket)."""

    key: str
    value: bytes
    revision: int


@dataclass(frozen=True, slots=True)
class Guard:
    """A fencing condition on a write: ``key`` (in the same bucket) is still at ``revision``.

    The medium checks it atomically with the write it guards and refuses the write with
    :class:`~cloister.errors.FencedWriteError` otherwise (never retry that). ``revision``
    is a revision read from (or returned by a write of) the guard key; ``0`` holds only
    while the guard key was never written. A key deleted or expired since is at a newer
    revision (its tombstone's), so a guard naming its last value fails, as it should.
    Guard keys are meant to be overwritten (a claim changes hands), not deleted.
    """

    key: str
    revision: int

    def __post_init__(self) -> None:
        if not isinstance(self.revision, int) or isinstance(self.revision, bool):
            raise ConfigurationError(f"guard revision must be an int, got {self.revision!r}")
        if self.revision < 0:
            raise ConfigurationError(f"guard revision must be >= 0, got {self.revision}")


_PREFIX = re.compile(r"^(?:[A-Za-z0-9_=-]+\.)*$")


def check_prefix(prefix: str) -> None:
    """Raise :class:`ConfigurationError` unless ``prefix`` is whole key tokens ending
    with a dot (``"k.s."``), or ``""`` (every key): what a medium can filter on."""
    if not isinstance(prefix, str) or not _PREFIX.match(prefix):
        raise ConfigurationError(
            f"invalid key prefix {prefix!r}: use '' or tokens of [A-Za-z0-9_=-] each "
            "followed by '.', such as 'k.s.'"
        )


class KVOp(enum.Enum):
    """What happened to a key, as a watcher sees it."""

    PUT = "put"
    DELETE = "delete"
    EXPIRE = "expire"


@dataclass(frozen=True, slots=True)
class KVEvent:
    """One change seen by a watcher. ``value`` is None for delete and expire."""

    op: KVOp
    key: str
    value: bytes | None
    revision: int


class KeyValue(ABC):
    """A bucket of keys with revisions, compare-and-set, per-key TTL and a watch.

    Keys are non-empty strings of ``[A-Za-z0-9_=.-]``; values are bytes. A dot separates
    tokens (NATS carries a key as subject tokens): a key never starts or ends with a dot
    nor has two in a row, and listings and watches filter on a prefix of whole tokens.
    """

    name: str
    #: Entries listings have fetched from the medium so far (:meth:`entries`,
    #: :meth:`count`): what a ``prefix`` saves can be seen here.
    entries_read: int = 0

    @abstractmethod
    async def get(self, key: str, *, consistent: bool = False) -> Entry | None:
        """The current entry, or None when the key is absent, deleted or expired.

        ``consistent=True`` reads from the authoritative copy (the stream leader on NATS):
        it sees every write acknowledged before the call; the default may serve a slightly
        stale replica and keeps working during a leader election.
        """

    @abstractmethod
    async def put(self, key: str, value: bytes, *, guard: Guard | None = None) -> int:
        """Write (only while ``guard`` holds, when given); returns the new revision.

        A failed guard raises :class:`~cloister.errors.FencedWriteError` and stores
        nothing; never retry it.
        """

    async def put_many(
        self,
        items: Mapping[str, bytes],
        *,
        guard: Guard | None = None,
        guards: Mapping[str, Guard] | None = None,
    ) -> None:
        """Write several keys, each only while its guard holds; returns once all are stored.

        ``guard`` guards every key; ``guards`` gives keys their own guard instead (one
        write may span several claims: the manager flushes the workers of many partitions
        at once). Backends that can store them all or none do (memory; NATS 2.12+ in
        atomic batches of up to 1,000 keys, each batch refused as a whole when one of its
        guards fails). This default pipelines single puts, each carrying its guard: on an
        error some of the keys may be written (only while their guards held), and writing
        them all again is the way to recover — unless the error is
        :class:`~cloister.errors.FencedWriteError`, which names the guards that failed:
        the writer lost the right to write what they cover.
        """
        pairs = list(items.items())
        chosen = guards or {}
        for start in range(0, len(pairs), 256):  # pipelined, not one round trip each
            chunk = pairs[start : start + 256]
            results = await asyncio.gather(
                *(self.put(key, value, guard=chosen.get(key, guard)) for key, value in chunk),
                return_exceptions=True,
            )
            # Every put of the chunk has finished: raise the failures as one (a fence
            # first, so that callers never mistake a refusal for an outage and retry it).
            failed: dict[str, tuple[int, int | None]] = {}
            for result in results:
                if isinstance(result, FencedWriteError):
                    failed.update(result.failed)
            if failed:
                raise FencedWriteError(self.name, failed, f"put {len(items)} keys")
            for result in results:
                if isinstance(result, BaseException):
                    raise result

    @abstractmethod
    async def create(self, key: str, value: bytes, *, ttl: float | None = None) -> int:
        """Write only if the key is absent; :class:`KeyExistsError` otherwise.

        With ``ttl`` (seconds) the key expires unless refreshed by :meth:`update`.
        """

    @abstractmethod
    async def update(
        self, key: str, value: bytes, *, revision: int, ttl: float | None = None
    ) -> int:
        """Write only if the key's revision is still ``revision`` (compare-and-set).

        Raises :class:`RevisionMismatchError` when it changed or vanished. ``ttl`` restarts
        the key's time to live.
        """

    @abstractmethod
    async def delete(self, key: str, *, revision: int | None = None) -> None:
        """Remove the key (only if still at ``revision`` when one is given)."""

    @abstractmethod
    async def entries(self, *, consistent: bool = False, prefix: str = "") -> dict[str, Entry]:
        """A full, consistent listing of the live keys (for reconciliation).

        ``consistent=True`` reads from the authoritative copy (the stream leader on NATS):
        it sees every write acknowledged before the call; the default may serve a slightly
        stale replica and keeps working during a leader election.

        ``prefix`` (whole tokens ending with ``.``, see :func:`check_prefix`) lists only
        the keys that start with it, and the medium reads only those: NATS filters on the
        subject ``<prefix>>``, memory walks its token tree. :attr:`entries_read` counts
        what listings fetched.
        """

    async def count(self, *, prefix: str = "") -> int:
        """How many live keys start with ``prefix`` (all with ``""``); reads only those."""
        return len(await self.entries(prefix=prefix))

    @abstractmethod
    def watch(self, *, prefix: str = "") -> AbstractAsyncContextManager[AsyncIterator[KVEvent]]:
        """Live changes from now on (no replay): ``async with kv.watch() as events``.

        Watch first, then list with :meth:`entries`, and no change falls in between. A
        watch may go silent while the medium is unreachable; callers reconcile from
        :meth:`entries` periodically and on reconnect. With ``prefix`` (as for
        :meth:`entries`) only the changes of keys starting with it are delivered, and
        the medium filters them (NATS: the consumer's subject filter).
        """


class PartitionBusyError(BackendError):
    """Another consumer holds this partition; it must be released or evicted first."""


@dataclass(slots=True)  # not frozen: built once per delivered message, on the hot path
class LogRecord:
    """One record as a consumer receives it. ``sequence`` grows within a partition."""

    partition: int
    sequence: int
    data: bytes
    msg_id: str | None = None
    deliveries: int = 1
    ref: Any = field(default=None, compare=False, repr=False)  # the backend's ack handle
    stored_at: float | None = field(default=None, compare=False)
    """When the medium stored the record (``time.time()``; None if it does not say)."""


class LogConsumer(ABC):
    """The exclusive consumer of one partition (see :meth:`Log.claim`)."""

    partition: int
    name: str

    @abstractmethod
    async def fetch(self, batch: int, timeout: float) -> list[LogRecord]:
        """Up to ``batch`` records not yet delivered to this consumer, oldest first.

        Waits up to ``timeout`` seconds for the first one; an empty list when none came.
        A delivered record is not delivered again to this consumer, acked or not.
        """

    @abstractmethod
    async def ack(self, record: LogRecord) -> None:
        """Remove ``record`` from the log for good (it was handled)."""

    async def ack_many(self, records: list[LogRecord]) -> None:
        """Acknowledge several records (backends may do it in one round trip)."""
        for record in records:
            await self.ack(record)

    @abstractmethod
    async def release(self) -> None:
        """Give the partition up; unacked records go to the next consumer, in order."""


class Log(ABC):
    """A durable, partitioned, append-only work queue (records stay until acked)."""

    name: str
    partitions: int

    @abstractmethod
    async def append(self, partition: int, data: bytes, *, msg_id: str | None = None) -> int:
        """Store ``data`` durably; return its sequence once the medium acknowledged it.

        With ``msg_id``, a second append of the same id within the dedup window stores
        nothing and returns the first one's sequence.
        """

    async def append_many(self, records: Sequence[tuple[int, bytes, str | None]]) -> list[int]:
        """Store every ``(partition, data, msg_id)`` durably; their sequences, in order.

        Backends pipeline the batch (NATS: every publish sent before any
        acknowledgement is awaited), so records of one partition are stored in the order
        given unless the medium failed one publish and kept a later one; then the failed
        one is appended again after it (deduplicated by its ``msg_id``). This default
        appends them one at a time, in order.
        """
        return [await self.append(p, data, msg_id=msg_id) for p, data, msg_id in records]

    @abstractmethod
    async def claim(self, partition: int, consumer: str) -> LogConsumer:
        """Become ``partition``'s consumer (the same name may re-claim its own claim).

        Raises :class:`PartitionBusyError` while another consumer holds it.
        """

    @abstractmethod
    async def evict(self, partition: int, consumer: str) -> None:
        """Remove ``consumer``'s claim on ``partition`` (it is dead or fenced)."""

    @abstractmethod
    async def claimants(self, partition: int) -> list[str]:
        """The consumers holding ``partition`` now (at most one)."""

    async def claimed(self) -> dict[int, list[str]]:
        """Every claimed partition and the consumers holding it, in one look where the
        backend can (NATS: one listing of the stream's consumers); this default asks
        :meth:`claimants` partition by partition."""
        found: dict[int, list[str]] = {}
        for partition in range(self.partitions):
            holders = await self.claimants(partition)
            if holders:
                found[partition] = holders
        return found

    @abstractmethod
    async def depth(self, partition: int | None = None) -> int:
        """Records not yet acked, in one partition or in all."""


class Subscription(ABC):
    """A live subscription to a topic; :meth:`close` stops delivery."""

    @abstractmethod
    async def close(self) -> None:
        """Stop delivering messages to this subscription's handler."""


#: Bytes of a medium's ``max_payload`` kept for its own headers (stream name, expected
#: sequences, batch ids), besides those a caller adds (a message id).
HEADROOM = 512


class Backend(ABC):
    """One node's connection to one cluster's shared medium."""

    #: The URL this backend was opened with (credentials removed).
    url: str
    #: Cluster name: every bucket, subject and topic is namespaced by it.
    cluster: str
    #: This node's name.
    node: str
    #: What the layers above seal the records they store with, and check the records
    #: they read against (the cluster sets it: ``Cluster(secret=...)``); the backend
    #: itself carries bytes and never looks inside.
    keyring: Keyring = UNSIGNED

    @property
    def failover_time(self) -> float:
        """Seconds the medium may be without a leader (writes failing) before it recovers
        on its own — a stream-leader election — with every TTL counted afresh from then.
        A node whose renewals fail for up to this long pauses its work but keeps its keys
        (see ``Cluster``); 0 for a medium that does not elect."""
        return 0.0

    @property
    def reconnect_spread(self) -> tuple[float, float]:
        """(move, return): how long a live process may have no responder for a moment
        while its connection is away — it *moves* to another server when its own dies
        (see :attr:`server_lost_at`), and clients *return* to a restarted server up to the
        longest reconnect delay apart. A crash is told from a move only by a longer
        silence, and from a return only by a silence after the prober itself came back.
        (0, 0): connections never move."""
        return 0.0, 0.0

    @property
    def server_lost_at(self) -> float | None:
        """When (``time.monotonic``) the medium last lost one of its servers, so that the
        connections it held are moving to the others; None: never since we connected (or
        a medium of one server)."""
        return None

    @property
    @abstractmethod
    def connected(self) -> bool:
        """True while this node can talk to the medium right now (False before
        :meth:`connect`, while reconnecting, and once closed). The liveness probe reads it."""

    @property
    def closed_reason(self) -> str | None:
        """Why the connection was closed for good underneath us (the medium's last error,
        as :meth:`on_closed` callbacks may want to say); None while it is not, or unknown."""
        return None

    @property
    def max_payload(self) -> int | None:
        """The most bytes one message to the medium may have, headers included (NATS: the
        server's ``max_payload``); None: no limit known. Callers keep
        :data:`HEADROOM` bytes of it for the medium's own headers and subject."""
        return None

    @abstractmethod
    async def connect(self) -> None:
        """Connect to the medium; raises :class:`BackendError` with a clear reason."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect and stop serving. Safe to call twice."""

    @abstractmethod
    async def kv(self, bucket: str, *, ttl_keys: bool = False) -> KeyValue:
        """Open (creating if needed) a bucket of this cluster.

        ``ttl_keys`` declares that keys will be written with a TTL and watchers must see
        their expiry.
        """

    async def log(
        self,
        name: str,
        *,
        partitions: int,
        dedup_window: float = 120.0,
        replicas: int | None = None,
    ) -> Log:
        """Open (creating if needed) the partitioned log ``name`` of this cluster."""
        raise BackendError(f"backend {self.url} does not provide partitioned logs yet")

    async def existing_log(self, name: str) -> Log | None:
        """Open the log ``name`` as it exists, with its own partition count (and dedup
        window); None when no such log exists. For producers that know a log by name only
        (an outside client), and must never create one."""
        raise BackendError(f"backend {self.url} does not provide partitioned logs yet")

    @abstractmethod
    async def serve(self, handler: RequestHandler, limits: ServeLimits | None = None) -> None:
        """Answer requests addressed to this node with ``handler`` until :meth:`close`,
        at most as much at once as ``limits`` allow (unbounded when None)."""

    @abstractmethod
    async def request(self, node: str, payload: bytes, *, timeout: float) -> bytes:
        """Send a request to ``node`` and wait for its reply."""

    @abstractmethod
    async def publish(self, topic: str, payload: bytes) -> None:
        """Send ``payload`` to every current subscriber of ``topic`` (at most once)."""

    @abstractmethod
    async def subscribe(self, topic: str, handler: MessageHandler) -> Subscription:
        """Deliver messages published on ``topic`` to ``handler`` until closed."""

    @abstractmethod
    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (synchronously, cheap) each time the connection comes back."""

    @abstractmethod
    def on_data_loss(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(why)`` (synchronously, cheap) when this backend finds that the
        medium lost data it held — a server restarted with an empty store, whose buckets
        and logs it had to create again. Only the node that re-created them may learn it
        here; the others learn it from the records (see ``cloister.cluster.control``)."""

    @abstractmethod
    def on_closed(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (synchronously) if the connection is closed for good, not by
        :meth:`close`: the node can no longer reach the medium and must stop at once."""
