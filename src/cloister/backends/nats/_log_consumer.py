"""The claim of one partition of a log: a durable pull consumer and what it delivered.

- ``fetch`` keeps at most one pull request outstanding and collects what arrives in a
  buffer owned by the consumer, so a cancelled fetch loses nothing. The request is a long
  poll (it lives :data:`LONG_POLL` seconds, whatever the fetch's own timeout, with the
  server's idle heartbeats every :data:`IDLE_HEARTBEAT` seconds): an idle partition costs
  one request per long poll, not one per fetch. A pull that falls silent (no heartbeat
  for two of them), a reconnect or a leader change ends it early. Deliveries lost on
  the wire (a reconnect, a gap in the consumer sequence) would otherwise stay pending
  for an hour: the consumer then re-creates its durable and takes every unacknowledged
  record again, in order, except those it already handed out (their acks still count).
- ``ack`` is a plain (fire-and-forget) JetStream ack. The consumer remembers recent acks
  until the server's ack floor passes them, checks every few seconds, after any sign of
  trouble (a reconnect, a leader change) and before ``release`` that the server applied
  them, and sends the missing ones again; ``release`` deletes the durable only then (or
  after ``op_timeout``), so a graceful handoff does not hand acknowledged records on.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections import deque
from dataclasses import dataclass

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSub
from nats.js import api

from cloister._backoff import Backoff
from cloister.backends.base import LogConsumer, LogRecord, PartitionBusyError
from cloister.backends.nats._errors import NATS_ERRORS, translate
from cloister.backends.nats._log_admin import ConsumerAdmin, consumer_name
from cloister.errors import BackendError, BackendUnavailableError, ConfigurationError

log = logging.getLogger("cloister.backends.nats")

MSG_ID = "Nats-Msg-Id"
#: Acks remembered until the server shows it applied them (sent again if it lost them).
RECENT_ACKS = 20_000
#: Seconds between checks that a busy consumer's acks were applied when nothing went
#: wrong (acks are lost only with the connection or the consumer's leader, and both are
#: seen: a reconnect, a 409 to the waiting pull): a safety net, not the way acks are kept.
AUDIT_INTERVAL = 60.0
#: The shortest a fetch waits: one round trip to the server for what is stored.
MIN_WAIT = 0.1
#: Seconds a pull request stays open at the server (a long poll): what an idle partition
#: costs is one request per this long.
LONG_POLL = 30.0
#: Seconds between the server's idle heartbeats on an open pull request.
IDLE_HEARTBEAT = 5.0
#: How long after a pull request expired we still wait for the server to say so.
PULL_GRACE = 0.5
#: Pacing of the polls for the server's ack floor before a release.
SETTLE_BACKOFF = Backoff(0.005, 0.1)


class _NotJetStream(ValueError):
    """A reply subject that is not a JetStream ack subject."""


def delivery_of(reply: str) -> tuple[int, int, int, int]:
    """(stream sequence, consumer sequence, times delivered, stored at in ns) from the ack
    subject of a JetStream delivery: ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream
    seq>.<consumer seq>.<ns>.<pending>``, or the same after a domain and an account hash
    (with a trailing token or not). nats-py's ``msg.metadata`` builds the same figures as
    two dataclasses and a datetime: a tenth of a consuming node's loop at full speed."""
    tokens = reply.split(".")
    count = len(tokens)
    if count == 9:
        first = 4
    elif count in (11, 12):
        first = 6
    else:
        raise _NotJetStream(reply)
    if tokens[0] != "$JS" or tokens[1] != "ACK":
        raise _NotJetStream(reply)
    return (
        int(tokens[first + 1]),
        int(tokens[first + 2]),
        int(tokens[first]),
        int(tokens[first + 3]),
    )


@dataclass(slots=True)
class _Pull:
    """The one outstanding pull request: its reply subject, what it may still bring."""

    subject: str
    remaining: int
    ends_at: float  # loop time after which we stop waiting for its end-of-request status
    heard_at: float  # loop time of the last message or heartbeat it brought


class NatsLogConsumer(LogConsumer):
    """The claim of one partition: a durable pull consumer and the records it delivered."""

    def __init__(
        self,
        admin: ConsumerAdmin,
        claims: dict[int, NatsLogConsumer],
        partition: int,
        name: str,
        subject: str,
    ) -> None:
        self.partition = partition
        self.name = name
        self.durable = consumer_name(partition, name)
        self._log = admin
        self._claims = claims  # the log's local claims: we leave it when we end
        self._conn = admin.conn
        self._subject = subject
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{admin.stream}.{self.durable}"
        # delivered, not yet handed out: the message and delivery_of(its reply)
        self._buffer: deque[tuple[Msg, tuple[int, int, int, int]]] = deque()
        self._held: dict[int, Msg] = {}  # handed out, not acked: sequence -> ack handle
        self._stale: set[int] = set()  # held, with a handle from before the last re-sync
        self._recent: dict[int, str] = {}  # acks sent, not known applied: sequence -> subject
        self._acks = 0  # acks sent to the current durable
        # when to check next that our acks were applied (loop time)
        self._audit_at = asyncio.get_running_loop().time() + AUDIT_INTERVAL
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
        self._reconnects = self._conn.reconnects
        self._ended: str | None = None

    def __repr__(self) -> str:
        return f"<NatsLogConsumer {self.durable} of {self._log.stream}>"

    # -- lifecycle --------------------------------------------------------------------

    async def _start(self) -> None:
        await self._subscribe()
        try:
            await self._log.create(self.durable, self._subject, self.name, self.partition)
        except BaseException:
            await self._close("the claim failed")
            raise

    async def _subscribe(self) -> None:
        what = f"consume partition {self.partition} of log {self._log.name!r}"
        nc = self._conn.client(what)
        self._inbox = nc.new_inbox()
        try:
            self._sub = await nc.subscribe(f"{self._inbox}.*", cb=self._on_message)
        except NATS_ERRORS as exc:
            raise translate(exc, what, self._conn.url) from exc

    async def _unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        self._pull = None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except NATS_ERRORS as exc:
                log.debug("%r: unsubscribe failed: %s", self, exc)

    async def _close(self, reason: str) -> None:
        """End this claim locally (the durable is left alone)."""
        if self._ended is None:
            self._ended = reason
        self._arrived.set()  # a waiting fetch wakes up and raises
        await self._unsubscribe()
        if self._claims.get(self.partition) is self:
            del self._claims[self.partition]

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
                found = delivery_of(msg.reply or "")
            except ValueError:
                log.warning("%r: ignoring a message without JetStream metadata", self)
                return
            sequence, delivery = found[0], found[1]
            if delivery > self._last_delivery + 1:
                self._lost = True  # some delivery never reached us
            self._last_delivery = max(self._last_delivery, delivery)
            if sequence in self._recent:  # acked, but not where it was redelivered from
                if await self._send_ack(str(msg.reply)):
                    self._acks += 1
                    self._recent[sequence] = str(msg.reply)
            elif sequence in self._held:  # redelivered after a re-sync: its new handle
                self._held[sequence] = msg
                self._stale.discard(sequence)
            else:
                self._buffer.append((msg, found))
            pull = self._pull
            if pull is not None:
                pull.remaining -= 1
                pull.heard_at = asyncio.get_running_loop().time()
                if pull.remaining <= 0:
                    self._pull = None
        elif status == "100":  # idle heartbeat: the pull is alive
            pull = self._pull
            if pull is not None and msg.subject == pull.subject:
                pull.heard_at = asyncio.get_running_loop().time()
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
                if self._lost or self._reconnects != self._conn.reconnects:
                    self._pull = None  # the server may have lost it with the connection
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
                if pull is not None and now - pull.heard_at > 2 * IDLE_HEARTBEAT + PULL_GRACE:
                    # No heartbeat for two of them: the server forgot the request (it
                    # restarted, or its leader moved without telling us).
                    log.debug("%r: the pull request fell silent; asking again", self)
                    self._disturbed = True
                    pull = self._pull = None
                if pull is None or now >= pull.ends_at:
                    pull = await self._request(batch, LONG_POLL)
                wake = min(deadline, pull.ends_at, pull.heard_at + 2 * IDLE_HEARTBEAT + PULL_GRACE)
                try:
                    async with asyncio.timeout_at(wake):
                        await self._arrived.wait()
                except TimeoutError:
                    pass

    def _hand_out(self, batch: int) -> list[LogRecord]:
        records: list[LogRecord] = []
        while self._buffer and len(records) < batch:
            msg, (sequence, _, delivered, stored_ns) = self._buffer.popleft()
            self._held[sequence] = msg
            msg_id = msg.headers.get(MSG_ID) if msg.headers else None
            records.append(
                LogRecord(
                    self.partition,
                    sequence,
                    bytes(msg.data),
                    msg_id,
                    delivered,
                    ref=msg,
                    stored_at=stored_ns / 1e9,
                )
            )
        return records

    async def _request(self, batch: int, expires: float) -> _Pull:
        what = f"fetch from partition {self.partition} of log {self._log.name!r}"
        nc = self._conn.client(what)
        if self._sub is None:
            await self._subscribe()
        now = asyncio.get_running_loop().time()
        pull = _Pull(f"{self._inbox}.{next(self._pulls)}", batch, now + expires + PULL_GRACE, now)
        body = json.dumps(
            {
                "batch": batch,
                "expires": int(expires * 1e9),
                "idle_heartbeat": int(IDLE_HEARTBEAT * 1e9),
            }
        ).encode()
        try:
            await nc.publish(self._next, body, reply=pull.subject)
        except NATS_ERRORS as exc:
            raise translate(exc, what, self._conn.url) from exc
        self._pull = pull
        return pull

    async def _diagnose(self) -> None:
        """A pull met "no responders": the durable is gone, or has no leader right now."""
        what = f"fetch from partition {self.partition} of log {self._log.name!r}"
        if await self._log.info(self.durable, what) is None:
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
            info = await self._log.info(self.durable, what)
            if info is None:
                await self._close("its consumer was deleted (evicted)")
                self._check()
            assert info is not None
            self._reconnects = self._conn.reconnects
            self._disturbed = True  # acks sent just before the drop may be lost
            delivered = 0 if info.delivered is None else info.delivered.consumer_seq
            if delivered <= self._last_delivery:
                return  # nothing went missing
            self._lost = True
        log.info("%r: deliveries went missing; re-creating the durable", self)
        await self._settle(what)
        await self._unsubscribe()
        self._buffer.clear()
        await self._log.delete(self.durable, what)
        self._last_delivery = self._acks = 0
        self._stale = set(self._held)
        await self._subscribe()
        try:
            await self._log.create(self.durable, self._subject, self.name, self.partition)
        except PartitionBusyError:
            await self._close("another consumer took the partition")
            raise
        self._lost = False
        self._reconnects = self._conn.reconnects

    # -- acks and release ---------------------------------------------------------------

    async def ack(self, record: LogRecord) -> None:
        self._check()
        sequence = record.sequence
        msg = self._held.pop(sequence, None) or record.ref
        if not isinstance(msg, Msg) or not msg.reply:
            raise BackendError(f"record {sequence} carries no JetStream ack handle")
        what = f"ack {sequence} in partition {self.partition} of log {self._log.name!r}"
        nc = self._conn.client(what)
        try:
            await nc.publish(msg.reply, b"+ACK")
        except NATS_ERRORS as exc:
            self._held[sequence] = msg
            raise translate(exc, what, self._conn.url) from exc
        # A handle from before a re-sync acks the old durable's delivery; the current
        # durable's redelivery of it is acked on arrival (it is in _recent).
        if sequence in self._stale:
            self._stale.discard(sequence)
        else:
            self._acks += 1
        self._recent[sequence] = msg.reply
        if len(self._recent) > RECENT_ACKS:
            del self._recent[next(iter(self._recent))]

    async def ack_many(self, records: list[LogRecord]) -> None:
        """Acknowledge ``records`` (one plain ``+ACK`` publish each, no round trip): the
        same as :meth:`ack` one by one, with the checks and names made once."""
        self._check()
        what = f"ack {len(records)} records in partition {self.partition} of log {self._log.name!r}"
        publish = self._conn.client(what).publish
        held, stale, recent = self._held, self._stale, self._recent
        for record in records:
            sequence = record.sequence
            msg = held.pop(sequence, None) or record.ref
            if not isinstance(msg, Msg) or not msg.reply:
                raise BackendError(f"record {sequence} carries no JetStream ack handle")
            try:
                await publish(msg.reply, b"+ACK")
            except NATS_ERRORS as exc:
                held[sequence] = msg
                raise translate(exc, what, self._conn.url) from exc
            if sequence in stale:  # as in ack(): its redelivery is acked on arrival
                stale.discard(sequence)
            else:
                self._acks += 1
            recent[sequence] = msg.reply
        while len(recent) > RECENT_ACKS:
            del recent[next(iter(recent))]

    async def _send_ack(self, subject: str) -> bool:
        nc = self._conn.nc
        if nc is None or not nc.is_connected:
            return False
        try:
            await nc.publish(subject, b"+ACK")
        except NATS_ERRORS:
            return False
        return True

    async def _audit(self) -> None:
        """Check that the server applied our acks; send again those it lost."""
        self._disturbed = False
        now = asyncio.get_running_loop().time()
        self._audit_at = now + AUDIT_INTERVAL
        what = f"check the acks of partition {self.partition} of log {self._log.name!r}"
        try:
            info = await self._log.info(self.durable, what, patient=False)
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
        await self._log.delete(self.durable, what)

    async def _settle(self, what: str) -> None:
        """Wait (up to ``op_timeout``) until the server has applied the acks we sent.

        Acks are fire-and-forget; deleting the durable before they are applied would
        hand acknowledged records to the next consumer again. Acks still missing after a
        moment are sent once more.
        """
        started = time.monotonic()
        deadline = started + self._conn.options.op_timeout
        delays = SETTLE_BACKOFF.delays()  # a poll of the ack floor, not a retry
        resent = False
        while True:
            try:
                info = await self._log.info(self.durable, what)
            except BackendError as exc:
                log.debug("%r: acks not confirmed: %s", self, exc)
                return
            if info is None or self._applied(info):
                return
            if not resent and time.monotonic() - started > 0.05:
                await self._repair(info)
                resent = True
            pause = next(delays)
            if time.monotonic() + pause > deadline:
                log.debug("%r: %s records still pending at release", self, info.num_ack_pending)
                return
            await asyncio.sleep(pause)
