"""Partitioned logs on JetStream: one work-queue stream per log, one pull consumer per claim.

Layout: log ``<name>`` of cluster ``<cluster>`` is the stream
:func:`~cloister.backends._names.log_stream` (``cloister_<len>_<cluster>_3_log_<len>_<name>``)
on the subjects ``cloister.<cluster>.log.<name>.<partition>``, with work-queue retention
(a record is removed once acknowledged), file storage, and a duplicate window of
``dedup_window`` seconds. The partition count is kept in the stream's metadata
(``cloister.partitions``) and checked on every open.

Mapping of the contract:

- ``append`` = a JetStream publish (with ``Nats-Msg-Id`` when a message id is given);
  the sequence is the stream sequence, so it grows within a partition. A duplicate
  returns the first one's sequence. "No responders" (a stream between leaders) and
  timeouts are retried with backoff for ``2 * op_timeout``, with the same message id; a
  timed-out append of a record without one may then be stored twice (the inbox always
  gives one). ``append_many`` pipelines the publishes (prebuilt frames, acked per batch:
  :mod:`._publish`) and appends the failed ones again.
- ``claim`` = a durable pull consumer ``p<partition>-<consumer>`` (the consumer name
  escaped to what NATS allows) filtered on the partition's subject. A work-queue stream
  refuses a second consumer with an overlapping filter (JetStream error 10100): that
  is :class:`PartitionBusyError`, enforced by the server rather than by any node's view.
  Re-claiming under the same name replaces the durable, so the new claim starts from
  the oldest unacknowledged record as any new consumer does.
- the consumer acknowledges explicitly with a one-hour ``ack_wait``: a record delivered
  to a consumer is not delivered to it again; it goes to the next consumer when the
  claim is released or evicted (the durable deleted).
- the durables are managed by :mod:`._log_admin`; a claim's ``fetch`` and ``ack`` (its
  delivery buffer, and how its acks are made sure of) are :mod:`._log_consumer`'s.
- ``LogRecord.deliveries`` counts deliveries by the current durable only: a record
  handed to the next consumer starts again at 1.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import nats.errors
from nats.js import api

from cloister.backends.base import Log, LogConsumer
from cloister.backends.nats._connection import NatsConnection
from cloister.backends.nats._errors import NATS_ERRORS, NO_RESPONDERS, translate
from cloister.backends.nats._log_admin import MAX_NAME, ConsumerAdmin, consumer_name
from cloister.backends.nats._log_consumer import MSG_ID, NatsLogConsumer
from cloister.backends.nats._publish import FramedPublisher, framed_ok
from cloister.backends.nats._streams import (
    PATIENT_BACKOFF,
    open_stream,
    retry_while_unavailable,
    stream_info,
    wait_for_leader,
)
from cloister.errors import BackendError, BackendUnavailableError, ConfigurationError

log = logging.getLogger("cloister.backends.nats")

PARTITIONS = "cloister.partitions"


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
    conn: NatsConnection,
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
    info, created = await open_stream(conn, wanted, what)
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
        await wait_for_leader(conn, info, what)
        return created
    except NATS_ERRORS as exc:
        raise translate(exc, what, conn.url) from exc


class NatsLog(Log):
    """A partitioned log of one cluster on JetStream (see the module docstring)."""

    def __init__(
        self, conn: NatsConnection, name: str, stream: str, prefix: str, partitions: int
    ) -> None:
        self.name = name
        self.partitions = partitions
        self.stream = stream
        self.prefix = prefix
        self._conn = conn
        self._admin = ConsumerAdmin(conn, name, stream)
        self._claims: dict[int, NatsLogConsumer] = {}
        self._subjects = [f"{prefix}.{partition}" for partition in range(partitions)]
        self._framed = FramedPublisher()

    def __repr__(self) -> str:
        return f"<NatsLog {self.stream} ({self.partitions} partitions) of {self._conn.url}>"

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
        return self._conn.options.op_timeout

    # -- producing --------------------------------------------------------------------

    async def append(self, partition: int, data: bytes, *, msg_id: str | None = None) -> int:
        subject = self.subject(partition)
        if msg_id is not None and (not isinstance(msg_id, str) or not msg_id):
            raise ConfigurationError(f"msg_id must be a non-empty str, got {msg_id!r}")
        payload = bytes(data)
        what = f"append to partition {partition} of log {self.name!r}"
        budget = 2 * self._op_timeout
        deadline = time.monotonic() + budget

        async def publish() -> int:
            js = self._conn.jetstream("append")
            ack = await js.publish(
                subject,
                payload,
                timeout=max(0.1, min(self._op_timeout, deadline - time.monotonic())),
                stream=self.stream,
                headers=None if msg_id is None else {MSG_ID: msg_id},
            )
            return int(ack.seq)

        try:
            # Nobody stored it (no responders), or we cannot know (timeout): again.
            return await retry_while_unavailable(
                publish,
                budget,
                on=(*NO_RESPONDERS, nats.errors.TimeoutError, BackendUnavailableError),
                backoff=PATIENT_BACKOFF,
                stop=lambda: self._conn.closed,
            )
        except (*NATS_ERRORS, BackendUnavailableError) as exc:
            raise translate(exc, what, self._conn.url) from exc

    async def append_many(self, records: Sequence[tuple[int, bytes, str | None]]) -> list[int]:
        """Pipelined: every record is published before any acknowledgement is awaited
        (as prebuilt frames, see :mod:`._publish`; through ``publish_async`` on a nats-py
        without the internals that takes). A record whose acknowledgement failed or did
        not come within ``op_timeout`` is appended again, with its ``msg_id``, through
        :meth:`append` and its retries — so a record that was stored and only its ack
        lost is not stored twice.

        Unlike :meth:`append` the publishes carry no expected-stream header: the
        partition subjects belong to this stream alone (see ``_names``), and on a
        batch the header's bytes and the server's check are a sizeable share.
        """
        subjects, partitions = self._subjects, self.partitions
        for partition, _, msg_id in records:  # checked before anything is sent
            if not (type(partition) is int and 0 <= partition < partitions):
                self.subject(partition)  # raises what is wrong with it
            if msg_id is not None and not (type(msg_id) is str and msg_id):
                raise ConfigurationError(f"msg_id must be a non-empty str, got {msg_id!r}")
        what = f"append {len(records)} records to log {self.name!r}"
        answers: list[int | None] = []
        try:
            nc = self._conn.client(what)
            if framed_ok(nc):
                answers = await self._framed.publish(
                    nc,
                    [
                        (subjects[partition], data if type(data) is bytes else bytes(data), msg_id)
                        for partition, data, msg_id in records
                    ],
                    self._op_timeout,
                )
            else:
                answers = await self._publish_async(records, what)
        except (*NATS_ERRORS, BackendUnavailableError) as exc:
            # The connection broke mid-batch: what has no answer goes through append.
            log.debug("%s: pipelined publish interrupted: %r", what, exc)
        sequences: list[int] = []
        for n, (partition, data, msg_id) in enumerate(records):
            sequence = answers[n] if n < len(answers) else None
            if sequence is None:
                sequence = await self.append(partition, data, msg_id=msg_id)
            sequences.append(sequence)
        return sequences

    async def _publish_async(
        self, records: Sequence[tuple[int, bytes, str | None]], what: str
    ) -> list[int | None]:
        """:meth:`append_many`'s publishes through nats-py's ``publish_async``: the
        sequence of each record, None for one not acknowledged within ``op_timeout``."""
        pending: list[asyncio.Future[api.PubAck]] = []
        try:
            publish = self._conn.jetstream(what).publish_async
            for partition, data, msg_id in records:
                headers = None if msg_id is None else {MSG_ID: msg_id}
                payload = data if type(data) is bytes else bytes(data)
                pending.append(await publish(self._subjects[partition], payload, headers=headers))
        except (*NATS_ERRORS, BackendUnavailableError) as exc:
            # What was sent is awaited below; the rest goes through append.
            log.debug("%s: pipelined publish interrupted after %d: %r", what, len(pending), exc)
        if not await _all_done(pending, self._op_timeout):
            for sent in pending:
                sent.cancel()  # no ack in time: appended again
        return [
            int(sent.result().seq) if not sent.cancelled() and sent.exception() is None else None
            for sent in pending
        ]

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
        fresh = NatsLogConsumer(self._admin, self._claims, partition, consumer, subject)
        await fresh._start()
        old = self._claims.get(partition)
        if old is not None and old is not fresh:
            await old._close("the partition was claimed again")
        self._claims[partition] = fresh
        return fresh

    async def evict(self, partition: int, consumer: str) -> None:
        self.subject(partition)
        what = f"evict {consumer!r} from partition {partition} of log {self.name!r}"
        await self._admin.delete(consumer_name(partition, consumer), what)
        local = self._claims.get(partition)
        if local is not None and local.name == consumer:
            await local._close("evicted")

    async def claimants(self, partition: int) -> list[str]:
        self.subject(partition)
        return await self._admin.claimants(partition)

    async def claimed(self) -> dict[int, list[str]]:
        return await self._admin.claimed()

    async def depth(self, partition: int | None = None) -> int:
        what = f"depth of log {self.name!r}"
        if partition is None:
            info = await stream_info(self._conn, self.stream, what)
            return 0 if info is None else int(info.state.messages or 0)
        subject = self.subject(partition)
        info = await stream_info(self._conn, self.stream, what, subjects_filter=subject)
        if info is None:
            return 0
        return int((info.state.subjects or {}).get(subject, 0))


async def _all_done(futures: list[asyncio.Future[api.PubAck]], timeout: float) -> bool:
    """Wait until every future is done (a failed one too), for up to ``timeout`` seconds;
    False when some are not. One callback per future and one wake-up in all, where
    awaiting each in turn would wake this task once per acknowledgement."""
    left = sum(1 for future in futures if not future.done())
    if not left:
        return True
    everything: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def one_done(_: asyncio.Future[api.PubAck]) -> None:
        nonlocal left
        left -= 1
        if not left and not everything.done():
            everything.set_result(None)

    for future in futures:
        if not future.done():
            future.add_done_callback(one_done)
    try:
        async with asyncio.timeout(timeout):
            await everything
    except TimeoutError:
        return False
    return True
