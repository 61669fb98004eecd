"""The control plane: the facts a node decides on, the readers that feed them, and
:func:`decide`, the pure function that turns facts into what to do.

The ``members`` bucket holds one record per node; the ``control`` bucket holds the sentry
lease (:data:`SENTRY_KEY`) and the published epoch record (:data:`EPOCH_KEY`). A
:class:`Control` follows both through watches (and re-lists them now and then: watches
are never trusted alone); :func:`read_members` and :func:`read_control` read them once,
for those that only look (:class:`~cloister.observer.Observer`).

:func:`decide` takes no I/O and no clock: ``Cluster`` builds a :class:`Facts` value,
asks for a :class:`Decision` and executes it, so the quorum, publish, adoption and
settle rules are tested without a backend (``tests/cluster/test_decide.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

from cloister import wire
from cloister._tasks import wait_event
from cloister.backends import KeyValue, KVEvent, KVOp
from cloister.cluster.hooks import SuspendReason
from cloister.cluster.membership import MemberRecord
from cloister.cluster.states import State
from cloister.cluster.topology import EpochRecord, Topology
from cloister.errors import BackendError, KeyExistsError, RevisionMismatchError, WireFormatError

log = logging.getLogger("cloister.cluster")

EPOCH_KEY = "epoch"
"""The key of the published epoch record in the ``control`` bucket."""

SENTRY_KEY = "sentry"
"""The key of the sentry lease in the ``control`` bucket."""


@dataclass(slots=True)
class ClusterCounters:
    """What a node counts (exported as metrics)."""

    epochs_adopted: int = 0
    bad_records: int = 0
    fenced: int = 0
    heartbeat_failures: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return asdict(self)

    def __getitem__(self, name: str) -> int:
        """``counters["fenced"]``: read by name, as when the counters were a dict."""
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        value: int = getattr(self, name)
        return value


# -- readers --------------------------------------------------------------------------------


def decode_sentry(value: bytes) -> str:
    """The holder named by a sentry lease; :class:`WireFormatError` if malformed."""
    holder: str = wire.field(wire.decode_map(value, "sentry lease"), "node", str, "sentry lease")
    return holder


async def read_members(
    kv: KeyValue,
) -> tuple[dict[str, MemberRecord], dict[str, WireFormatError]]:
    """Every member record by node name, and the malformed ones' errors by key."""
    records: dict[str, MemberRecord] = {}
    errors: dict[str, WireFormatError] = {}
    for name, entry in (await kv.entries()).items():
        try:
            records[name] = MemberRecord.decode(entry.value)
        except WireFormatError as exc:
            errors[name] = exc
    return records, errors


@dataclass(frozen=True, slots=True)
class ControlSnapshot:
    """The ``control`` bucket read once: the epoch record and the sentry lease's holder
    (None when absent or malformed; the error says which)."""

    epoch: EpochRecord | None = None
    epoch_revision: int | None = None
    epoch_error: WireFormatError | None = None
    sentry: str | None = None
    sentry_error: WireFormatError | None = None


async def read_control(kv: KeyValue) -> ControlSnapshot:
    """Read the ``control`` bucket once."""
    entries = await kv.entries()
    epoch = epoch_revision = epoch_error = sentry = sentry_error = None
    if (entry := entries.get(EPOCH_KEY)) is not None:
        try:
            epoch, epoch_revision = EpochRecord.decode(entry.value), entry.revision
        except WireFormatError as exc:
            epoch_error = exc
    if (entry := entries.get(SENTRY_KEY)) is not None:
        try:
            sentry = decode_sentry(entry.value)
        except WireFormatError as exc:
            sentry_error = exc
    return ControlSnapshot(epoch, epoch_revision, epoch_error, sentry, sentry_error)


class Control:
    """The facts the watches feed: the member records, the epoch record, the sentry.

    Every change wakes the control loop (``wake``); the loop decides, nothing here does.
    """

    def __init__(
        self, node: str, heartbeat: float, counters: ClusterCounters, wake: Callable[[], None]
    ) -> None:
        self.node = node
        self.heartbeat = heartbeat
        self.counters = counters
        self.wake = wake
        self.view: dict[str, MemberRecord] = {}
        self.view_changed_at = 0.0
        self.epoch_record: EpochRecord | None = None
        self.epoch_revision: int | None = None
        self.sentry_holder: str | None = None
        self.resync = asyncio.Event()
        self._members_kv: KeyValue | None = None
        self._control_kv: KeyValue | None = None

    def attach(self, members: KeyValue, control: KeyValue) -> None:
        """The buckets to follow (opened by the node on start)."""
        self._members_kv, self._control_kv = members, control

    # -- members ------------------------------------------------------------------------

    async def follow_members(self, synced: asyncio.Event) -> None:
        """Watch the member records for good; ``synced`` is set after the first listing."""
        assert self._members_kv is not None
        while True:
            try:
                async with self._members_kv.watch() as events:
                    await self.reload_members()
                    synced.set()
                    async for event in events:
                        self.apply_member_event(event)
            except BackendError as exc:
                log.debug("members watch of %s interrupted: %s", self.node, exc)
                await asyncio.sleep(self.heartbeat / 4)

    async def reload_members(self) -> None:
        """Replace the view with a full listing."""
        assert self._members_kv is not None
        view, errors = await read_members(self._members_kv)
        for exc in errors.values():
            self._bad_member(exc)
        if {n: r.spec for n, r in view.items()} != {n: r.spec for n, r in self.view.items()}:
            self.view_changed_at = time.monotonic()
        self.view = view
        self.wake()

    def apply_member_event(self, event: KVEvent) -> None:
        """One change seen by the members watch."""
        if event.op is KVOp.PUT and event.value is not None:
            record = self.decode_member(event.value)
            if record is not None:
                self.note_member(record)
        elif self.view.pop(event.key, None) is not None:
            self.view_changed_at = time.monotonic()
            self.wake()

    def note_member(self, record: MemberRecord) -> None:
        """A member record was written (ours included)."""
        old = self.view.get(record.node)
        self.view[record.node] = record
        if old is None or old.spec != record.spec:
            self.view_changed_at = time.monotonic()
        self.wake()

    def decode_member(self, data: bytes) -> MemberRecord | None:
        """The record in ``data``; None (counted, logged) if malformed."""
        try:
            return MemberRecord.decode(data)
        except WireFormatError as exc:
            self._bad_member(exc)
            return None

    def _bad_member(self, exc: WireFormatError) -> None:
        self.counters.bad_records += 1
        log.warning("ignoring a malformed member record: %s", exc)

    # -- control ------------------------------------------------------------------------

    async def follow_control(self, synced: asyncio.Event) -> None:
        """Watch the sentry lease and the epoch record for good."""
        assert self._control_kv is not None
        while True:
            try:
                async with self._control_kv.watch() as events:
                    await self.reload_control()
                    synced.set()
                    async for event in events:
                        self.apply_control_event(event)
            except BackendError as exc:
                log.debug("control watch of %s interrupted: %s", self.node, exc)
                await asyncio.sleep(self.heartbeat / 4)

    async def reload_control(self) -> None:
        """Take the sentry holder and the epoch record from a full listing."""
        assert self._control_kv is not None
        snapshot = await read_control(self._control_kv)
        if snapshot.sentry_error is not None:
            self._bad_sentry(snapshot.sentry_error)
        else:
            self.sentry_holder = snapshot.sentry
        if snapshot.epoch_error is not None:
            self._bad_epoch(snapshot.epoch_error)
        elif snapshot.epoch is not None and snapshot.epoch_revision is not None:
            self.note_epoch(snapshot.epoch, snapshot.epoch_revision)
        self.wake()

    def apply_control_event(self, event: KVEvent) -> None:
        """One change seen by the control watch."""
        if event.key == SENTRY_KEY:
            if event.op is KVOp.PUT and event.value is not None:
                try:
                    self.sentry_holder = decode_sentry(event.value)
                except WireFormatError as exc:
                    self._bad_sentry(exc)
            else:
                self.sentry_holder = None
        elif event.key == EPOCH_KEY and event.op is KVOp.PUT and event.value is not None:
            try:
                record = EpochRecord.decode(event.value)
            except WireFormatError as exc:
                self._bad_epoch(exc)
                return
            self.note_epoch(record, event.revision)
        self.wake()

    def note_epoch(self, record: EpochRecord, revision: int) -> None:
        """An epoch record was seen; older ones than what we know are ignored."""
        if self.epoch_record is None or record.epoch >= self.epoch_record.epoch:
            self.epoch_record, self.epoch_revision = record, revision

    def _bad_sentry(self, exc: WireFormatError) -> None:
        self.counters.bad_records += 1
        log.warning("malformed sentry lease: %s", exc)
        self.sentry_holder = "?"  # somebody holds it; we cannot tell who

    def _bad_epoch(self, exc: WireFormatError) -> None:
        self.counters.bad_records += 1
        log.warning("malformed epoch record: %s", exc)

    async def publish(self, record: EpochRecord) -> None:
        """Write ``record`` by compare-and-set on the epoch revision we know."""
        assert self._control_kv is not None
        try:
            if self.epoch_revision is None:
                revision = await self._control_kv.create(EPOCH_KEY, record.encode())
            else:
                revision = await self._control_kv.update(
                    EPOCH_KEY, record.encode(), revision=self.epoch_revision
                )
        except (RevisionMismatchError, KeyExistsError):
            await self.reload_control()  # somebody wrote in between; look again
            self.wake()
            return
        if self.epoch_record is None or record.epoch > self.epoch_record.epoch:
            self.epoch_record, self.epoch_revision = record, revision

    async def resync_loop(self) -> None:
        """Never trust the watches alone: re-list periodically and after a reconnect."""
        interval = max(5 * self.heartbeat, 1.0)
        while True:
            await wait_event(self.resync, interval)
            self.resync.clear()
            try:
                await self.reload_members()
                await self.reload_control()
            except BackendError as exc:
                log.debug("resync of %s failed: %s", self.node, exc)


# -- decisions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Facts:
    """What one node knows at one moment, as far as its decisions go."""

    node: str
    view: Mapping[str, MemberRecord]
    """The member records seen (the live view: decided on at once, never kept)."""
    view_changed_at: float
    """When a member's spec last changed in the view (``time.monotonic``)."""
    epoch_record: EpochRecord | None
    epoch_revision: int | None
    sentry_holder: str | None
    """Who holds the sentry lease, as the control watch saw it ("?" if unreadable)."""
    holds_sentry: bool
    """This node holds a sentry lease revision (valid or not)."""
    lease_ok: bool
    """This node's member lease was valid when the step began."""
    sentry_ok: bool
    """This node's sentry lease is valid now."""
    acked: int | None
    """The epoch this node's member record acknowledges (None before it joined)."""
    topology: Topology | None
    """The adopted topology."""
    state: State
    suspended: bool
    """The hooks were told to suspend and not told to settle since."""
    consensus: int
    expected: frozenset[str]
    heartbeat: float
    settle: float
    """How long the view must stay quiet before the sentry publishes it."""
    record_lost: bool = False
    """Our member record was found gone (expired) and written anew: the others may have
    given our keys away."""
    lapsed_for: float = 0.0
    """How long ago the member lease ran out (0 while it is valid)."""
    paused: bool = False
    """The node paused its work for a lapse it may wait out (see :attr:`Decision.pause`)."""
    settled_epoch: int = 0
    """The epoch this node last settled on."""
    failover_time: float = 0.0
    """How long the medium may be without a leader (``Backend.failover_time``)."""


@dataclass(frozen=True, slots=True)
class Decision:
    """What one step does, in this order. Each field assumes the effects before it left
    the facts as they were; a step that carries one out decides again before the next."""

    fence: bool = False
    """The member lease just ran out: count it and say so (a pause or a suspend follows)."""
    pause: bool = False
    """The lease ran out, but our record may still stand: renewals fail for less than the
    medium's failover time, and a medium without a leader expires nobody (its new leader
    counts TTLs afresh). Stop starting work — the engine's permit has run out — and keep
    every key and partition: nobody can be given them unless our record expires, and a
    renewal that then succeeds on our old revision proves it did not."""
    resume: bool = False
    """The lease is valid again after a pause, our record intact: work goes on as it was."""
    claim_sentry: bool = False
    publish: EpochRecord | None = None
    adopt: EpochRecord | None = None
    ack: int | None = None
    """Write this epoch into our member record as acknowledged."""
    move: State | None = None
    """Move here first (leaving ``ready``, or ``assembling``): before suspending, so that
    the state says at once what the node can do, and before settling."""
    suspend: SuspendReason | None = None
    settle: Topology | None = None
    move_after_settle: State | None = None
    delay: float = 0.0
    """Look again after this long, unless woken."""


def quorum(topology: Topology | None, node: str, consensus: int, expected: frozenset[str]) -> bool:
    """True when ``topology`` lists ``node``, ``consensus`` members and every expected one."""
    return (
        topology is not None
        and node in topology.members
        and len(topology.members) >= consensus
        and expected <= topology.members.keys()
    )


def acknowledged(topology: Topology, view: Mapping[str, MemberRecord]) -> bool:
    """True when every member of ``topology`` acknowledged it, in the same incarnation."""
    return all(
        (record := view.get(name)) is not None
        and record.acked == topology.epoch
        and record.incarnation == spec.incarnation
        for name, spec in topology.members.items()
    )


def next_epoch(facts: Facts) -> EpochRecord | None:
    """The epoch the sentry should publish for the view, or None: nothing changed since
    its own last one, or its own record is not in the view yet."""
    members = {name: record.spec for name, record in facts.view.items()}
    current = facts.epoch_record
    if current is not None and current.sentry == facts.node and dict(current.members) == members:
        return None
    if facts.node not in members:
        return None  # our own record is not visible yet; never publish a topology without us
    return EpochRecord(
        epoch=(current.epoch if current else 0) + 1, sentry=facts.node, members=members
    )


def decide(facts: Facts, now: float) -> Decision:
    """Every decision the facts call for at ``now`` (``time.monotonic``)."""
    lease_ok = facts.lease_ok
    delay = facts.heartbeat
    publish = None
    if lease_ok and facts.sentry_ok:
        quiet = now - facts.view_changed_at
        if quiet < facts.settle:
            delay = facts.settle - quiet  # let a burst of joins end in one epoch
        else:
            publish = next_epoch(facts)
    record, topology = facts.epoch_record, facts.topology
    newer = record is not None and (topology is None or record.epoch > topology.epoch)
    adopt = record if newer else None
    ack = (
        topology.epoch
        if facts.acked is not None and topology is not None and facts.acked != topology.epoch
        else None
    )
    suspend, move, settle, after = _state_decision(facts)
    held = waits_out_the_lapse(facts)
    return Decision(
        fence=not lease_ok and not facts.suspended and not facts.paused,
        pause=held and not facts.paused and not facts.suspended,
        resume=lease_ok and facts.paused,
        claim_sentry=lease_ok and facts.sentry_holder is None and not facts.holds_sentry,
        publish=publish,
        adopt=adopt,
        ack=ack,
        suspend=suspend,
        move=move,
        settle=settle,
        move_after_settle=after,
        delay=delay,
    )


def waits_out_the_lapse(facts: Facts) -> bool:
    """True when a lapsed lease pauses the node rather than suspending it: our record was
    not found gone, and renewals have failed for less than the medium's failover time."""
    return not facts.lease_ok and not facts.record_lost and facts.lapsed_for < facts.failover_time


def _state_decision(
    facts: Facts,
) -> tuple[SuspendReason | None, State | None, Topology | None, State | None]:
    """(suspend, move, settle, move after settle): where the node's state goes."""
    topology, state = facts.topology, facts.state
    if not (facts.lease_ok and quorum(topology, facts.node, facts.consensus, facts.expected)):
        reason = None
        if not facts.suspended and not waits_out_the_lapse(facts):
            reason = (
                SuspendReason.LEASE_LOST if not facts.lease_ok else SuspendReason.SHORT_OF_CONSENSUS
            )
        return reason, State.REHASHING if state is State.READY else None, None, None
    assert topology is not None
    if (
        facts.paused
        and not facts.suspended
        and topology.epoch == facts.settled_epoch
        and state is State.REHASHING
    ):
        return None, State.READY, None, None  # back from a pause: nothing moved meanwhile
    move = State.REHASHING if state is State.ASSEMBLING else None
    state = move or state
    if acknowledged(topology, facts.view) and (state is not State.READY or facts.suspended):
        return None, move, topology, State.READY if state is State.REHASHING else None
    return None, move, None, None
