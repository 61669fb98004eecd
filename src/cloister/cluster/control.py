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
from dataclasses import dataclass, field, fields

from cloister import schema
from cloister._backoff import Backoff
from cloister._tasks import wait_event
from cloister.backends import Entry, KeyValue, KVEvent, KVOp
from cloister.cluster.hooks import SuspendReason
from cloister.cluster.membership import GhostMemberError, MemberRecord
from cloister.cluster.states import State
from cloister.cluster.topology import EpochRecord, Topology
from cloister.errors import BackendError, KeyExistsError, RevisionMismatchError, WireFormatError
from cloister.schema import UNSIGNED, ForeignRecordError, Keyring, UnauthenticatedRecordError

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
    medium_data_loss: int = 0
    """Times this node found the medium had lost its data (one per episode: a server
    restarted with an empty store), re-bootstrapped its control plane and reported it."""
    requests_refused: int = 0
    """Requests from other nodes refused unrun (``busy``): the node ran its
    ``max_concurrent_requests`` already, or their queue was full."""
    request_errors: int = 0
    """Requests and multicasts from the wire that could not be decoded, that their
    handler refused or failed on, or that ran past their deadline."""
    crashes_seen: int = 0
    """Member records this node (the sentry) deleted because their process was gone."""
    malformed: dict[str, int] = field(default_factory=dict)
    """Malformed records by kind (:data:`MALFORMED_KINDS`); their sum is ``bad_records``."""
    unauthenticated: dict[str, int] = field(default_factory=dict)
    """Records and requests refused for a missing or bad tag, by kind
    (:data:`cloister.schema.KINDS`): the node's keyring counts them, each record once."""

    def as_dict(self) -> dict[str, int]:
        """The plain counters by name (the breakdowns by kind are read alone)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _BY_KIND}

    def count_malformed(self, kind: str) -> None:
        """One more malformed record of ``kind``."""
        self.bad_records += 1
        self.malformed[kind] = self.malformed.get(kind, 0) + 1

    def __getitem__(self, name: str) -> int:
        """``counters["fenced"]``: read by name, as when the counters were a dict."""
        if name not in self.__dataclass_fields__ or name in _BY_KIND:
            raise KeyError(name)
        value: int = getattr(self, name)
        return value


_BY_KIND = ("malformed", "unauthenticated")

MALFORMED_KINDS = ("member", "ghost_member", "epoch", "sentry")
"""The kinds of malformed control-plane records counted in ``ClusterCounters.malformed``:
an undecodable member record, a member record stored under another node's key, an
undecodable epoch record, an undecodable sentry lease."""


# -- readers --------------------------------------------------------------------------------


def encode_sentry(node: str, keyring: Keyring = UNSIGNED) -> bytes:
    """The sentry lease naming ``node`` as its holder."""
    return schema.encode(schema.SENTRY, {"node": node}, keyring)


def decode_sentry(value: bytes, keyring: Keyring = UNSIGNED) -> str:
    """The holder named by a sentry lease; :class:`WireFormatError` if malformed."""
    return schema.decode(schema.SENTRY, value, keyring).node


def control_loss(
    knew_epoch: bool, known_revision: int | None, listed_revision: int | None
) -> str | None:
    """What a listing of the ``control`` bucket says about lost data, or None.

    ``knew_epoch`` and ``known_revision`` are what this node knew *before* the listing
    began. Nobody deletes the epoch record and revisions only grow, so an epoch record
    that is gone, or one at a lower revision than the one known before, means the medium
    lost its data (a server restarted with an empty store)."""
    if knew_epoch and listed_revision is None:
        return "the epoch record is gone from the control bucket"
    if (
        known_revision is not None
        and listed_revision is not None
        and listed_revision < known_revision
    ):
        return f"the epoch record's revision went back from {known_revision} to {listed_revision}"
    return None


def epoch_event_loss(
    known: EpochRecord | None, known_revision: int | None, epoch: int, revision: int
) -> str | None:
    """What a watched epoch record (``epoch`` at ``revision``) says about lost data.

    Epochs are written in increasing order by compare-and-set, so a later one always has
    a higher revision; a watch may replay older ones (lower epoch), never a newer or
    equal epoch at a lower revision — unless the medium lost its data and counts anew."""
    if known is None or known_revision is None:
        return None
    if epoch >= known.epoch and revision < known_revision:
        return (
            f"epoch {epoch} was published at revision {revision}, below the revision "
            f"{known_revision} of epoch {known.epoch}"
        )
    return None


def member_loss(before: Mapping[str, int], listed: Mapping[str, int]) -> str | None:
    """What a listing of the ``members`` bucket (revision by key) says about lost data,
    given each record's revision seen before the listing began: a record's revision
    never goes down (a deleted and re-created one gets a higher one)."""
    for key, revision in sorted(listed.items()):
        seen = before.get(key)
        if seen is not None and revision < seen:
            return f"the member record {key!r} went back from revision {seen} to {revision}"
    return None


async def read_members(
    kv: KeyValue, keyring: Keyring = UNSIGNED
) -> tuple[dict[str, MemberRecord], dict[str, WireFormatError]]:
    """Every member record by node name, and the malformed ones' errors by key."""
    records: dict[str, MemberRecord] = {}
    errors: dict[str, WireFormatError] = {}
    for name, entry in (await kv.entries()).items():
        try:
            records[name] = MemberRecord.decode(entry.value, name, keyring)
        except WireFormatError as exc:
            errors[name] = exc
    return records, errors


async def foreign_members(kv: KeyValue, keyring: Keyring, *, wait: float, poll: float) -> list[str]:
    """The member records ``keyring`` cannot authenticate that were renewed within
    ``wait`` seconds while none it can authenticate was: a live cluster with another
    secret (or with none, or with one where this node has none). Empty otherwise.

    A node that found such a cluster must not follow it: it would claim the sentry lease
    and partitions over records it cannot read, and park inbox records it cannot check.
    Only renewals count: a record nobody renews proves nothing (garbage and forgeries
    heal by the usual rules), and one renewed record this node can read means the
    cluster is its own.
    """

    async def listing() -> tuple[dict[str, int], dict[str, int]]:
        readable: dict[str, int] = {}
        unreadable: dict[str, int] = {}
        for key, entry in (await kv.entries()).items():
            try:
                MemberRecord.decode(entry.value, key, keyring)
            except (UnauthenticatedRecordError, ForeignRecordError):
                unreadable[key] = entry.revision
            except WireFormatError:
                continue
            else:
                readable[key] = entry.revision
        return readable, unreadable

    def renewed(now: dict[str, int], then: dict[str, int]) -> list[str]:
        return sorted(key for key, revision in now.items() if then.get(key) != revision)

    first_readable, first_unreadable = await listing()
    if not first_unreadable:
        return []
    foreign: list[str] = []
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        await asyncio.sleep(poll)
        readable, unreadable = await listing()
        if renewed(readable, first_readable):
            return []
        foreign = renewed(unreadable, first_unreadable) or foreign
    return foreign


@dataclass(frozen=True, slots=True)
class ControlSnapshot:
    """The ``control`` bucket read once: the epoch record and the sentry lease's holder
    (None when absent or malformed; the error says which)."""

    epoch: EpochRecord | None = None
    epoch_revision: int | None = None
    epoch_error: WireFormatError | None = None
    sentry: str | None = None
    sentry_error: WireFormatError | None = None
    sentry_revision: int | None = None
    """The revision of the sentry lease (valid or not)."""


async def read_control(
    kv: KeyValue, keyring: Keyring = UNSIGNED, *, consistent: bool = False
) -> ControlSnapshot:
    """Read the ``control`` bucket once (``consistent``: from the medium's leader, never
    a lagging replica)."""
    entries = await kv.entries(consistent=consistent)
    epoch = epoch_error = sentry = sentry_error = sentry_revision = None
    epoch_revision = None
    if (entry := entries.get(EPOCH_KEY)) is not None:
        epoch_revision = entry.revision
        try:
            epoch = EpochRecord.decode(entry.value, keyring)
        except WireFormatError as exc:
            epoch_error = exc
    if (entry := entries.get(SENTRY_KEY)) is not None:
        sentry_revision = entry.revision
        try:
            sentry = decode_sentry(entry.value, keyring)
        except WireFormatError as exc:
            sentry_error = exc
    return ControlSnapshot(
        epoch, epoch_revision, epoch_error, sentry, sentry_error, sentry_revision
    )


def _revisions(entries: Mapping[str, Entry]) -> dict[str, int]:
    return {key: entry.revision for key, entry in entries.items()}


class Control:
    """The facts the watches feed: the member records, the epoch record, the sentry.

    Every change wakes the control loop (``wake``); the loop decides, nothing here does.
    """

    def __init__(
        self,
        node: str,
        heartbeat: float,
        counters: ClusterCounters,
        wake: Callable[[], None],
        keyring: Keyring = UNSIGNED,
    ) -> None:
        self.node = node
        self.keyring = keyring
        self.heartbeat = heartbeat
        self.counters = counters
        self.wake = wake
        self.view: dict[str, MemberRecord] = {}
        self.view_changed_at = 0.0
        self.epoch_record: EpochRecord | None = None
        self.epoch_revision: int | None = None
        self.sentry_holder: str | None = None
        self.sentry_revision: int | None = None
        """The revision of the sentry lease (valid or not; None when there is none)."""
        self.epoch_garbage: int | None = None
        """The revision of an undecodable epoch record (the sentry overwrites it)."""
        self.sentry_garbage: int | None = None
        """The revision of an undecodable sentry lease (any node may claim over it)."""
        self.ghosts: dict[str, int] = {}
        """Member records stored under another node's key, by key: their revision (the
        sentry deletes them)."""
        self.renewed: dict[str, tuple[int, float]] = {}
        """Each member record's revision and when it was first seen (``time.monotonic``):
        a record that stops changing is no longer renewed."""
        self.resync = asyncio.Event()
        self._logged: set[tuple[str, str, int]] = set()
        self._conflicts = Backoff(heartbeat / 20, heartbeat, jitter=0.5)
        self._members_kv: KeyValue | None = None
        self._control_kv: KeyValue | None = None
        self.on_data_loss: Callable[[str], None] = lambda _why: None
        """Told (synchronously) each time the records show that the medium lost data."""

    def forget_medium(self) -> None:
        """The medium lost its data: forget what we knew of its records (the epoch record
        and its revision, the sentry holder, the revisions of member records), so that the
        next compare-and-sets create records anew instead of updating ones that are gone.
        The adopted topology (the rings, in ``Cluster``) is kept: the next epoch is
        numbered above it."""
        self.epoch_record = self.epoch_revision = None
        self.epoch_garbage = self.sentry_garbage = None
        self.sentry_holder = None
        self.ghosts = {}
        self.renewed = {}
        self._conflicts.reset()
        self.resync.set()
        self.wake()

    def _lost(self, why: str) -> None:
        self.forget_medium()
        self.on_data_loss(why)

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
        view: dict[str, MemberRecord] = {}
        ghosts: dict[str, int] = {}
        before = {key: seen[0] for key, seen in self.renewed.items()}
        entries = await self._members_kv.entries()
        if member_loss(before, _revisions(entries)) is not None:
            # A listing may come from a lagging replica: only the leader's says it for sure.
            entries = await self._members_kv.entries(consistent=True)
            if (why := member_loss(before, _revisions(entries))) is not None:
                self._lost(why)
        for key, entry in entries.items():
            record = self.decode_member(key, entry.value, entry.revision)
            if record is not None:
                view[key] = record
                self._saw(key, entry.revision)
            elif self._is_ghost(key, entry.revision):
                ghosts[key] = entry.revision
        self.ghosts = ghosts
        for key in self.renewed.keys() - view.keys():
            del self.renewed[key]
        if {n: r.spec for n, r in view.items()} != {n: r.spec for n, r in self.view.items()}:
            self.view_changed_at = time.monotonic()
        self.view = view
        self.wake()

    def apply_member_event(self, event: KVEvent) -> None:
        """One change seen by the members watch."""
        if event.op is KVOp.PUT and event.value is not None:
            record = self.decode_member(event.key, event.value, event.revision)
            if record is not None:
                self.ghosts.pop(event.key, None)
                self._saw(event.key, event.revision)
                self.note_member(record)
            elif self._is_ghost(event.key, event.revision):
                self.ghosts[event.key] = event.revision
                self.wake()
            return
        self.ghosts.pop(event.key, None)
        self.renewed.pop(event.key, None)
        if self.view.pop(event.key, None) is not None:
            self.view_changed_at = time.monotonic()
            self.wake()

    def note_member(self, record: MemberRecord) -> None:
        """A member record was written (ours included)."""
        old = self.view.get(record.node)
        self.view[record.node] = record
        if old is None or old.spec != record.spec:
            self.view_changed_at = time.monotonic()
        self.wake()

    def decode_member(self, key: str, data: bytes, revision: int) -> MemberRecord | None:
        """The record stored under ``key`` at ``revision``; None if malformed or a ghost
        (counted and logged once per key and revision)."""
        try:
            return MemberRecord.decode(data, key, self.keyring)
        except GhostMemberError as exc:
            self._malformed("ghost_member", key, revision, exc, "ignoring a ghost member record")
        except WireFormatError as exc:
            self._malformed("member", key, revision, exc, "ignoring a malformed member record")
        return None

    def _saw(self, key: str, revision: int) -> None:
        seen = self.renewed.get(key)
        if seen is None or seen[0] != revision:
            self.renewed[key] = (revision, time.monotonic())

    def _is_ghost(self, key: str, revision: int) -> bool:
        return ("ghost_member", key, revision) in self._logged

    def _malformed(
        self, kind: str, key: str, revision: int, exc: WireFormatError, what: str
    ) -> None:
        """Count and log a malformed record once per (kind, key, revision): watches and
        re-listings see the same record again and again."""
        seen = (kind, key, revision)
        if seen in self._logged:
            return
        if len(self._logged) > 10_000:
            self._logged.clear()
        self._logged.add(seen)
        if isinstance(exc, UnauthenticatedRecordError):
            # Counted (by kind) and logged once by the keyring, not as malformed; the
            # repair is the same: ignored, overwritten or outwaited.
            log.debug("%s (node %s, revision %d): %s", what, self.node, revision, exc)
            return
        self.counters.count_malformed(kind)
        log.warning("%s (node %s, revision %d): %s", what, self.node, revision, exc)

    async def delete_member(self, key: str, revision: int, why: str) -> None:
        """Delete the member record ``key`` if it is still at ``revision`` (the sentry's
        repair of a ghost or of a record nobody renews)."""
        assert self._members_kv is not None
        self.ghosts.pop(key, None)
        if self.renewed.get(key, (None,))[0] == revision:
            del self.renewed[key]  # asked once per revision
        try:
            await self._members_kv.delete(key, revision=revision)
        except RevisionMismatchError:
            return  # rewritten since: the watch tells us what it holds now
        log.warning("node %s deleted the member record %r, %s", self.node, key, why)

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
        knew_epoch, known_revision = self.epoch_record is not None, self.epoch_revision
        snapshot = await read_control(self._control_kv, self.keyring)
        if control_loss(knew_epoch, known_revision, snapshot.epoch_revision) is not None:
            # A listing may come from a lagging replica: only the leader's says it for sure.
            snapshot = await read_control(self._control_kv, self.keyring, consistent=True)
            why = control_loss(knew_epoch, known_revision, snapshot.epoch_revision)
            if why is not None:
                self._lost(why)
        self.sentry_revision = snapshot.sentry_revision
        if snapshot.sentry_error is not None and snapshot.sentry_revision is not None:
            self._bad_sentry(snapshot.sentry_error, snapshot.sentry_revision)
        else:
            self.sentry_holder, self.sentry_garbage = snapshot.sentry, None
        revision = snapshot.epoch_revision
        if snapshot.epoch_error is not None and revision is not None:
            self._bad_epoch(snapshot.epoch_error, revision)
        elif snapshot.epoch is not None and revision is not None:
            self.note_epoch(snapshot.epoch, revision)
        self.wake()

    def apply_control_event(self, event: KVEvent) -> None:
        """One change seen by the control watch."""
        if event.key == SENTRY_KEY:
            self.sentry_revision = event.revision if event.op is KVOp.PUT else None
            if event.op is KVOp.PUT and event.value is not None:
                try:
                    self.sentry_holder = decode_sentry(event.value, self.keyring)
                    self.sentry_garbage = None
                except WireFormatError as exc:
                    self._bad_sentry(exc, event.revision)
            else:
                self.sentry_holder = self.sentry_garbage = None
        elif event.key == EPOCH_KEY and event.op is KVOp.PUT and event.value is not None:
            try:
                record = EpochRecord.decode(event.value, self.keyring)
            except WireFormatError as exc:
                self._bad_epoch(exc, event.revision)
                self.wake()
                return
            why = epoch_event_loss(
                self.epoch_record, self.epoch_revision, record.epoch, event.revision
            )
            if why is not None:
                self._lost(why)
            self.note_epoch(record, event.revision)
        self.wake()

    def note_epoch(self, record: EpochRecord, revision: int) -> None:
        """An epoch record was seen; older ones than what we know are ignored."""
        if self.epoch_garbage is not None and revision > self.epoch_garbage:
            self.epoch_garbage = None  # overwritten: the revision is the new record's
            self.epoch_revision = revision
        if self.epoch_record is None or record.epoch >= self.epoch_record.epoch:
            self.epoch_record, self.epoch_revision = record, revision

    def _bad_sentry(self, exc: WireFormatError, revision: int) -> None:
        self._malformed("sentry", SENTRY_KEY, revision, exc, "malformed sentry lease")
        # Nobody can hold a lease that says nothing: any member may claim over it.
        self.sentry_holder, self.sentry_garbage = "?", revision

    def _bad_epoch(self, exc: WireFormatError, revision: int) -> None:
        self._malformed("epoch", EPOCH_KEY, revision, exc, "malformed epoch record")
        # Keep the last good record (the rings), and the garbage's revision: the sentry
        # overwrites it by compare-and-set on what it actually read.
        self.epoch_garbage = self.epoch_revision = revision

    async def publish(self, record: EpochRecord) -> None:
        """Write ``record`` by compare-and-set on the epoch revision we know."""
        assert self._control_kv is not None
        try:
            if self.epoch_revision is None:
                revision = await self._control_kv.create(EPOCH_KEY, record.encode(self.keyring))
            else:
                revision = await self._control_kv.update(
                    EPOCH_KEY, record.encode(self.keyring), revision=self.epoch_revision
                )
        except (RevisionMismatchError, KeyExistsError):
            # Somebody wrote in between: look again, after a pause that grows while the
            # conflicts go on (never a busy loop of compare-and-sets).
            await asyncio.sleep(self._conflicts.next())
            await self.reload_control()
            self.wake()
            return
        self._conflicts.reset()
        self.epoch_garbage = None
        if self.epoch_record is None or record.epoch > self.epoch_record.epoch:
            self.epoch_record, self.epoch_revision = record, revision

    async def resync_loop(self) -> None:
        """Never trust the watches alone: re-list periodically and after a reconnect."""
        interval = max(5 * self.heartbeat, 1.0)
        task = asyncio.current_task()
        while True:
            if task is not None and task.cancelling():
                # A cancellation a listing swallowed (asyncio.wait_for in nats-py on 3.11,
                # or a CancelledError turned into ConnectionClosedError): end now, or the
                # node's stop waits a whole second for the supervisor's second cancel.
                raise asyncio.CancelledError
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
    epoch_garbage: bool = False
    """The epoch record in the medium is undecodable (``epoch_revision`` is its revision)."""
    sentry_garbage: bool = False
    """The sentry lease in the medium is undecodable: nobody holds it."""
    ghosts: Mapping[str, int] = field(default_factory=dict)
    """Member records stored under another node's key: key -> revision."""
    renewed: Mapping[str, tuple[int, float]] = field(default_factory=dict)
    """Each member record's revision and since when (``time.monotonic``) it has had it."""
    failure_timeout: float = 0.0
    """This node's member TTL (the TTL assumed for records that name none; 0: none)."""
    data_lost: bool = False
    """The medium was just found to have lost its data (one step, as ``record_lost``):
    claims, consumers and stored state went with it, so the node suspends."""
    rebuild_above: int | None = None
    """Since the medium lost its data the node settles only on an epoch above this one
    (the one it had adopted then): one published after the loss, acknowledged afresh."""
    unreachable: Mapping[str, int] = field(default_factory=dict)
    """Members whose process is gone — requests to them found no responders twice in a
    row (:mod:`~cloister.cluster.probe`) — by node: the revision of the record probed."""
    sentry_revision: int | None = None
    """The revision of the sentry lease in the medium (None: there is none)."""
    held_sentry_revision: int | None = None
    """The revision of the sentry lease this node holds (None: it holds none)."""


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
    """Claim the sentry lease (over an undecodable one when ``Facts.sentry_garbage``, over
    the lease at :attr:`claim_over` when its holder's process is gone)."""
    claim_over: int | None = None
    """The revision of a lease whose holder's process is gone: claimed over by
    compare-and-set (every member tries, one wins), not waited out."""
    delete_ghosts: tuple[tuple[str, int], ...] = ()
    """The sentry deletes these ghost member records (key, revision) by compare-and-set."""
    expire: tuple[tuple[str, int], ...] = ()
    """The sentry deletes these member records (key, revision) by compare-and-set: not
    renewed for twice their TTL and the medium's failover time, so written without one."""
    departed: tuple[tuple[str, int], ...] = ()
    """The sentry deletes these member records (key, revision) by compare-and-set: their
    process is gone (no responders), so it does not wait for their TTL."""
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
    if (
        current is not None
        and current.sentry == facts.node
        and dict(current.members) == members
        and not facts.epoch_garbage
    ):
        return None
    if facts.node not in members:
        return None  # our own record is not visible yet; never publish a topology without us
    known = [0 if current is None else current.epoch]
    if current is None or facts.epoch_garbage:
        # Above every epoch anybody may have adopted: with the record unreadable or gone,
        # the last good one may be unknown here, but the acknowledgements say how far the
        # members got (an older epoch would never be adopted).
        known += [record.acked for record in facts.view.values()]
        if facts.topology is not None:
            known.append(facts.topology.epoch)
    return EpochRecord(epoch=max(known) + 1, sentry=facts.node, members=members)


def decide(facts: Facts, now: float) -> Decision:
    """Every decision the facts call for at ``now`` (``time.monotonic``)."""
    lease_ok = facts.lease_ok
    sentry_ok = facts.sentry_ok and not sentry_superseded(facts)
    delay = facts.heartbeat
    publish = None
    if lease_ok and sentry_ok:
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
    over = dead_sentry_lease(facts)
    return Decision(
        fence=not lease_ok and not facts.suspended and not facts.paused,
        pause=held and not facts.paused and not facts.suspended,
        resume=lease_ok and facts.paused,
        claim_sentry=lease_ok
        and (facts.sentry_holder is None or facts.sentry_garbage or over is not None)
        and not facts.holds_sentry,
        claim_over=over if lease_ok and not facts.holds_sentry else None,
        delete_ghosts=tuple(sorted(facts.ghosts.items())) if lease_ok and sentry_ok else (),
        expire=unrenewed(facts, now) if lease_ok and sentry_ok else (),
        departed=departed(facts) if lease_ok and sentry_ok else (),
        publish=publish,
        adopt=adopt,
        ack=ack,
        suspend=suspend,
        move=move,
        settle=settle,
        move_after_settle=after,
        delay=delay,
    )


def sentry_superseded(facts: Facts) -> bool:
    """True when the medium shows the sentry lease at a revision above the one this node
    holds: somebody else wrote it (a claim over it, or garbage), so this node is no longer
    the sentry, whatever its own clock says — its next renewal would fail. Acting on until
    then makes two sentries, each publishing an epoch over the other's. A revision below
    ours is only a watch lagging behind our own renewal."""
    held, seen = facts.held_sentry_revision, facts.sentry_revision
    return held is not None and seen is not None and seen > held


def unrenewed(facts: Facts, now: float) -> tuple[tuple[str, int], ...]:
    """The member records (key, revision) of others that kept one revision for longer than
    twice their TTL plus the medium's failover time: a record with a TTL would have
    expired by then (even through a leader election), so it was written without one. The
    TTL is the one the record names (at most 10 times ours), else ours."""
    stale = []
    for name, (revision, since) in sorted(facts.renewed.items()):
        record = facts.view.get(name)
        if name == facts.node or record is None:
            continue
        ttl = record.ttl or facts.failure_timeout
        if facts.failure_timeout > 0:  # a record may not claim a TTL of its own choosing
            ttl = min(ttl, 10 * facts.failure_timeout)
        if ttl > 0 and now - since > 2 * ttl + facts.failover_time:
            stale.append((name, revision))
    return tuple(stale)


def departed(facts: Facts) -> tuple[tuple[str, int], ...]:
    """The member records (key, revision) of others whose process is gone (see
    :func:`process_gone`)."""
    return tuple(
        (name, revision)
        for name, revision in sorted(facts.unreachable.items())
        if name != facts.node and process_gone(facts, name)
    )


def process_gone(facts: Facts, name: str) -> bool:
    """True when ``name`` had no responder while its member record was at the revision it
    still has (a record renewed since belongs to a live process, whatever a probe said)."""
    probed = facts.unreachable.get(name)
    seen = facts.renewed.get(name)
    return probed is not None and name in facts.view and seen is not None and seen[0] == probed


def dead_sentry_lease(facts: Facts) -> int | None:
    """The revision of the sentry lease when its holder — another node — has no responder
    (:func:`process_gone`): any member may claim over it rather than wait for its TTL."""
    holder = facts.sentry_holder
    if (
        holder is None
        or holder == facts.node
        or facts.sentry_garbage
        or facts.sentry_revision is None
        or not process_gone(facts, holder)
    ):
        return None
    return facts.sentry_revision


def waits_out_the_lapse(facts: Facts) -> bool:
    """True when a lapsed lease pauses the node rather than suspending it: our record was
    not found gone, and renewals have failed for less than the medium's failover time."""
    return not facts.lease_ok and not facts.record_lost and facts.lapsed_for < facts.failover_time


def _state_decision(
    facts: Facts,
) -> tuple[SuspendReason | None, State | None, Topology | None, State | None]:
    """(suspend, move, settle, move after settle): where the node's state goes."""
    topology, state = facts.topology, facts.state
    if facts.data_lost:
        reason = None if facts.suspended else SuspendReason.MEDIUM_LOST
        return reason, State.REHASHING if state is State.READY else None, None, None
    if not (facts.lease_ok and quorum(topology, facts.node, facts.consensus, facts.expected)):
        reason = None
        if not facts.suspended and not waits_out_the_lapse(facts):
            reason = (
                SuspendReason.LEASE_LOST if not facts.lease_ok else SuspendReason.SHORT_OF_CONSENSUS
            )
        return reason, State.REHASHING if state is State.READY else None, None, None
    assert topology is not None
    if facts.rebuild_above is not None and topology.epoch <= facts.rebuild_above:
        # Wait for an epoch published after the loss: the records the old one was settled
        # on (claims, consumers) are gone, and the sentry is publishing a new one.
        return None, State.REHASHING if state is not State.REHASHING else None, None, None
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
