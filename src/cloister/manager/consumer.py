"""Feeding workers from the durable inbox: one consumer loop per owned partition.

The manager takes partitions when it settles on a topology and gives them up when they
move away. Taking a partition claims it in the backend; if the previous owner's claim is
still there (it crashed, or was fenced), it is evicted — safe only because the cluster's
handoff barrier has passed, so that owner has released everything or is gone.

Claiming costs most of a handoff on a replicated medium (a JetStream consumer on an R3
stream is a new Raft group: 0.2-1 s under load), so partitions are *prepared*: as soon
as a node adopts an epoch that gives it partitions (before the barrier), it claims each
one the moment its previous holder has given it up — evicting no member of the epoch,
and fetching nothing, so that nothing is delivered before the settle has taken the
stored state over. The settle then only starts fetching from those claims. The medium
still decides who holds a partition (a claim is refused while another holds it); what
changed is when.

Records are acknowledged by the manager after the worker's ``handle_cast`` returned;
acks go through one task so the hot path never awaits. At most ``max_in_flight`` records
are delivered and not yet acknowledged on a node: back-pressure towards the log, not
memory growth.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

from cloister._backoff import Backoff
from cloister._quiet import Quiet
from cloister._tasks import Supervisor, wait_event
from cloister.backends import LogConsumer, LogRecord, PartitionBusyError
from cloister.errors import BackendError, FencedError, LeaseLapsedError, WireFormatError
from cloister.manager.claims import PartitionsFencedError
from cloister.manager.state import Unstorable
from cloister.store.inbox import Inbox, InboxMessage

log = logging.getLogger("cloister.manager.consumer")

_YIELD_AFTER = 0.005  # seconds of delivery between yields to the event loop
_CLAIMS_AT_ONCE = 16  # partition claims (or releases) in flight at once
#: Pacing of the looks at who holds the partitions being prepared (one listing each).
PREPARE_BACKOFF = Backoff(0.02, 0.25)

Deliver = Callable[[InboxMessage, LogConsumer], None]
BeforeAck = Callable[[list[Any]], Awaitable[Mapping[Any, Unstorable]]]
"""Called with the keys of a batch of records before they are acked (persist state).

Returns the keys whose state could not be stored (too large, not encodable): their
records that state included are parked as dead letters with the reason, not acked.

:class:`~cloister.errors.FencedError`: none of them may be acked;
:class:`~cloister.manager.claims.PartitionsFencedError`: the partitions it names were
abandoned (their acks are dropped), the others' acks go on — or wait, when its
``unavailable`` says their state is not stored yet; ``BackendError``: they all wait."""


def claimant_node(claimant: str) -> str | None:
    """The node a :func:`claimant_name` names (None for a name of another form)."""
    node, dot, incarnation = claimant.rpartition(".")
    if not dot or len(incarnation) != 8 or not all(c in "0123456789abcdef" for c in incarnation):
        return None
    return node


def claimant_name(node: str, incarnation: int) -> str:
    """The name this process claims inbox partitions under: the node name and its
    incarnation (fixed width, so the name is unambiguous). A process that took the node's
    name over after this one was presumed dead claims under another name and evicts
    this one's claims; should this one wake up and release its claims, it deletes its
    own, never the new process's."""
    return f"{node}.{incarnation & 0xFFFFFFFF:08x}"


class PartitionConsumers:
    """Owner of this node's partition claims, fetch loops and acks.

    ``claimant`` is the name the claims are made under (:func:`claimant_name`; the node
    name when None, as for a manager without a cluster).
    """

    def __init__(
        self,
        inbox: Inbox,
        node: str,
        deliver: Deliver,
        supervisor: Supervisor,
        *,
        max_in_flight: int = 4096,
        batch: int = 256,
        before_ack: BeforeAck | None = None,
        claimant: str | None = None,
    ) -> None:
        self.inbox = inbox
        self.node = node
        self.claimant = node if claimant is None else claimant
        self.max_in_flight = max_in_flight
        self.batch = batch
        self.in_flight = 0
        self.parked = 0
        #: Records no worker could take (undecodable or misplaced), parked at once.
        self.refused = 0
        self._refusals_log = Quiet()
        self._deliver = deliver
        self._before_ack = before_ack
        self._supervisor = supervisor
        self._consumers: dict[int, LogConsumer] = {}
        self._loops: dict[int, asyncio.Task[None]] = {}
        self._wanted: set[int] = set()  # partitions we should consume (some maybe not yet)
        self._claimer: asyncio.Task[None] | None = None
        self._claiming = asyncio.Lock()
        # Claimed ahead of the settle that gives them to us, not fetched yet (prepare()).
        self._prepared: dict[int, LogConsumer] = {}
        self._preparing: set[int] = set()  # still held by their previous consumer
        self._preparer: asyncio.Task[None] | None = None
        self._prepare_wake = asyncio.Event()
        self._members: set[str] = set()  # of the epoch being prepared: their claims stay
        self._room = asyncio.Event()
        self._room.set()
        # Acks are batched: the hot path appends, one task sends them.
        self._to_ack: list[tuple[LogConsumer, LogRecord, Any]] = []
        self._acking: list[tuple[LogConsumer, LogRecord, Any]] = []  # the batch being sent
        self._sending = 0  # acks of the batch the acker is sending
        self._ack_wake = asyncio.Event()
        self._ack_round = asyncio.Event()  # set (and replaced) after each batch is sent
        self._acker = supervisor.spawn(self._ack_loop(), "inbox acks")

    @property
    def partitions(self) -> set[int]:
        """The partitions this node consumes now."""
        return set(self._consumers)

    @property
    def held_or_wanted(self) -> set[int]:
        """The partitions this node consumes, is still trying to claim, or prepares."""
        return set(self._consumers) | self._wanted | set(self._prepared) | self._preparing

    # -- preparing the partitions of the next settle ------------------------------------------

    async def prepare(self, partitions: set[int], members: Collection[str] | None = None) -> None:
        """Claim ``partitions`` (those of an adopted epoch) ahead of its settle, in the
        background: each as soon as nobody else holds it. Nothing is fetched (see the
        module doc), and only the claims of nodes not among the epoch's ``members`` are
        evicted: the handoff barrier waits for every member to release what it gives up
        (so a member's claim is never taken), never for a node the epoch left out (so
        its claim is evicted now as it would be at the settle). What was prepared before
        and is not in ``partitions`` any more is given up first, so that no claim of
        ours outlives our acknowledgement of an epoch that moves it. ``members`` None:
        those given last time."""
        if members is not None:
            self._members = set(members)
        wanted = set(partitions)
        dropped = (self._preparing | set(self._prepared)) - wanted
        if dropped:
            await self._stop_preparing()
            await self._give_up_all([self._prepared.pop(p) for p in dropped if p in self._prepared])
        # (those the background claimer retries are left to it: one claim per partition)
        self._preparing = wanted - set(self._consumers) - set(self._prepared) - self._wanted
        if self._preparing and self._preparer is None and self.inbox.log is not None:
            self._preparer = self._supervisor.spawn(self._prepare_loop(), "inbox pre-claims")
        self._prepare_wake.set()

    async def _stop_preparing(self) -> None:
        """Start no more claims ahead; wait for those under way (cancelled, one could
        leave a claim behind that nobody here knows of)."""
        self._preparing = set()
        self._prepare_wake.set()
        task = self._preparer
        if task is not None:
            await asyncio.wait({task})

    async def _prepare_loop(self) -> None:
        log_ = self.inbox.log
        assert log_ is not None
        gate = asyncio.Semaphore(_CLAIMS_AT_ONCE)

        async def claim(partition: int, stale: list[str]) -> None:
            async with gate:
                if partition not in self._preparing:
                    return
                try:
                    for holder in stale:
                        log.info("partition %d: evicting the claim of %s (gone)", partition, holder)
                        await log_.evict(partition, holder)
                    consumer = await log_.claim(partition, self.claimant)
                except BackendError as exc:  # taken back meanwhile, or the medium is away
                    log.debug("partition %d not prepared yet: %s", partition, exc)
                    return
                self._preparing.discard(partition)
                self._prepared[partition] = consumer

        delays = PREPARE_BACKOFF.delays()
        try:
            while self._preparing:
                self._prepare_wake.clear()
                try:
                    held = await log_.claimed()
                except BackendError as exc:
                    log.debug("partitions not prepared yet: %s", exc)
                    held = {}
                free = {}
                for partition in sorted(self._preparing):
                    others = [h for h in held.get(partition, ()) if h != self.claimant]
                    if all(claimant_node(h) not in self._members for h in others):
                        free[partition] = others
                await asyncio.gather(*(claim(p, stale) for p, stale in free.items()))
                if self._preparing:
                    await wait_event(self._prepare_wake, next(delays))
        finally:
            self._preparer = None

    async def _adopt_prepared(self, partitions: set[int]) -> int:
        """Start fetching the prepared claims of ``partitions`` that still stand; give
        the others up. Claims still under way are waited for: they are the ones a take
        would make.

        A prepared claim may have been evicted meanwhile: a node still settling an
        older epoch that gave it the partition evicts whatever holds it (rightly: that
        epoch's barrier has passed). So the claims are looked at once more here, where
        our own epoch's barrier has passed and nobody takes them any more.
        """
        await self._stop_preparing()
        prepared, self._prepared = self._prepared, {}
        if not prepared:
            return 0
        log_ = self.inbox.log
        assert log_ is not None
        try:
            held = await log_.claimed()
        except BackendError as exc:  # cannot tell: claimed again the usual way
            log.debug("prepared claims not checked (%s): claiming afresh", exc)
            held = {}
        adopted, stale = 0, []
        for partition, consumer in prepared.items():
            standing = self.claimant in held.get(partition, ())
            if standing and partition in partitions and partition not in self._consumers:
                self._start_fetching(partition, consumer)
                adopted += 1
            else:
                stale.append(consumer)
        await self._give_up_all(stale)
        return adopted

    # -- taking and giving up -------------------------------------------------------------------

    async def take(self, partitions: set[int]) -> int:
        """Claim and start consuming ``partitions`` (evicting stale claims); how many it
        started consuming now (prepared claims included).

        A partition that cannot be claimed now (the medium is slow or away) is retried in
        the background until it is claimed or no longer ours — never an error here.
        """
        self._wanted = set(partitions)
        started = await self._adopt_prepared(self._wanted)
        before = len(self._consumers)
        missing = sorted(partitions - set(self._consumers))
        if missing:
            # Concurrently: each claim is a few round trips (list the claimants, evict a
            # stale one, create the durable), and a takeover moves dozens of partitions.
            async with self._claiming:  # never a claim in flight while partitions go
                gate = asyncio.Semaphore(_CLAIMS_AT_ONCE)

                async def claim(partition: int) -> None:
                    async with gate:
                        # a release meanwhile takes it off the list
                        if partition in self._wanted and partition not in self._consumers:
                            await self._claim_now(partition)

                results = await asyncio.gather(*(claim(p) for p in missing), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        if self._wanted - set(self._consumers) and self._claimer is None:
            self._claimer = self._supervisor.spawn(self._claim_later(), "inbox claims")
        return started + len(self._consumers) - before

    async def _claim(self, partition: int) -> bool:
        async with self._claiming:  # never a claim in flight while partitions are given up
            if partition not in self._wanted or partition in self._consumers:
                return partition in self._consumers
            if partition in self._prepared:  # claimed ahead: taken by the next settle
                return True
            return await self._claim_now(partition)

    async def _claim_now(self, partition: int) -> bool:
        log_ = self.inbox.log
        assert log_ is not None
        try:
            for holder in await log_.claimants(partition):
                if holder != self.claimant:
                    log.info("partition %d: evicting the stale claim of %s", partition, holder)
                    await log_.evict(partition, holder)
            consumer = await log_.claim(partition, self.claimant)
        except BackendError as exc:  # PartitionBusyError included
            log.warning("partition %d not claimed yet (%s); retrying", partition, exc)
            return False
        self._start_fetching(partition, consumer)
        return True

    def _start_fetching(self, partition: int, consumer: LogConsumer) -> None:
        self._consumers[partition] = consumer
        self._loops[partition] = self._supervisor.spawn(
            self._fetch_loop(consumer), f"inbox partition {partition}"
        )

    async def _claim_later(self) -> None:
        delays = Backoff(0.2, 2.0).delays()
        try:
            while missing := self._wanted - set(self._consumers):
                await asyncio.sleep(next(delays))
                for partition in sorted(missing):
                    await self._claim(partition)
        finally:
            self._claimer = None

    def stop_fetching(self, partitions: set[int]) -> None:
        """Stop pulling new records for ``partitions`` (already delivered ones finish)."""
        for partition in partitions:
            loop = self._loops.pop(partition, None)
            if loop is not None:
                loop.cancel()

    async def release(self, partitions: set[int]) -> None:
        """Stop wanting ``partitions``; flush pending acks, then give those held up
        (prepared ones too), all at once."""
        ahead = self._preparing | set(self._prepared)
        if ahead & partitions:
            await self.prepare(ahead - partitions)
        async with self._claiming:
            self._wanted -= partitions
        self.stop_fetching(partitions)
        await self.flush_acks(partitions)
        held = [self._consumers.pop(p) for p in partitions if p in self._consumers]
        await self._give_up_all(held)

    async def _give_up_all(self, consumers: list[LogConsumer]) -> None:
        """Release ``consumers`` concurrently: on a replicated medium each is a few round
        trips (its acks confirmed, its durable deleted), and a handoff gives up several."""
        gate = asyncio.Semaphore(_CLAIMS_AT_ONCE)

        async def give_up(consumer: LogConsumer) -> None:
            async with gate:
                try:
                    await consumer.release()
                except BackendError as exc:
                    log.warning(
                        "partition %d: release failed (%s); the next owner evicts",
                        consumer.partition,
                        exc,
                    )

        await asyncio.gather(*(give_up(consumer) for consumer in consumers))

    def abandon(self, partitions: set[int]) -> None:
        """Give ``partitions`` up at once, acking nothing more of them (the medium refused
        their state: another node claimed them). Their delivered records are not acked
        here — their next consumer gets them again; the claims are released in the
        background (or evicted by that consumer)."""
        self._wanted -= partitions
        self.stop_fetching(partitions)
        for partition in partitions:
            consumer = self._consumers.pop(partition, None)
            if consumer is not None:
                self._supervisor.spawn(self._give_up(consumer), f"abandon {partition}")

    async def _give_up(self, consumer: LogConsumer) -> None:
        try:
            await consumer.release()
        except BackendError as exc:
            log.info(
                "partition %d: release failed (%s); the next owner evicts", consumer.partition, exc
            )

    def ack(self, consumer: LogConsumer, record: LogRecord, key: Any = None) -> None:
        """Acknowledge ``record`` of ``key`` (its handler returned); never blocks."""
        to_ack = self._to_ack
        to_ack.append((consumer, record, key))
        if len(to_ack) == 1:  # the first of a batch wakes the acker; the rest ride along
            self._ack_wake.set()

    def forget(self, count: int = 1) -> None:
        """``count`` delivered records will not be acked by us (their partition moved)."""
        self._done(count)

    async def flush_acks(self, partitions: set[int], timeout: float = 5.0) -> None:
        """Wait until every queued ack of ``partitions`` has been sent (at most ``timeout``
        seconds: an unreachable medium must not hold a handoff; unsent acks mean
        redeliveries, which the next owner skips by watermark).

        Only those partitions' acks: under load the partitions this node keeps ack all
        the time, so waiting for no ack at all would hold every handoff for ``timeout``.
        And only the acks of claims still held: those of a claim the medium took from us
        (evicted while we were cut off) are never sent (``_held``), so waiting for them
        held a release, and a suspension after it, for the whole ``timeout``.
        """
        consumers = self._consumers
        try:
            async with asyncio.timeout(timeout):
                while any(
                    consumer.partition in partitions
                    and consumers.get(consumer.partition) is consumer
                    for consumer, _, _ in itertools.chain(self._to_ack, self._acking)
                ):
                    self._ack_wake.set()
                    await self._ack_round.wait()
        except TimeoutError:
            log.warning("%d ack(s) not sent before giving the partitions up", len(self._to_ack))

    def _done(self, count: int) -> None:
        # Never below zero: acks of a batch taken before reset() may settle after it.
        self.in_flight = max(0, self.in_flight - count)
        if self.in_flight < self.max_in_flight:
            self._room.set()

    def reset(self) -> None:
        """Nothing is delivered any more (every partition given up, every worker stopped):
        re-derive the in-flight count as zero, whatever was lost on the way (a park that
        failed, a record dropped by a crash of the medium), so the next partitions this
        node takes are fetched at once instead of waiting for room that never comes."""
        if self.held_or_wanted:
            raise RuntimeError("reset() while partitions are still held or wanted")
        if self.in_flight:
            log.info("%d record(s) were still counted in flight; starting afresh", self.in_flight)
        self.in_flight = 0
        self._room.set()

    @property
    def acks_pending(self) -> int:
        """Records handled here whose acks are queued or being sent."""
        return len(self._to_ack) + self._sending

    def resync(self, really_in_flight: int) -> None:
        """Take ``really_in_flight`` as the in-flight count (the stall watchdog counted
        what is delivered and unsettled) and wake the fetch loops if there is room."""
        if self.in_flight != really_in_flight:
            log.warning(
                "%d record(s) counted in flight, %d really: re-derived",
                self.in_flight,
                really_in_flight,
            )
        self.in_flight = really_in_flight
        if self.in_flight < self.max_in_flight:
            self._room.set()

    async def _ack_loop(self) -> None:
        while True:
            await self._ack_wake.wait()
            self._ack_wake.clear()
            batch, self._to_ack = self._to_ack, []
            if not batch:
                continue
            self._acking = batch
            self._sending = len(batch)
            settled = len(batch)  # acks that leave our hands in this round
            try:
                if self._before_ack is not None:
                    try:
                        unstorable = await self._before_ack(
                            [key for _, _, key in batch if key is not None]
                        )
                        if unstorable:
                            batch, parked = self._park_unstorable(batch, unstorable)
                            settled -= parked
                    except PartitionsFencedError as exc:
                        # Those partitions are abandoned (their acks are dropped below);
                        # the others' state was stored, unless the medium failed too.
                        if exc.unavailable is not None:
                            log.warning("state not stored (%s); acks wait", exc.unavailable)
                            kept = self._held(batch)
                            settled -= len(kept)
                            await self._again(kept)
                            continue
                    except LeaseLapsedError as exc:
                        # The node pauses: these acks wait for a renewal (its state then
                        # stands) or for a suspension (which drops this consumer: _held).
                        log.debug("%s; %d ack(s) wait", exc, len(batch))
                        settled = 0
                        await self._again(batch)
                        continue
                    except FencedError as exc:
                        # Never retried blindly: the records go to the key's next owner.
                        log.warning("%s; %d ack(s) dropped, redelivered elsewhere", exc, settled)
                        continue
                    except BackendError as exc:
                        # The state these acks vouch for is not stored: hold them back.
                        log.warning("state not stored (%s); %d ack(s) wait", exc, len(batch))
                        settled = 0
                        await self._again(batch)
                        continue
                by_consumer: dict[LogConsumer, list[LogRecord]] = {}
                for consumer, record, _ in self._held(batch):
                    by_consumer.setdefault(consumer, []).append(record)
                again: list[tuple[LogConsumer, LogRecord, Any]] = []
                for consumer, records in by_consumer.items():
                    try:
                        await consumer.ack_many(records)
                    except BackendError as exc:
                        moved = isinstance(exc, PartitionBusyError)
                        if moved or self._consumers.get(consumer.partition) is not consumer:
                            # The next consumer gets these records again, skips them by
                            # sequence and acks them itself.
                            n, p = len(records), consumer.partition
                            log.info("%d ack(s) of partition %d dropped: %s", n, p, exc)
                            continue
                        # The medium is away a moment: send them again (a repeated ack is
                        # harmless; an unsent one would keep its record pending).
                        log.debug("acks of partition %d wait: %s", consumer.partition, exc)
                        again += [(consumer, record, None) for record in records]
                if again:
                    settled -= len(again)
                    await self._again(again)
            finally:
                self._acking = []
                self._sending = 0
                self._done(settled)
                self._ack_round.set()
                self._ack_round = asyncio.Event()

    def _park_unstorable(
        self, batch: list[tuple[LogConsumer, LogRecord, Any]], unstorable: Mapping[Any, Unstorable]
    ) -> tuple[list[tuple[LogConsumer, LogRecord, Any]], int]:
        """Take out of ``batch`` the records whose effect was in a state that could not
        be stored, and park them (each is acked once parked); the rest is acked now."""
        kept: list[tuple[LogConsumer, LogRecord, Any]] = []
        parked = 0
        for consumer, record, key in batch:
            report = None if key is None else unstorable.get(key)
            if report is None or not report.after < record.sequence <= report.upto:
                kept.append((consumer, record, key))
                continue
            try:
                message = self.inbox.decode(record)
            except WireFormatError:  # it was decoded once: cannot happen, park it raw
                self._supervisor.spawn(self._park(consumer, record, report.reason), "park")
            else:
                self._supervisor.spawn(self.park(consumer, message, report.reason, 1), "park")
            parked += 1
        return kept, parked

    def _held(
        self, acks: list[tuple[LogConsumer, LogRecord, Any]]
    ) -> list[tuple[LogConsumer, LogRecord, Any]]:
        """The acks of partitions we still consume: an abandoned partition's records must
        not be acked (their state was refused), its next consumer gets them again."""
        consumers = self._consumers
        return [a for a in acks if consumers.get(a[0].partition) is a[0]]

    async def _again(self, acks: list[tuple[LogConsumer, LogRecord, Any]]) -> None:
        """Put ``acks`` first in line again and try once more a moment later."""
        self._to_ack[:0] = acks
        await asyncio.sleep(0.2)
        self._ack_wake.set()

    async def _fetch_loop(self, consumer: LogConsumer) -> None:
        while True:
            await self._room.wait()
            try:
                records = await consumer.fetch(min(self.batch, self.max_in_flight), 1.0)
            except PartitionBusyError:
                # Evicted (we were presumed dead) or the medium lost the claim: forget it,
                # so that the next settle on a topology that gives it to us claims it anew.
                log.warning("partition %d was taken from %s", consumer.partition, self.node)
                if self._consumers.get(consumer.partition) is consumer:
                    del self._consumers[consumer.partition]
                    self._loops.pop(consumer.partition, None)
                return
            except BackendError as exc:
                log.debug("partition %d fetch failed: %s", consumer.partition, exc)
                await asyncio.sleep(0.2)
                continue
            self.in_flight += len(records)
            if self.in_flight >= self.max_in_flight:
                self._room.clear()
            await self._deliver_all(consumer, records)

    async def _deliver_all(self, consumer: LogConsumer, records: list[LogRecord]) -> None:
        """Deliver a fetched batch, yielding to the event loop every few milliseconds: on
        ``executor="loop"`` callbacks run inside ``deliver``, and renewals must not wait
        for a whole batch of them."""
        decode, deliver, misplaced = self.inbox.decode, self._deliver, self.inbox.misplaced
        delivered = 0
        began = time.monotonic()
        try:
            for record in records:
                delivered += 1
                try:
                    message = decode(record)
                except WireFormatError as exc:
                    undecodable = f"undecodable: {exc}"
                    self._refused(record, undecodable)
                    self._supervisor.spawn(self._park(consumer, record, undecodable), "park")
                    continue
                reason = misplaced(message)
                if reason is not None:
                    self._refused(record, reason)
                    self._supervisor.spawn(self.park(consumer, message, reason, 0), "park")
                    continue
                deliver(message, consumer)
                if not delivered % 16 and time.monotonic() - began > _YIELD_AFTER:
                    await asyncio.sleep(0)
                    began = time.monotonic()
        except asyncio.CancelledError:
            # The partition was given up mid-batch: the records not delivered are not in
            # flight here (their next consumer gets them).
            self._done(len(records) - delivered)
            raise

    def _refused(self, record: LogRecord, reason: str) -> None:
        """A record no worker can take (undecodable, or of another partition): counted
        as parked, logged once a minute — a producer sending garbage keeps doing it."""
        self.refused += 1
        if self._refusals_log.due():
            log.warning(
                "inbox %r: record %d of partition %d parked as a dead letter (%s); %d such "
                "record(s) so far, logged once a minute",
                self.inbox.name,
                record.sequence,
                record.partition,
                reason[:300],
                self.refused,
            )

    async def _park(self, consumer: LogConsumer, record: LogRecord, reason: str) -> None:
        await self.inbox.park(record, reason)
        self.parked += 1
        self.ack(consumer, record)

    async def park(
        self, consumer: LogConsumer, message: InboxMessage, reason: str, attempts: int
    ) -> None:
        """Park ``message`` as a dead letter, then ack it: it never blocks its key."""
        await self.inbox.park(message.record, reason, attempts=attempts, decoded=message)
        self.parked += 1
        self.ack(consumer, message.record, None)
