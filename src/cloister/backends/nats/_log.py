"""Partitioned logs on JetStream: one work-queue stream per log, one pull consumer per claim.

Layout: log ``<name>`` of cluster ``<cluster>`` is the stream ``cloister_<cluster>_log_<name>``
on the subjects ``cloister.<cluster>.log.<name>.<partition>``, with work-queue retention
(a record is removed once acknowledged), file storage, and a duplicate window of
``dedup_window`` seconds. The partition count is kept in the stream's metadata
(``cloister.partitions``) and checked on every open.

Mapping of the contract:

- ``append`` = a JetStream publish (with ``Nats-Msg-Id`` when a message id is given);
  the sequence is the stream sequence, so it grows within a partition. A duplicate
  returns the first one's sequence. "No responders" (a stream between leaders) and
  timeouts are retried with backoff for ``2 * op_timeout``; a timed-out append of a
  record without a message id may then be stored twice (at-least-once).
- ``claim`` = a durable pull consumer ``p<partition>-<consumer>`` (the consumer name
  escaped to what NATS allows) filtered on the partition's subject. A work-queue stream
  refuses a second consumer with an overlapping filter (JetStream error 10100): that
  is :class:`PartitionBusyError`, enforced by the server rather than by any node's view.
  Re-claiming under the same name replaces the durable, so the new claim starts from
  the oldest unacknowledged record as any new consumer does.
- the consumer acknowledges explicitly with a one-hour ``ack_wait``: a record delivered
  to a consumer is not delivered to it again; it goes to the next consumer when the
  claim is released or evicted (the durable deleted).
- ``fetch`` keeps at most one pull request outstanding and collects what arrives in a
  buffer owned by the consumer, so a cancelled fetch loses nothing. Deliveries lost on
  the wire (a reconnect, a gap in the consumer sequence) would otherwise stay pending
  for an hour: the consumer then re-creates its durable and takes every unacknowledged
  record again, in order, except those it already handed out (their acks still count).
- ``ack`` is a plain (fire-and-forget) JetStream ack. The consumer remembers recent acks
  until the server's ack floor passes them, checks every few seconds, after any sign of
  trouble (a reconnect, a leader change) and before ``release`` that the server applied
  them, and sends the missing ones again; ``release`` deletes the durable only then (or
  after ``op_timeout``), so a graceful handoff does not hand acknowledged records on.
- ``LogRecord.deliveries`` counts deliveries by the current durable only: a record
  handed to the next consumer starts again at 1.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import re
import string
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSub
from nats.js import api

from cloister.backends.base import Log, LogConsumer, LogRecord, PartitionBusyError
from cloister.backends.nats._errors import (
    FILTERED_CONSUMER_NOT_UNIQUE,
    NO_RESPONDERS,
    translate,
)
from cloister.backends.nats._kv import open_stream, stream_info, wait_for_leader
from cloister.errors import BackendError, BackendUnavailableError, ConfigurationError

if TYPE_CHECKING:
    from cloister.backends.nats._backend import NatsBackend

log = logging.getLogger("cloister.backends.nats")
T = TypeVar("T")

MSG_ID = "Nats-Msg-Id"
PARTITIONS = "cloister.partitions"
CONSUMER = "cloister.consumer"
#: How long a delivered, unacknowledged record stays with its consumer. Records go to
#: another consumer when the claim ends, never by redelivery to the same one.
ACK_WAIT = 3600.0
#: Records delivered and not yet acknowledged, per consumer.
MAX_ACK_PENDING = 10_000
#: The longest consumer name we create (the server takes up to 255 characters).
MAX_NAME = 240
#: Acks remembered until the server shows it applied them (sent again if it lost them).
RECENT_ACKS = 20_000
#: Seconds between checks that a busy consumer's acks were applied.
AUDIT_INTERVAL = 5.0
#: The shortest a fetch waits: one round trip to the server for what is stored.
MIN_WAIT = 0.1
#: How long after a pull request expired we still wait for the server to say so.
PULL_GRACE = 0.5
_NATS_ERRORS = (nats.errors.Error, OSError, asyncio.TimeoutError)
_PLAIN = frozenset(string.ascii_letters + string.digits + "_-")
_CONSUMER_NAME = re.compile(r"^p(\d+)-(.+)$")
_ESCAPED = re.compile(r"(?:=[0-9A-F]{2})+")


def consumer_name(partition: int, consumer: str) -> str:
    """The durable's name: ``p<partition>-<consumer>``, other characters as ``=XX``."""
    escaped = "".join(
        c if c in _PLAIN else "".join(f"={b:02X}" for b in c.encode()) for c in consumer
    )
    return f"p{partition}-{escaped}"


def parse_consumer_name(name: str) -> tuple[int, str] | None:
    """``(partition, consumer)`` of a durable named by :func:`consumer_name`, else None."""
    match = _CONSUMER_NAME.match(name)
    if match is None:
        return None
    try:
        consumer = _ESCAPED.sub(lambda m: bytes.fromhex(m[0].replace("=", "")).decode(), match[2])
    except UnicodeDecodeError:
        return None
    return int(match[1]), consumer


def log_stream_config(
    stream: str, subjects: str, *, partitions: int, dedup_window: float, replicas: int
) -> api.StreamConfig:
    """The stream behind a log."""
    return api.StreamConfig(
        name=stream,
        subjects=[subjects],
        retention=api.RetentionPolicy.WORK_QUEUE,
        max_consumers=-1,
        max_msgs=-1,
        max_bytes=-1,
        max_age=0,
        max_msg_size=-1,
        discard=api.DiscardPolicy.OLD,
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=dedup_window,
        metadata={PARTITIONS: str(partitions)},
    )


async def ensure_log_stream(
    backend: NatsBackend,
    stream: str,
    subjects: str,
    *,
    partitions: int,
    dedup_window: float,
    replicas: int,
) -> bool:
    """Create the log's stream or check the existing one; True when it was created.

    The stream has a leader on return (or ``op_timeout`` passed waiting for one).
    """
    what = f"open log {stream!r}"
    wanted = log_stream_config(
        stream, subjects, partitions=partitions, dedup_window=dedup_window, replicas=replicas
    )
    info, created = await open_stream(backend, wanted, what)
    try:
        config = info.config
        if config.retention != api.RetentionPolicy.WORK_QUEUE or config.subjects != [subjects]:
            raise BackendError(
                f"stream {stream} exists but is not a cloister log (retention "
                f"{config.retention}, subjects {config.subjects}); remove it (nats stream rm) "
                "or use another cluster name"
            )
        found = (config.metadata or {}).get(PARTITIONS)
        if found != str(partitions):
            raise ConfigurationError(
                f"log {stream!r} exists with {found} partitions, not {partitions}; the "
                "partition count of a log is fixed for its lifetime"
            )
        await wait_for_leader(backend, info, what)
        return created
    except _NATS_ERRORS as exc:
        raise translate(exc, what, backend.url) from exc


class NatsLog(Log):
    """A partitioned log of one cluster on JetStream (see the module docstring)."""

    def __init__(
        self, backend: NatsBackend, name: str, stream: str, prefix: str, partitions: int
    ) -> None:
        self.name = name
        self.partitions = partitions
        self.stream = stream
        self.prefix = prefix
        self._backend = backend
        self._claims: dict[int, NatsLogConsumer] = {}

    def __repr__(self) -> str:
        return f"<NatsLog {self.stream} ({self.partitions} partitions) of {self._backend.url}>"

    def subject(self, partition: int) -> str:
        """The subject of ``partition`` (checked)."""
        if isinstance(partition, bool) or not isinstance(partition, int):
            raise ConfigurationError(f"a partition is a whole number, not {partition!r}")
        if not 0 <= partition < self.partitions:
            raise ConfigurationError(
                f"log {self.name!r} has partitions 0..{self.partitions - 1}, not {partition}"
            )
        return f"{self.prefix}.{partition}"

    @property
    def _op_timeout(self) -> float:
        return self._backend.options.op_timeout

    # -- producing --------------------------------------------------------------------

    async def append(self, partition: int, data: bytes, *, msg_id: str | None = None) -> int:
        subject = self.subject(partition)
        if msg_id is not None and (not isinstance(msg_id, str) or not msg_id):
            raise ConfigurationError(f"msg_id must be a non-empty str, got {msg_id!r}")
        payload = bytes(data)
        deadline = time.monotonic() + 2 * self._op_timeout
        pause = 0.05
        while True:
            try:
                js = self._backend._jetstream("append")
                ack = await js.publish(
                    subject,
                    payload,
                    timeout=max(0.1, min(self._op_timeout, deadline - time.monotonic())),
                    stream=self.stream,
                    headers=None if msg_id is None else {MSG_ID: msg_id},
                )
                return int(ack.seq)
            except (*NO_RESPONDERS, nats.errors.TimeoutError, BackendUnavailableError) as exc:
                # Nobody stored it (no responders), or we cannot know (timeout): again.
                if self._backend._closed or time.monotonic() + pause > deadline:
                    what = f"append to partition {partition} of log {self.name!r}"
                    raise translate(exc, what, self._backend.url) from exc
                await asyncio.sleep(pause)
                pause = min(2 * pause, 0.5)
            except _NATS_ERRORS as exc:
                what = f"append to partition {partition} of log {self.name!r}"
                raise translate(exc, what, self._backend.url) from exc

    # -- claims -----------------------------------------------------------------------

    async def claim(self, partition: int, consumer: str) -> LogConsumer:
        subject = self.subject(partition)
        if not isinstance(consumer, str) or not consumer:
            raise ConfigurationError(f"a consumer name is a non-empty str, got {consumer!r}")
        if len(consumer_name(partition, consumer)) > MAX_NAME:
            raise ConfigurationError(
                f"consumer name {consumer!r} is too long for NATS once escaped (at most "
                f"{MAX_NAME} characters); use a shorter node name"
            )
        old = self._claims.get(partition)
        if old is not None and old.name == consumer:
            await old._close("superseded by a new claim")
        fresh = NatsLogConsumer(self, partition, consumer, subject)
        await fresh._start()
        old = self._claims.get(partition)
        if old is not None and old is not fresh:
            await old._close("the partition was claimed again")
        self._claims[partition] = fresh
        return fresh

    async def evict(self, partition: int, consumer: str) -> None:
        self.subject(partition)
        what = f"evict {consumer!r} from partition {partition} of log {self.name!r}"
        await self._delete_consumer(consumer_name(partition, consumer), what)
        local = self._claims.get(partition)
        if local is not None and local.name == consumer:
            await local._close("evicted")

    async def claimants(self, partition: int) -> list[str]:
        self.subject(partition)
        prefix = f"p{partition}-"
        found = []
        for name in await self._consumer_names():
            parsed = parse_consumer_name(name) if name.startswith(prefix) else None
            if parsed is not None:
                found.append(parsed[1])
        return sorted(found)

    async def depth(self, partition: int | None = None) -> int:
        what = f"depth of log {self.name!r}"
        if partition is None:
            info = await stream_info(self._backend, self.stream, what)
            return 0 if info is None else int(info.state.messages or 0)
        subject = self.subject(partition)
        info = await stream_info(self._backend, self.stream, what, subjects_filter=subject)
        if info is None:
            return 0
        return int((info.state.subjects or {}).get(subject, 0))

    # -- plumbing for the consumers -----------------------------------------------------

    def _consumer_config(self, durable: str, subject: str, consumer: str) -> api.ConsumerConfig:
        return api.ConsumerConfig(
            name=durable,
            durable_name=durable,
            filter_subject=subject,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT,
            max_deliver=-1,
            max_ack_pending=MAX_ACK_PENDING,
            replay_policy=api.ReplayPolicy.INSTANT,
            metadata={CONSUMER: consumer},
        )

    async def _create_consumer(
        self, durable: str, subject: str, consumer: str, partition: int
    ) -> None:
        """Create the durable afresh: one left from an earlier claim is replaced."""
        what = f"claim partition {partition} of log {self.name!r} for {consumer!r}"
        js = self._backend._jetstream(what)
        config = self._consumer_config(durable, subject, consumer)
        for attempt in range(2):
            try:
                info = await self._call(lambda: js._jsm.add_consumer(self.stream, config))
            except nats.js.errors.APIError as exc:
                if exc.err_code == FILTERED_CONSUMER_NOT_UNIQUE:
                    holders = [c for c in await self.claimants(partition) if c != consumer]
                    held = f"held by {holders[0]!r}" if holders else "held by another consumer"
                    raise PartitionBusyError(
                        f"partition {partition} of log {self.name!r} is {held}"
                    ) from None
                if attempt == 0 and not isinstance(exc, nats.js.errors.ServiceUnavailableError):
                    # An old durable of that name we cannot update: replace it.
                    await self._delete_consumer(durable, what)
                    continue
                raise translate(exc, what, self._backend.url) from exc
            except _NATS_ERRORS as exc:
                raise translate(exc, what, self._backend.url) from exc
            fresh = (
                (info.delivered is None or info.delivered.consumer_seq == 0)
                and not info.num_ack_pending
                and not info.num_waiting
            )
            if fresh or attempt == 1:
                return
            # A durable of that name from an earlier claim (our restart, or a re-claim):
            # records it delivered are still pending with it. Start from scratch.
            await self._delete_consumer(durable, what)
        raise BackendError(f"{what}: could not replace the consumer's earlier durable")

    async def _delete_consumer(self, durable: str, what: str) -> None:
        js = self._backend._jetstream(what)
        try:
            await self._call(lambda: js._jsm.delete_consumer(self.stream, durable))
        except nats.js.errors.NotFoundError:
            return
        except _NATS_ERRORS as exc:
            raise translate(exc, what, self._backend.url) from exc

    async def _consumer_info(
        self, durable: str, what: str, *, patient: bool = True
    ) -> api.ConsumerInfo | None:
        """The durable's info, None when it does not exist; ``patient`` retries."""
        js = self._backend._jetstream(what)
        try:
            if not patient:
                info: api.ConsumerInfo = await js._jsm.consumer_info(self.stream, durable)
                return info
            return await self._call(lambda: js._jsm.consumer_info(self.stream, durable))
        except nats.js.errors.NotFoundError:
            return None
        except _NATS_ERRORS as exc:
            raise translate(exc, what, self._backend.url) from exc

    async def _consumer_names(self) -> list[str]:
        """Every consumer of the stream (paged ``CONSUMER.NAMES``)."""
        what = f"list the consumers of log {self.name!r}"
        nc = self._backend._client(what)
        names: list[str] = []
        subject = f"$JS.API.CONSUMER.NAMES.{self.stream}"
        while True:
            request = json.dumps({"offset": len(names)}).encode()
            try:
                ask = functools.partial(nc.request, subject, request, timeout=self._op_timeout)
                reply = await self._call(ask)
                answer = json.loads(reply.data)
                if "error" in answer:
                    nats.js.errors.APIError.from_error(answer["error"])  # raises
            except nats.js.errors.NotFoundError:
                return names
            except (*_NATS_ERRORS, ValueError) as exc:
                raise translate(exc, what, self._backend.url) from exc
            page = answer.get("consumers") or []
            names.extend(page)
            if not page or len(names) >= int(answer.get("total", 0)):
                return names

    async def _call(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run an idempotent JetStream API call, again on "no responders" or a timeout.

        Consumer operations on a replicated stream wait for the consumer's own leader,
        which may take longer than one ``op_timeout`` while a server is down; repeating
        them is safe (a create of an existing identical durable returns it). Gives up
        after ``2 * op_timeout``.
        """
        deadline = time.monotonic() + 2 * self._op_timeout
        pause = 0.05
        while True:
            try:
                return await attempt()
            except (*NO_RESPONDERS, nats.errors.TimeoutError):
                if self._backend._closed or time.monotonic() + pause > deadline:
                    raise
                await asyncio.sleep(pause)
                pause = min(2 * pause, 0.5)


@dataclass(slots=True)
class _Pull:
    """The one outstanding pull request: its reply subject, what it may still bring."""

    subject: str
    remaining: int
    ends_at: float  # loop time after which we stop waiting for its end-of-request status


class NatsLogConsumer(LogConsumer):
    """The claim of one partition: a durable pull consumer and the records it delivered."""

    def __init__(self, owner: NatsLog, partition: int, name: str, subject: str) -> None:
        self.partition = partition
        self.name = name
        self.durable = consumer_name(partition, name)
        self._log = owner
        self._backend = owner._backend
        self._subject = subject
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{owner.stream}.{self.durable}"
        self._buffer: deque[Msg] = deque()  # delivered, not yet handed out
        self._held: dict[int, Msg] = {}  # handed out, not acked: sequence -> ack handle
        self._stale: set[int] = set()  # held, with a handle from before the last re-sync
        self._recent: dict[int, str] = {}  # acks sent, not known applied: sequence -> subject
        self._acks = 0  # acks sent to the current durable
        self._audit_at = 0.0  # when to check next that our acks were applied
        self._disturbed = False  # a reconnect, an election...: check the acks now
        self._arrived = asyncio.Event()
        self._lock = asyncio.Lock()
        self._sub: NatsSub | None = None
        self._inbox = ""
        self._pulls = itertools.count()
        self._pull: _Pull | None = None
        self._last_delivery = 0  # consumer sequence of the last delivery seen
        self._lost = False  # a delivery went missing: re-create the durable
        self._no_responders = False
        self._reconnects = self._backend.reconnects
        self._ended: str | None = None

    def __repr__(self) -> str:
        return f"<NatsLogConsumer {self.durable} of {self._log.stream}>"

    # -- lifecycle --------------------------------------------------------------------

    async def _start(self) -> None:
        await self._subscribe()
        try:
            await self._log._create_consumer(self.durable, self._subject, self.name, self.partition)
        except BaseException:
            await self._close("the claim failed")
            raise

    async def _subscribe(self) -> None:
        what = f"consume partition {self.partition} of log {self._log.name!r}"
        nc = self._backend._client(what)
        self._inbox = nc.new_inbox()
        try:
            self._sub = await nc.subscribe(f"{self._inbox}.*", cb=self._on_message)
        except _NATS_ERRORS as exc:
            raise translate(exc, what, self._backend.url) from exc

    async def _unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        self._pull = None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except _NATS_ERRORS as exc:
                log.debug("%r: unsubscribe failed: %s", self, exc)

    async def _close(self, reason: str) -> None:
        """End this claim locally (the durable is left alone)."""
        if self._ended is None:
            self._ended = reason
        self._arrived.set()  # a waiting fetch wakes up and raises
        await self._unsubscribe()
        if self._log._claims.get(self.partition) is self:
            del self._log._claims[self.partition]

    def _check(self) -> None:
        if self._ended is not None:
            raise PartitionBusyError(
                f"consumer {self.name!r} no longer holds partition {self.partition} of log "
                f"{self._log.name!r} ({self._ended})"
            )

    # -- deliveries -------------------------------------------------------------------

    async def _on_message(self, msg: Msg) -> None:
        """Called by nats-py for each message on our inbox, in order; never blocks."""
        headers = msg.headers or {}
        status = headers.get("Status")
        if not status:
            try:
                meta = msg.metadata
            except (ValueError, IndexError, AttributeError):
                log.warning("%r: ignoring a message without JetStream metadata", self)
                return
            delivery = int(meta.sequence.consumer)
            if delivery > self._last_delivery + 1:
                self._lost = True  # some delivery never reached us
            self._last_delivery = max(self._last_delivery, delivery)
            sequence = int(meta.sequence.stream)
            if sequence in self._recent:  # acked, but not where it was redelivered from
                if await self._send_ack(str(msg.reply)):
                    self._acks += 1
                    self._recent[sequence] = str(msg.reply)
            elif sequence in self._held:  # redelivered after a re-sync: its new handle
                self._held[sequence] = msg
                self._stale.discard(sequence)
            else:
                self._buffer.append(msg)
            pull = self._pull
            if pull is not None:
                pull.remaining -= 1
                if pull.remaining <= 0:
                    self._pull = None
        elif status == "100":  # idle heartbeat
            return
        else:
            pull = self._pull
            if pull is not None and msg.subject == pull.subject:
                self._pull = None  # 404/408: nothing (more); 409: ended for a reason
            description = str(headers.get("Description", ""))
            if status == "409" and "deleted" in description.lower():
                self._ended = self._ended or "its consumer was deleted (evicted)"
            elif status == "503":
                self._no_responders = self._disturbed = True
            elif status == "409":  # e.g. "Leadership Change": acks in flight may be lost
                self._disturbed = True
        self._arrived.set()

    async def fetch(self, batch: int, timeout: float) -> list[LogRecord]:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ConfigurationError(f"batch must be a whole number >= 1, got {batch!r}")
        async with self._lock:
            loop = asyncio.get_running_loop()
            # Records are in the stream, not here: even fetch(n, 0) asks the server.
            deadline = loop.time() + max(MIN_WAIT, timeout)
            while True:
                self._arrived.clear()
                self._check()
                if self._lost or self._reconnects != self._backend.reconnects:
                    await self._resync()
                    continue
                if self._buffer:
                    return self._hand_out(batch)
                if self._recent and (self._disturbed or loop.time() >= self._audit_at):
                    await self._audit()
                if self._no_responders:
                    self._no_responders = False
                    await self._diagnose()
                now = loop.time()
                if now >= deadline:
                    return []
                pull = self._pull
                if pull is None or now >= pull.ends_at:
                    pull = await self._request(batch, max(0.01, deadline - now))
                try:
                    async with asyncio.timeout_at(min(deadline, pull.ends_at)):
                        await self._arrived.wait()
                except TimeoutError:
                    pass

    def _hand_out(self, batch: int) -> list[LogRecord]:
        records: list[LogRecord] = []
        while self._buffer and len(records) < batch:
            msg = self._buffer.popleft()
            meta = msg.metadata
            sequence = int(meta.sequence.stream)
            self._held[sequence] = msg
            msg_id = msg.headers.get(MSG_ID) if msg.headers else None
            records.append(
                LogRecord(
                    self.partition,
                    sequence,
                    bytes(msg.data),
                    msg_id,
                    int(meta.num_delivered),
                    ref=msg,
                )
            )
        return records

    async def _request(self, batch: int, expires: float) -> _Pull:
        what = f"fetch from partition {self.partition} of log {self._log.name!r}"
        nc = self._backend._client(what)
        if self._sub is None:
            await self._subscribe()
        loop = asyncio.get_running_loop()
        pull = _Pull(
            f"{self._inbox}.{next(self._pulls)}", batch, loop.time() + expires + PULL_GRACE
        )
        body = json.dumps({"batch": batch, "expires": int(expires * 1e9)}).encode()
        try:
            await nc.publish(self._next, body, reply=pull.subject)
        except _NATS_ERRORS as exc:
            raise translate(exc, what, self._backend.url) from exc
        self._pull = pull
        return pull

    async def _diagnose(self) -> None:
        """A pull met "no responders": the durable is gone, or has no leader right now."""
        what = f"fetch from partition {self.partition} of log {self._log.name!r}"
        if await self._log._consumer_info(self.durable, what) is None:
            await self._close("its consumer was deleted (evicted)")
            self._check()
        raise BackendUnavailableError(
            f"{what}: the consumer has no leader right now (an election); retrying may help"
        )

    async def _resync(self) -> None:
        """Deliveries may have been lost on the wire: take everything unacked again.

        Records already handed out are not handed out again: when their redelivery
        arrives it only replaces their ack handle.
        """
        what = f"re-sync partition {self.partition} of log {self._log.name!r}"
        if not self._lost:  # after a reconnect: did the server deliver more than we got?
            info = await self._log._consumer_info(self.durable, what)
            if info is None:
                await self._close("its consumer was deleted (evicted)")
                self._check()
            assert info is not None
            self._reconnects = self._backend.reconnects
            self._disturbed = True  # acks sent just before the drop may be lost
            delivered = 0 if info.delivered is None else info.delivered.consumer_seq
            if delivered <= self._last_delivery:
                return  # nothing went missing
            self._lost = True
        log.info("%r: deliveries went missing; re-creating the durable", self)
        await self._settle(what)
        await self._unsubscribe()
        self._buffer.clear()
        await self._log._delete_consumer(self.durable, what)
        self._last_delivery = self._acks = 0
        self._stale = set(self._held)
        await self._subscribe()
        try:
            await self._log._create_consumer(self.durable, self._subject, self.name, self.partition)
        except PartitionBusyError:
            await self._close("another consumer took the partition")
            raise
        self._lost = False
        self._reconnects = self._backend.reconnects

    # -- acks and release ---------------------------------------------------------------

    async def ack(self, record: LogRecord) -> None:
        self._check()
        sequence = record.sequence
        msg = self._held.pop(sequence, None) or record.ref
        if not isinstance(msg, Msg) or not msg.reply:
            raise BackendError(f"record {sequence} carries no JetStream ack handle")
        what = f"ack {sequence} in partition {self.partition} of log {self._log.name!r}"
        nc = self._backend._client(what)
        try:
            await nc.publish(msg.reply, b"+ACK")
        except _NATS_ERRORS as exc:
            self._held[sequence] = msg
            raise translate(exc, what, self._backend.url) from exc
        # A handle from before a re-sync acks the old durable's delivery; the current
        # durable's redelivery of it is acked on arrival (it is in _recent).
        if sequence in self._stale:
            self._stale.discard(sequence)
        else:
            self._acks += 1
        self._recent[sequence] = msg.reply
        if len(self._recent) > RECENT_ACKS:
            del self._recent[next(iter(self._recent))]

    async def _send_ack(self, subject: str) -> bool:
        nc = self._backend._nc
        if nc is None or not nc.is_connected:
            return False
        try:
            await nc.publish(subject, b"+ACK")
        except _NATS_ERRORS:
            return False
        return True

    async def _audit(self) -> None:
        """Check that the server applied our acks; send again those it lost."""
        self._disturbed = False
        now = asyncio.get_running_loop().time()
        self._audit_at = now + AUDIT_INTERVAL
        what = f"check the acks of partition {self.partition} of log {self._log.name!r}"
        try:
            info = await self._log._consumer_info(self.durable, what, patient=False)
        except BackendError as exc:
            log.debug("%r: %s", self, exc)
            self._audit_at = now + 1.0  # soon again, without holding up this fetch
            return
        if info is not None:
            await self._repair(info)

    def _applied(self, info: api.ConsumerInfo) -> bool:
        """True when the server applied every ack we sent (forgets those it shows applied).

        Then the records pending with the durable are at most those it delivered minus
        the acks we sent; deliveries still on their way only make it look worse.
        """
        floor = 0 if info.ack_floor is None else info.ack_floor.stream_seq
        for sequence in [s for s in self._recent if s <= floor]:
            del self._recent[sequence]
        delivered = 0 if info.delivered is None else info.delivered.consumer_seq
        return (info.num_ack_pending or 0) <= delivered - self._acks

    async def _repair(self, info: api.ConsumerInfo) -> None:
        """Send again the acks the server may have lost (acking twice is harmless).

        An ack is fire-and-forget: one in flight while the consumer's leader changes, or
        while our connection drops, is lost, and its record would stay pending here and
        go to the next consumer once more.
        """
        if not self._applied(info):
            log.debug("%r: sending %d recent acks again", self, len(self._recent))
            for subject in list(self._recent.values()):
                await self._send_ack(subject)

    async def release(self) -> None:
        if self._ended is not None:
            return
        what = f"release partition {self.partition} of log {self._log.name!r}"
        await self._settle(what)
        await self._close("released")
        await self._log._delete_consumer(self.durable, what)

    async def _settle(self, what: str) -> None:
        """Wait (up to ``op_timeout``) until the server has applied the acks we sent.

        Acks are fire-and-forget; deleting the durable before they are applied would
        hand acknowledged records to the next consumer again. Acks still missing after a
        moment are sent once more.
        """
        started = time.monotonic()
        deadline = started + self._log._op_timeout
        pause = 0.005
        resent = False
        while True:
            try:
                info = await self._log._consumer_info(self.durable, what)
            except BackendError as exc:
                log.debug("%r: acks not confirmed: %s", self, exc)
                return
            if info is None or self._applied(info):
                return
            if not resent and time.monotonic() - started > 0.05:
                await self._repair(info)
                resent = True
            if time.monotonic() + pause > deadline:
                log.debug("%r: %s records still pending at release", self, info.num_ack_pending)
                return
            await asyncio.sleep(pause)
            pause = min(2 * pause, 0.1)
