"""What every source does: decode, key, store durably, and only then acknowledge.

A source takes messages from a broker queue, turns each into ``(key, message, msg_id)``
with your key function, puts it into a durable inbox with
``inbox.put(key, message, msg_id=msg_id)`` and acknowledges the broker only once the
inbox has stored it. A source is given the :class:`~cloister.store.inbox.Inbox`, or
anything with an ``inbox`` attribute (:class:`HasInbox`, e.g. a started
:class:`~cloister.DynamicManager`), read at each put. Run one on every node: the broker
spreads its messages over them, and the inbox brings each message to the node that owns
its key.

The key function::

    def key(body: Any, meta: SourceMessage) -> tuple[key, message] | tuple[key, message, msg_id]

``body`` is the decoded body (``decode="json"`` by default); ``meta`` carries the raw
body, headers, subject or routing key, the redelivery flag and the broker's message id.
Return the worker id and the message for its ``handle_cast``; a third item overrides the
message id used to drop duplicates (the default comes from the broker, see each source;
``None`` turns deduplication off). For example::

    def key(body, meta):
        return body["order"], {"qty": body["qty"]}, f"order-{body['order']}-{body['seq']}"

It runs synchronously on the event loop, in delivery order: keep it fast and pure.

What happens to a message:

- Stored: acknowledged (``counters["stored"]``).
- Malformed (the body does not decode, the key function raises or returns something that
  is not a key and a message, the inbox cannot encode the message): parked in the inbox's
  dead letters with the reason and the raw body (``inbox.dead_letters()``), then
  acknowledged (``counters["parked"]``). It never stops the source or blocks the queue.
  Once the decoder or the key function is fixed, ``source.replay_parked()`` runs them
  again and stores those that now make a message.
- The inbox cannot store it right now (backend unreachable, back-pressure): it is *not*
  acknowledged. The source retries in place with backoff (``counters["failed"]`` counts
  the failed attempts) and after ``requeue_after`` seconds gives it back to the broker
  (``counters["released"]``) so that any node may take it. Nothing the broker hears
  acknowledged from us is ever lost; a message that is stored but whose ack is lost comes
  back, and its message id makes the inbox drop the copy.

Per-key order (``mode="partitioned"``, the default): the broker side is split into
``partitions`` (one queue, stream or subject each, ``<prefix>.<p>``; publishers send key
``k`` to ``partition_name(prefix, k, partitions)``) and each node reads only the partitions
the cluster's ring gives it (:mod:`cloister.sources.partitions`). One node at a time
stores a partition's messages, in delivery order per key (different keys concurrently); a
message the inbox cannot take is retried in place, never given back while the partition is
ours, so nothing overtakes it. On a topology change the old owner lets go (stores or gives
back what it holds) before the new one starts. ``mode="shared"``: every node reads one queue, as
competing consumers — the load spreads but two messages for one key in flight on two nodes
can be stored in either order, and a message given back to the broker is stored after the
ones behind it.

Counters add up: ``received == stored + parked + released + in_flight`` at every moment
(``released``: given back to the broker, or taken back by it when a channel closed).

Lifecycle: ``source = await XSource.start(manager, ...)`` then ``await source.stop()``, or
``async with XSource(manager, ...) as source``. Stop the sources before the manager (a
graceful leave): what is in flight gets ``drain_timeout`` seconds to be stored and acked,
and whatever is left is given back to the broker unacknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Collection, Mapping, Set
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, Self, TypedDict

from cloister._backoff import Backoff
from cloister._tasks import Supervisor, wait_event
from cloister.cluster.states import State
from cloister.errors import (
    CloisterError,
    ConfigurationError,
    NotRunningError,
    WireFormatError,
)
from cloister.ring import key_hash
from cloister.sources.decoding import Decoder, resolve_decoder
from cloister.sources.partitions import PartitionFollower
from cloister.store.inbox import Inbox

if TYPE_CHECKING:
    from cloister.cluster import Cluster


class HasInbox(Protocol):
    """What owns an inbox (a started :class:`~cloister.DynamicManager`): a source reads
    ``inbox`` at each put, so it follows the owner's inbox and gets its
    :class:`NotRunningError` when there is none."""

    @property
    def inbox(self) -> Inbox: ...


InboxTarget = Inbox | HasInbox
"""Where a source stores its messages: an inbox, or what has one."""


class SourceError(CloisterError):
    """A source could not connect to its broker or set up its queue or consumer."""


class MissingDependencyError(CloisterError, ImportError):
    """A source needs a package that is not installed (the message names the extra)."""


@dataclass(frozen=True, slots=True)
class SourceMessage:
    """What the key function learns about a broker message besides its decoded body."""

    source: str  # the source's name
    body: bytes  # the raw body
    msg_id: str | None  # the broker's message id (the default dedup id), if any
    subject: str | None = None  # NATS subject, or the AMQP routing key
    headers: Mapping[str, Any] = field(default_factory=dict)
    redelivered: bool = False  # the broker delivered it before (to us or another node)
    sequence: int | None = None  # JetStream stream sequence (None on RabbitMQ)
    content_type: str | None = None
    raw: Any = None  # the client library's own message object


KeyResult = tuple[Any, Any] | tuple[Any, Any, str | None]
KeyFunction = Callable[[Any, SourceMessage], KeyResult]
"""``key(body, meta)`` -> ``(key, message)`` or ``(key, message, msg_id)``."""


Mode = Literal["partitioned", "shared"]
"""``partitioned``: one broker queue per partition, each read by its owner only (per-key
order); ``shared``: one queue, every node competing for its messages (no order)."""


class SourceOptions(TypedDict, total=False):
    """The options every source takes (see :class:`Source`)."""

    mode: Mode
    partitions: int | None
    cluster: Cluster | None
    decode: str | Decoder
    name: str
    put_timeout: float
    retry_backoff: tuple[float, float]
    requeue_after: float
    drain_timeout: float


class Delivery(ABC):
    """One broker message on its way into the inbox (from ``partition``, in that mode)."""

    __slots__ = ("meta", "partition", "problem")

    def __init__(self, meta: SourceMessage, partition: int | None = None) -> None:
        self.meta = meta
        self.partition = partition
        self.problem: str | None = None  # set by the broker's side: park it, with this reason

    @abstractmethod
    async def ack(self) -> None:
        """Tell the broker the message is safe with us."""

    @abstractmethod
    async def release(self) -> None:
        """Give the message back to the broker unacknowledged, for any node to take."""

    async def touch(self) -> None:  # noqa: B027 - optional hook
        """We still work on it (JetStream: postpone redelivery)."""

    def stale(self) -> bool:
        """The broker already took it back (its channel closed): do not store it now."""
        return False


class _Job:
    __slots__ = ("delivery", "done", "key", "message", "msg_id", "partition", "reason")

    def __init__(
        self,
        delivery: Delivery,
        key: Any = None,
        message: Any = None,
        msg_id: str | None = None,
        reason: str | None = None,
    ) -> None:
        self.delivery = delivery
        self.key = key
        self.message = message
        self.msg_id = msg_id
        self.reason = reason  # set: park instead of store
        self.partition = delivery.partition
        self.done = False  # stored or parked (and counted): never given back


FOLLOW_CHECK_INTERVAL = 1.0  # seconds between checks that we read the partitions we own

_PARKING = object()  # the lane of messages on their way to the dead letters

# The inbox refused the message itself: retrying cannot help, so it is parked.
_REFUSED = (WireFormatError, ConfigurationError, TypeError)


def check_names(**values: Any) -> None:
    """Each of ``values`` (option name -> value) is a non-empty string."""
    for option, value in values.items():
        if not isinstance(value, str) or not value:
            raise ConfigurationError(f"{option} must be a non-empty string, got {value!r}")


def check_batch(batch: Any, max_in_flight: Any, *, batches: int) -> int:
    """Check ``batch`` (messages per read) and ``max_in_flight`` (None: ``batches`` x
    batch); returns max_in_flight."""
    if not isinstance(batch, int) or batch < 1:
        raise ConfigurationError(f"batch must be an int >= 1, got {batch!r}")
    max_in_flight = batches * batch if max_in_flight is None else max_in_flight
    if not isinstance(max_in_flight, int) or max_in_flight < batch:
        raise ConfigurationError(f"max_in_flight must be an int >= batch, got {max_in_flight!r}")
    return max_in_flight


def describe(exc: BaseException) -> str:
    """``TypeName: message`` for dead-letter reasons and logs."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for logs and errors)."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)


class Source(ABC):
    """Base of the broker sources: lanes per key, store-then-ack, parking, retries.

    Options common to all sources:

    - ``key``: the key function (see the module documentation).
    - ``mode``: ``"partitioned"`` (default: per-key order, see the module documentation)
      or ``"shared"`` (one queue, competing consumers, no order).
    - ``partitions``: how many partitions the broker side has (partitioned mode; default:
      the target's, i.e. the manager's inbox partitions, so a node reads the partitions of
      the keys it runs). ``cluster``: the cluster whose ring places them (default: the
      manager's).
    - ``decode``: ``"json"`` (default), ``"msgpack"``, ``"bytes"`` (the body as is) or a
      function ``bytes -> value``.
    - ``name``: names the source in logs (``cloister.sources.<name>``) and dead letters.
    - ``put_timeout``: seconds one inbox put may wait for back-pressure (default 30).
    - ``retry_backoff``: ``(first, max)`` seconds between attempts to store (0.05, 2).
    - ``requeue_after``: seconds of failed attempts after which the message is given back
      to the broker (default 10; 0 gives it back after the first failure and a backoff).
    - ``drain_timeout``: seconds :meth:`stop` lets messages in flight finish (default 5).

    ``counters``: ``received``, ``stored``, ``parked``, ``failed`` (failed attempts to
    store), ``released`` (given back unacknowledged, or taken back by the broker),
    ``ack_errors`` (stored, but the ack was lost: the broker delivers it again and the
    inbox drops the copy), ``partitions_taken``, ``partitions_released``. Always
    ``received == stored + parked + released + in_flight``.
    """

    kind: ClassVar[str] = "source"

    def __init__(
        self,
        target: InboxTarget,
        *,
        key: KeyFunction,
        name: str,
        mode: Mode = "partitioned",
        partitions: int | None = None,
        cluster: Cluster | None = None,
        decode: str | Decoder = "json",
        put_timeout: float = 30.0,
        retry_backoff: tuple[float, float] = (0.05, 2.0),
        requeue_after: float = 10.0,
        drain_timeout: float = 5.0,
    ) -> None:
        if not callable(key):
            raise ConfigurationError(
                f"key must be a function (body, meta) -> (key, message), got {key!r}"
            )
        if len(retry_backoff) != 2 or not 0 < retry_backoff[0] <= retry_backoff[1]:
            raise ConfigurationError(
                f"retry_backoff must be (first, max) > 0, got {retry_backoff!r}"
            )
        for option, value in (
            ("put_timeout", put_timeout),
            ("requeue_after", requeue_after),
            ("drain_timeout", drain_timeout),
        ):
            if not isinstance(value, int | float) or value < 0:
                raise ConfigurationError(f"{option} must be a number >= 0, got {value!r}")
        if mode not in ("partitioned", "shared"):
            raise ConfigurationError(f"mode must be 'partitioned' or 'shared', got {mode!r}")
        self.mode: Mode = mode
        self.cluster = cluster if cluster is not None else getattr(target, "cluster", None)
        if partitions is None:
            partitions = getattr(target, "partitions", None)
        if mode == "partitioned":
            if not isinstance(partitions, int) or isinstance(partitions, bool) or partitions < 1:
                raise ConfigurationError(
                    f"partitions must be a whole number >= 1, got {partitions!r} (a "
                    "partitioned source reads as many broker partitions as its target's "
                    "inbox has unless you give partitions=N)"
                )
            if self.cluster is None:
                raise ConfigurationError(
                    f"source {name!r}: mode='partitioned' reads the partitions the cluster's "
                    "ring gives this node; give it a manager started in a cluster, or "
                    "cluster=..., or use mode='shared'"
                )
        self.partitions: int | None = partitions if mode == "partitioned" else None
        placement_group = getattr(target, "placement_group", None)
        self._group: str | None = placement_group() if callable(placement_group) else None
        self.target = target
        self.name = name
        self.log = logging.getLogger(f"cloister.sources.{name}")
        self.put_timeout = put_timeout
        self.retry_backoff = retry_backoff
        self.requeue_after = requeue_after
        self.drain_timeout = drain_timeout
        self._key = key
        self._decoder_name, self._decode = resolve_decoder(decode)
        self.counters: dict[str, int] = {
            "received": 0,
            "stored": 0,
            "parked": 0,
            "failed": 0,
            "released": 0,
            "ack_errors": 0,
            "partitions_taken": 0,
            "partitions_released": 0,
        }
        self.state = "new"  # -> running -> stopping -> stopped
        self._lanes: dict[Any, deque[_Job]] = {}
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._supervisor = Supervisor(f"source {name}")
        # partitioned mode: the partitions read now, their messages in flight, and an
        # event set when one must let go (a job retrying its store gives it back then)
        self._reading: set[int] = set()
        self._load: dict[int, int] = {}
        self._letting_go: dict[int, asyncio.Event] = {}
        self._progress = asyncio.Event()
        self._moves = asyncio.Lock()
        self._follower: PartitionFollower | None = None

    # -- lifecycle --------------------------------------------------------------------------

    @classmethod
    async def start(cls, target: InboxTarget, /, *args: Any, **options: Any) -> Self:
        """Create the source (the class's arguments) and start consuming."""
        source = cls(target, *args, **options)
        await source.open()
        return source

    async def open(self) -> None:
        """Connect to the broker and start consuming (what :meth:`start` and ``async with`` do)."""
        if self.state != "new":
            raise NotRunningError(f"source {self.name!r} is {self.state}; it can start only once")
        try:
            self._inbox()
        except NotRunningError:
            raise ConfigurationError(
                f"source {self.name!r}: the manager has no durable inbox; start it in a "
                "cluster (DynamicManager.start(cluster)) with durable=True"
            ) from None
        self.state = "running"
        try:
            await self._connect()
        except BaseException:
            self.state = "stopping"
            self._stopping.set()
            await self._supervisor.close()
            await self._disconnect()
            self.state = "stopped"
            self._stopped.set()
            raise
        if self.partitions is not None:
            await self._follow()
        self.log.info("source %s started (%s)", self.name, self._describe_mode())

    def _describe_mode(self) -> str:
        if self.partitions is None:
            return "shared queue"
        return f"{len(self._reading)} of {self.partitions} partitions here"

    async def _follow(self) -> None:
        cluster = self.cluster
        assert cluster is not None and self.partitions is not None
        self._follower = PartitionFollower(self, cluster, self.partitions, self._group)
        cluster.add_hook(self._follower)
        await self._catch_up()
        self._supervisor.spawn(self._keep_up(), "follow")

    async def _keep_up(self) -> None:
        """Check every second that we read what the settled topology gives us: heals a
        settle that ran while the hook was being added, and a partition that could not
        be opened (the broker was down)."""
        while not await wait_event(self._stopping, FOLLOW_CHECK_INTERVAL):
            await self._catch_up()

    async def _catch_up(self) -> None:
        async with self._moves:
            # READY means every member acknowledged the topology we hold: its previous
            # owners have let go. (Checked under the lock: a release may have run.)
            cluster, follower = self.cluster, self._follower
            topology = cluster.topology if cluster is not None else None
            if cluster is None or follower is None:
                return
            if cluster.crashed or cluster.state in (State.STOPPING, State.STOPPED):
                # a dead node calls no hook: give its partitions back for the next owner
                # (a RabbitMQ single-active-consumer would wait on us as long as we live)
                await self._apply(set(), grow=False)
            elif topology is not None and cluster.state is State.READY and self.state == "running":
                await self._apply(follower.owned(topology), grow=True)

    async def stop(self) -> None:
        """Stop taking messages; let those in flight finish (``drain_timeout``), then close.

        What did not finish stays unacknowledged and is given back to the broker.
        """
        if self.state in ("stopping", "stopped"):
            await self._stopped.wait()
            return
        if self.state == "new":
            self.state = "stopped"
            self._stopped.set()
            return
        self.state = "stopping"
        self._stopping.set()
        try:
            if self._follower is not None and self.cluster is not None:
                self.cluster.remove_hook(self._follower)
            await self._reassign(set(), grow=False)
            try:
                await self._stop_intake()
            except Exception as exc:
                self.log.warning("source %s: stopping the consumer failed: %s", self.name, exc)
            if not await wait_event(self._idle, self.drain_timeout):
                self.log.warning(
                    "source %s: %d message(s) still in flight after %ss; leaving them "
                    "unacknowledged",
                    self.name,
                    self._in_flight,
                    self.drain_timeout,
                )
            await self._supervisor.close()
            # (a lane cancelled while it acked its head: that one is stored, not given back)
            leftovers = [job for lane in self._lanes.values() for job in lane if not job.done]
            self._lanes.clear()
            self._in_flight = 0
            self._load.clear()
            for job in leftovers:
                await self._release(job, quiet=True)
        finally:
            await self._disconnect()
            self.state = "stopped"
            self._stopped.set()
            self.log.info("source %s stopped (%s)", self.name, self.counters)

    async def __aenter__(self) -> Self:
        if self.state == "new":
            await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def replay_parked(self, ids: Collection[str] | None = None) -> int:
        """Run the messages this source parked (all, or those ``ids``) through the decoder
        and the key function again — after you fixed either — and store those that now
        make an inbox message; returns how many were stored. The others stay parked.

        Needs the inbox, not the broker: it works on a source that was never
        opened too. The key function sees the parked message's subject, headers and
        content type; not the redelivery flag, sequence or client object.
        """
        inbox = self._inbox()
        stored = 0
        for letter in await inbox.dead_letters():
            if letter.source != self.name or letter.raw is None:
                continue
            if ids is not None and letter.id not in ids:
                continue
            meta = _meta_from_storage(self.name, letter.raw, letter.msg_id, letter.meta)
            try:
                key, message, msg_id = self._apply_key(self._decode(letter.raw), meta)
            except Exception as exc:  # _Malformed, or the decoder's own error
                self.log.info("source %s: %s stays parked: %s", self.name, letter.id, exc)
                continue
            try:
                await inbox.put(key, message, msg_id=msg_id, timeout=self.put_timeout)
            except _REFUSED as exc:  # the inbox refuses the message itself
                self.log.info("source %s: %s stays parked: %s", self.name, letter.id, exc)
                continue
            await inbox.discard(letter.id)
            stored += 1
        return stored

    @property
    def in_flight(self) -> int:
        """Messages received and neither acknowledged nor given back yet."""
        return self._in_flight

    # -- for the broker-specific subclasses -------------------------------------------------

    @abstractmethod
    async def _connect(self) -> None:
        """Connect and start consuming; deliveries go to :meth:`_accept`."""

    @abstractmethod
    async def _stop_intake(self) -> None:
        """Stop receiving new deliveries (in-flight ones may still be acked)."""

    @abstractmethod
    async def _disconnect(self) -> None:
        """Close what :meth:`_connect` opened (safe to call after a failed connect)."""

    @abstractmethod
    async def _start_partition(self, partition: int) -> None:
        """Partitioned mode: start reading ``partition`` (deliveries carry it)."""

    @abstractmethod
    async def _stop_partition(self, partition: int) -> None:
        """Partitioned mode: receive nothing more from ``partition`` (what is in flight
        may still be acknowledged or given back)."""

    async def _forget_partition(self, partition: int) -> None:  # noqa: B027 - optional hook
        """Partitioned mode: ``partition`` is let go; close what reading it needed (the
        broker takes back whatever is still unacknowledged)."""

    # -- partitions ---------------------------------------------------------------------------

    @property
    def reading(self) -> frozenset[int]:
        """The partitions this node reads now (empty in shared mode)."""
        return frozenset(self._reading)

    async def _reassign(self, wanted: Set[int], *, grow: bool) -> None:
        """Let go of the partitions read now and not ``wanted`` (concurrently, each drained
        first); with ``grow``, start reading the ``wanted`` ones not read yet."""
        async with self._moves:
            await self._apply(wanted, grow=grow)

    async def _apply(self, wanted: Set[int], *, grow: bool) -> None:
        leaving = self._reading - set(wanted)
        if leaving:
            await asyncio.gather(*(self._let_go(p) for p in sorted(leaving)))
        taking = sorted(set(wanted) - self._reading) if grow and self.state == "running" else []
        for partition in taking:
            await self._take(partition)
        if leaving or taking:
            self.log.info("source %s: %s", self.name, self._describe_mode())

    async def _take(self, partition: int) -> None:
        self._letting_go[partition] = asyncio.Event()
        self._reading.add(partition)
        try:
            await self._start_partition(partition)
        except Exception as exc:
            # It stays ours: the broker keeps its messages, _keep_up tries again.
            self._reading.discard(partition)
            self._letting_go.pop(partition).set()
            try:
                await self._stop_partition(partition)
                await self._forget_partition(partition)
            except Exception as error:
                self.log.debug("source %s: cleaning up: %s", self.name, describe(error))
            self.log.warning(
                "source %s: cannot read partition %d now (%s); trying again in %ss",
                self.name,
                partition,
                describe(exc),
                FOLLOW_CHECK_INTERVAL,
            )
            return
        self.counters["partitions_taken"] += 1

    async def _let_go(self, partition: int) -> None:
        """Stop reading ``partition``, let what is in flight be stored (``drain_timeout``),
        give back the rest, then close what reading it needed."""
        self._reading.discard(partition)
        try:
            await self._stop_partition(partition)
        except Exception as exc:
            self.log.warning(
                "source %s: stopping partition %d failed: %s", self.name, partition, describe(exc)
            )
        if not await self._drained(partition, self.drain_timeout):
            self.log.warning(
                "source %s: partition %d still has %d message(s) in flight after %ss; giving "
                "them back",
                self.name,
                partition,
                self._load.get(partition, 0),
                self.drain_timeout,
            )
        letting_go = self._letting_go.pop(partition, None)
        if letting_go is not None:
            letting_go.set()  # the jobs still queued or retrying give their message back
        # a store under way ends within put_timeout; an ack after the close is lost and the
        # next owner's copy is dropped by its msg_id
        await self._drained(partition, min(self.drain_timeout, self.put_timeout))
        try:
            await self._forget_partition(partition)
        except Exception as exc:
            self.log.warning(
                "source %s: closing partition %d failed: %s", self.name, partition, describe(exc)
            )
        self.counters["partitions_released"] += 1

    async def _drained(self, partition: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._load.get(partition, 0):
            self._progress.clear()
            left = deadline - time.monotonic()
            if left <= 0 or not await wait_event(self._progress, left):
                return not self._load.get(partition, 0)
        return True

    def _accept(self, delivery: Delivery) -> None:
        """A delivery arrived: decode and key it now (in order), store it in its key's lane."""
        self.counters["received"] += 1
        if self.state != "running" or (
            delivery.partition is not None and delivery.partition not in self._reading
        ):  # arrived while stopping or letting its partition go: give it back at once
            self._spawn_release(_Job(delivery))
            return
        meta = delivery.meta
        if delivery.problem is not None:
            parking = (_PARKING, delivery.partition)
            self._enqueue(parking, _Job(delivery, msg_id=meta.msg_id, reason=delivery.problem))
            return
        try:
            body = self._decode(meta.body)
        except Exception as exc:
            reason = f"undecodable body ({self._decoder_name}): {describe(exc)}"
            parking = (_PARKING, delivery.partition)
            self._enqueue(parking, _Job(delivery, msg_id=meta.msg_id, reason=reason))
            return
        try:
            key, message, msg_id = self._apply_key(body, meta)
        except _Malformed as exc:
            parking = (_PARKING, delivery.partition)
            self._enqueue(parking, _Job(delivery, msg_id=meta.msg_id, reason=str(exc)))
            return
        self._enqueue(key, _Job(delivery, key, message, msg_id))

    # -- internals --------------------------------------------------------------------------

    def _apply_key(self, body: Any, meta: SourceMessage) -> tuple[Any, Any, str | None]:
        try:
            result = self._key(body, meta)
        except Exception as exc:
            raise _Malformed(f"key function raised {describe(exc)}") from None
        if not isinstance(result, tuple | list) or len(result) not in (2, 3):
            raise _Malformed(
                "key function returned "
                f"{type(result).__name__}; expected (key, message) or (key, message, msg_id)"
            )
        key, message = result[0], result[1]
        msg_id = result[2] if len(result) == 3 else meta.msg_id
        if msg_id is not None and not isinstance(msg_id, str):
            raise _Malformed(f"key function returned a msg_id of type {type(msg_id).__name__}")
        try:
            key_hash(key)
        except TypeError as exc:
            raise _Malformed(f"key function returned a key the ring cannot place: {exc}") from None
        return key, message, msg_id

    def _enqueue(self, lane_key: Any, job: _Job) -> None:
        self._in_flight += 1
        if job.partition is not None:
            self._load[job.partition] = self._load.get(job.partition, 0) + 1
        lane = self._lanes.get(lane_key)
        if lane is not None:
            lane.append(job)
            return
        lane = self._lanes[lane_key] = deque((job,))
        self._idle.clear()
        self._supervisor.spawn(self._run_lane(lane_key, lane), "lane")

    async def _run_lane(self, lane_key: Any, lane: deque[_Job]) -> None:
        while lane:
            job = lane[0]
            try:
                await self._process(job)
            except Exception:  # a bug of ours must not wedge the key's lane
                self.log.exception("source %s: handling %s failed", self.name, _label(job))
                await self._release(job)
            lane.popleft()
            self._in_flight -= 1
            if job.partition is not None:
                left = self._load.get(job.partition, 0) - 1
                if left > 0:
                    self._load[job.partition] = left
                else:
                    self._load.pop(job.partition, None)
                self._progress.set()
            self._job_done()
        del self._lanes[lane_key]
        if not self._lanes:
            self._idle.set()

    def _job_done(self) -> None:  # noqa: B027 - optional hook
        """A message left our hands (hook for sources that pace their intake)."""

    def _inbox(self) -> Inbox:
        """The inbox now (an owner's may come and go; it raises NotRunningError without)."""
        return self.target if isinstance(self.target, Inbox) else self.target.inbox

    async def _process(self, job: _Job) -> None:
        delivery = job.delivery
        pauses = Backoff(*self.retry_backoff).delays()
        first_failure: float | None = None
        shared = job.partition is None
        # partitioned: given back only when the partition is let go (see _let_go)
        letting_go = (
            self._stopping if job.partition is None else self._letting_go.get(job.partition)
        )
        while True:
            if delivery.stale():
                self.log.debug("source %s: %s went back to the broker", self.name, _label(job))
                self.counters["released"] += 1  # the broker took it back (channel closed)
                return
            if letting_go is None or (not shared and letting_go.is_set()):
                await self._release(job, quiet=True)
                return
            try:
                if job.reason is None:
                    await self._inbox().put(
                        job.key, job.message, msg_id=job.msg_id, timeout=self.put_timeout
                    )
                else:
                    await self._inbox().park_raw(
                        delivery.meta.body,
                        job.reason,
                        source=self.name,
                        msg_id=job.msg_id,
                        meta=_storable_meta(delivery.meta),
                    )
                break
            except Exception as exc:
                if job.reason is None and isinstance(exc, _REFUSED):
                    job.reason = f"the inbox refused it: {describe(exc)}"
                    continue
                self.counters["failed"] += 1
                now = time.monotonic()
                if first_failure is None:
                    first_failure = now
                    self.log.warning(
                        "source %s: could not store %s (%s); it stays unacknowledged, retrying",
                        self.name,
                        _label(job),
                        describe(exc),
                    )
                else:
                    self.log.debug("source %s: still failing: %s", self.name, describe(exc))
                # partitioned: nobody else reads the partition, and giving it back would
                # let the key's next messages overtake it: retry in place while it is ours
                give_back = shared and now - first_failure >= self.requeue_after
                if not give_back:
                    await self._touch(delivery)
                # back off before giving it back too: the broker may hand it to us at once
                if await wait_event(letting_go, next(pauses)) or give_back:
                    await self._release(job)
                    return
        if first_failure is not None:
            self.log.info("source %s: stored %s after retrying", self.name, _label(job))
        job.done = True
        if job.reason is None:
            self.counters["stored"] += 1
        else:
            self.counters["parked"] += 1
            self.log.warning("source %s: parked %s: %s", self.name, _label(job), job.reason)
        try:
            await delivery.ack()
        except Exception as exc:
            self.counters["ack_errors"] += 1
            self.log.warning(
                "source %s: ack of %s failed (%s); the broker will deliver it again (the "
                "inbox drops the copy when it has a msg_id)",
                self.name,
                _label(job),
                describe(exc),
            )

    async def _touch(self, delivery: Delivery) -> None:
        try:
            await delivery.touch()
        except Exception as exc:
            self.log.debug("source %s: keep-alive failed: %s", self.name, describe(exc))

    async def _release(self, job: _Job, *, quiet: bool = False) -> None:
        self.counters["released"] += 1
        if not quiet:
            self.log.warning(
                "source %s: gave %s back to the broker unacknowledged", self.name, _label(job)
            )
        try:
            await job.delivery.release()
        except Exception as exc:  # the channel is gone: the broker has it back anyway
            self.log.debug("source %s: release failed: %s", self.name, describe(exc))

    def _spawn_release(self, job: _Job) -> None:
        try:
            self._supervisor.spawn(self._release(job, quiet=True), "release")
        except RuntimeError:  # closed: the broker takes it back when we disconnect
            self.counters["released"] += 1


def _storable_meta(meta: SourceMessage) -> dict[str, Any]:
    """What ``replay_parked`` needs again of a message's metadata, in wire-safe types."""
    headers = {str(k): v for k, v in meta.headers.items() if isinstance(v, str | int | float)}
    return {"subject": meta.subject, "headers": headers, "content_type": meta.content_type}


def _meta_from_storage(
    source: str, body: bytes, msg_id: str | None, stored: Mapping[str, Any] | None
) -> SourceMessage:
    stored = stored or {}
    headers = stored.get("headers")
    return SourceMessage(
        source=source,
        body=body,
        msg_id=msg_id,
        subject=_str_or_none(stored.get("subject")),
        headers=headers if isinstance(headers, dict) else {},
        content_type=_str_or_none(stored.get("content_type")),
    )


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class _Malformed(Exception):
    """The key function's answer cannot become an inbox message (the text is the reason)."""


def _label(job: _Job) -> str:
    meta = job.delivery.meta
    if job.msg_id is not None:
        return f"message {job.msg_id!r}"
    if meta.sequence is not None:
        return f"message #{meta.sequence}"
    return f"a message for key {job.key!r}" if job.reason is None else "a message"
