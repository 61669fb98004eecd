"""Following ownership in a cluster: the manager's shard region.

:class:`ShardRegion` implements the cluster's topology hooks (release / settle / suspend)
for one manager: it starts the workers a settled epoch gives this node, stops and hands
over (:class:`Handoff`) those that moved away *before* the node acknowledges the epoch,
consumes the inbox partitions the node owns and keeps the replicated state table.

A topology change reaches the partitions as a :class:`Rebalance` — a pure value computed
by :func:`rebalance` from what this node held and what the new placement gives it.

Ownership is fenced at the medium: settling an epoch, the region first claims every
partition it takes (:class:`~cloister.manager.claims.Claims`, before it reads the stored
state, so that no write of the previous holder lands after that read), then guards every
state write with its partition's claim. A write the medium refuses gives the partition up
at once: its workers are dropped, its inbox records go to the real owner.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from cloister import schema, wire
from cloister.backends import Guard
from cloister.backends.base import HEADROOM
from cloister.cluster.core import SuspendReason
from cloister.cluster.placement import Placement
from cloister.cluster.states import State
from cloister.errors import (
    CloisterError,
    ConfigurationError,
    FencedError,
    LeaseLapsedError,
    NotOwnerError,
    WireFormatError,
)
from cloister.manager.claims import Claims, PartitionsFencedError
from cloister.manager.consumer import PartitionConsumers, claimant_name
from cloister.manager.engine import Engine
from cloister.manager.lifecycle import Lifecycle, Phase
from cloister.manager.spec import Spec, make_spec
from cloister.manager.state import StateTable, Stored, Unstorable
from cloister.manager.types import Key, ManagerCounters, ManagerTimings, Reason
from cloister.manager.watchdog import Watchdog
from cloister.manager.worker import GONE, RESPEC, Message, Worker
from cloister.store.inbox import Inbox

if TYPE_CHECKING:
    from cloister.cluster import Cluster, Topology
    from cloister.cluster.core import TopologyHook

log = logging.getLogger("cloister.manager")

YIELD_EVERY = 10_000  # ids started or stopped between yields to the event loop
HANDOFF_CHUNK = 5000  # workers per handoff request


class Trace:
    """The steps of one release or settle and the seconds each took (logged as one line:
    where a slow rehash spends its time)."""

    def __init__(self) -> None:
        self.began = self._at = time.monotonic()
        self.steps: list[tuple[str, float]] = []

    def step(self, name: str) -> None:
        """The step ``name`` ended now (it began when the previous one ended)."""
        now = time.monotonic()
        self.steps.append((name, now - self._at))
        self._at = now

    def total(self) -> float:
        """Seconds since the trace began."""
        return time.monotonic() - self.began

    def __str__(self) -> str:
        return ", ".join(f"{name} {seconds:.3f}s" for name, seconds in self.steps)


@dataclass(frozen=True, slots=True)
class Rebalance:
    """How one epoch moves this node's partitions (faust's on_rebalance sets)."""

    epoch: int
    assigned: frozenset[int]  # newly ours
    revoked: frozenset[int]  # ours (held or being claimed) no longer
    owned: frozenset[int]  # everything ours in this epoch


def rebalance(epoch: int, previous: Set[int], new: Set[int]) -> Rebalance:
    """The partitions ``epoch`` assigns and revokes, given the ones this node held (or
    was claiming) before and the ones the new placement gives it."""
    return Rebalance(epoch, frozenset(new - previous), frozenset(previous - new), frozenset(new))


class Handoff(Protocol):
    """Moving live workers between nodes: this node ships, the new owner receives."""

    async def hand_over(self, leaving: list[Key], owner_of: Callable[[Key], str | None]) -> None:
        """Stop ``leaving`` and ship payloads and queued casts (None: store them)."""
        ...

    async def receive_handoff(self, batch: Any) -> int:
        """Keep what a previous owner shipped, until the ids start here."""
        ...


@dataclass(frozen=True, slots=True)
class RegionOptions:
    """The shard region's share of a manager's options."""

    name: str
    group: str
    partitions: int
    durable: bool
    max_in_flight: int
    flush_interval: float


class ShardRegion:
    """A manager's ownership in a cluster: topology hooks, handoff, partition consumers
    and the state table."""

    def __init__(
        self,
        cluster: Cluster,
        engine: Engine,
        lifecycle: Lifecycle,
        options: RegionOptions,
        counters: ManagerCounters,
        timings: ManagerTimings | None = None,
    ) -> None:
        self.cluster = cluster
        self.engine = engine
        self.lifecycle = lifecycle
        self.options = options
        self.counters = counters
        self.timings = timings if timings is not None else ManagerTimings()
        self.table: StateTable | None = None
        self.claims: Claims | None = None
        self.inbox: Inbox | None = None
        self.consumers: PartitionConsumers | None = None
        self.watchdog: Watchdog | None = None
        # id -> (payload, casts, watermark, runtime spec or None) handed over by the
        # previous owner
        self.handed: dict[Key, tuple[Any, list[Any], int, Spec | None]] = {}
        # The epoch this node last settled on: its fencing token (DynamicManager.fence).
        self.fence = 0
        # release/settle/suspend/handover run one at a time, whoever calls them (the
        # cluster's hooks, start(), stop()): they move the same workers and partitions.
        self.lock = asyncio.Lock()

    # -- placement -----------------------------------------------------------------------------

    def placement_for(self, topology: Topology) -> Placement:
        """Where this manager's keys live in ``topology``, seen from this node."""
        return topology.placement(
            self.cluster.node, self.options.partitions, self.options.group, strict=False
        )

    def placement_now(self) -> Placement:
        """The placement of the adopted topology; :class:`NotOwnerError` before one."""
        topology = self.cluster.topology
        if topology is None:
            raise NotOwnerError(f"node {self.cluster.node} has no topology yet")
        return self.placement_for(topology)

    def _rebalance(self, topology: Topology, placement: Placement) -> Rebalance:
        held = self.consumers.held_or_wanted if self.consumers is not None else set()
        return rebalance(topology.epoch, held, placement.owned())

    # -- joining -------------------------------------------------------------------------------

    async def join(self, hook: TopologyHook) -> None:
        """Open the state table and the inbox, then follow the cluster through ``hook``."""
        cluster, options, engine = self.cluster, self.options, self.engine
        kv = await cluster.backend.kv(f"mgr-{options.name}")
        keyring = cluster.backend.keyring
        self.claims = Claims(kv, cluster.node, keyring)  # in the state's bucket: one guarded write
        limit = cluster.backend.max_payload
        self.table = StateTable(
            kv, self, max_value=None if limit is None else limit - HEADROOM, keyring=keyring
        )
        self.table.on_unstorable = self._unstorable
        # Any replica: the settle that starts workers reads again what it takes over.
        await self.table.load(seen=0)
        self.merge_table()
        engine.ports.mark = self.table.mark
        engine.ports.write = self._write_owned
        engine.supervisor.spawn(self._flush_loop(), "payload flusher")
        if options.durable:
            self.inbox = Inbox(
                cluster.backend,
                options.name,
                partitions=options.partitions,
                max_in_flight=options.max_in_flight,
            )
            await self.inbox.open()
            self.consumers = PartitionConsumers(
                self.inbox,
                cluster.node,
                engine.deliver_record,
                engine.supervisor,
                claimant=claimant_name(cluster.node, cluster.incarnation),
                max_in_flight=options.max_in_flight,
                before_ack=self._store_before_ack,
            )
            engine.ports.ack = self.consumers.ack
            engine.ports.park = self.consumers.park
            engine.ports.forget = self.consumers.forget
            self.watchdog = Watchdog(engine, self.consumers, self.lifecycle)
            engine.supervisor.spawn(self.watchdog.run(), "stall watchdog")
        engine.permit = cluster.lease
        cluster.add_hook(hook)
        if cluster.state is State.READY and cluster.topology is not None:
            await self.settle(cluster.topology)
        else:
            topology = cluster.topology
            if (
                self.consumers is not None
                and topology is not None
                and cluster.node in topology.members
            ):
                # An epoch adopted before the hook was added: its settle comes next.
                owned = set(self.placement_for(topology).owned())
                await self.consumers.prepare(owned, topology.members)
            await self.lifecycle.enter(Phase.WAITING)

    def merge_table(self) -> None:
        """Fold runtime puts and deletes from the state table into the catalogue."""
        assert self.table is not None
        specs = self.engine.specs
        for worker_id, stored in self.table.mirror.items():
            if stored.deleted:
                specs.pop(worker_id, None)
            elif stored.spec is not None:
                try:
                    specs[worker_id] = make_spec(worker_id, stored.spec)
                except ConfigurationError as exc:  # written by a foreign or older writer
                    self.table.bad_records += 1
                    log.warning("ignoring the stored spec of worker %r: %s", worker_id, exc)

    def reachable(self) -> bool:
        """The cluster can still write (not crashed, not stopping)."""
        cluster = self.cluster
        return not cluster.crashed and cluster.state not in (State.STOPPING, State.STOPPED)

    # -- the hooks -----------------------------------------------------------------------------

    async def release(self, topology: Topology) -> None:
        """Before this node acknowledges ``topology``: stop and hand over what moved away."""
        async with self.lock:
            trace = Trace()
            await self._release(topology, trace)
            self.timings.handoff["release"].observe(trace.total())
            self._report(trace, "release", topology.epoch)

    async def settle(self, topology: Topology) -> None:
        """Every member acknowledged ``topology``: start what is ours, resume."""
        async with self.lock:
            latest = self.cluster.topology
            if latest is not None and latest.epoch > topology.epoch:
                return  # a newer epoch was adopted meanwhile; its settle comes next
            try:
                trace = Trace()
                await self._settle(topology, trace)
                self.timings.handoff["settle"].observe(trace.total())
                self._report(trace, "settle", topology.epoch)
            except CloisterError as exc:
                # Taking workers over needs the latest stored state; without it, starting
                # them would resume from stale payloads. Nothing was started: try again.
                log.warning(
                    "manager %s: settling epoch %d postponed (%s); retrying",
                    self.options.name,
                    topology.epoch,
                    exc,
                )
                self.engine.supervisor.spawn(self._settle_later(topology), "settle retry")

    async def _settle_later(self, topology: Topology) -> None:
        await asyncio.sleep(1.0)
        if not self.lifecycle.leaving and not self.lifecycle.down:
            await self.settle(topology)

    def _report(self, trace: Trace, hook: str, epoch: int) -> None:
        """One line per release and settle that did something: where its time went."""
        if trace.steps:
            log.info(
                "manager %s: %s of epoch %d took %.3fs (%s)",
                self.options.name,
                hook,
                epoch,
                trace.total(),
                trace,
            )

    async def _release(self, topology: Topology, trace: Trace) -> None:
        lifecycle, engine = self.lifecycle, self.engine
        if lifecycle.leaving or lifecycle.down:
            return  # stop() handed everything over already
        # The dispatcher's gate stays as it was: held (not settled yet) or running.
        await lifecycle.enter(Phase.WAITING if engine.paused else Phase.REHASHING)
        placement = self.placement_for(topology)
        mine = placement.mine
        leaving = [i for i in engine.workers if not mine(i)]
        moves = self._rebalance(topology, placement)
        if self.consumers is not None:
            self.consumers.stop_fetching(set(moves.revoked))
        lost = [i for i in engine.parked if not mine(i)]
        self.forget_inbox_messages(lost)
        for worker_id in lost:
            engine.parked.pop(worker_id)  # their senders will retry with the new owner
        for worker_id in [i for i in self.handed if not mine(i)]:
            self.handed.pop(worker_id)
        consumers, revoked = self.consumers, set(moves.revoked)

        async def give_up() -> None:
            if consumers is not None and revoked:
                await consumers.release(revoked)

        if leaving:  # their partitions are given up while their payloads are shipped
            await self.hand_over(leaving, placement.owner_of, give_up)
            trace.step(f"hand over {len(leaving)} workers, give up {len(revoked)} partitions")
        elif revoked:
            await give_up()
            trace.step(f"give up {len(revoked)} partitions")
        if self.consumers is not None:
            # Claimed as soon as their holders give them up, while the barrier is awaited.
            await self.consumers.prepare(set(placement.owned()), topology.members)
        if self.claims is not None:  # their state is stored: the next owner claims them
            self.claims.keep_only(placement.owned())

    async def _settle(self, topology: Topology, trace: Trace) -> None:
        lifecycle, engine = self.lifecycle, self.engine
        if lifecycle.leaving or lifecycle.down:
            return  # a hook call already under way when stop() began: take nothing
        placement = self.placement_for(topology)
        if self.consumers is not None:
            # The inbox claims go on in the background while the state is claimed and read.
            await self.consumers.prepare(set(placement.owned()), topology.members)
        denied: set[int] = set()
        gained: set[int] | None = None  # None: no claims kept, so everything may be new
        if self.claims is not None:
            # Claim before reading: from here on the previous holder's writes are refused,
            # so the state read next is the last it stored. A failure propagates (retried).
            self.claims.keep_only(placement.owned())
            gained = {p for p in placement.owned() if self.claims.guard(p) is None}
            denied = await self.claims.claim(placement.owned(), topology.epoch)
            trace.step(f"claim {len(gained)} partitions")
        now = asyncio.get_running_loop().time()
        # The token first: a worker started below, or a record of a partition taken below,
        # may run a callback before this settle ends, and it works under this epoch.
        self.fence = topology.epoch
        if self.table is not None and (gained is None or gained):
            # The latest stored payloads and runtime specs (crash takeover, put/delete);
            # a failure propagates: settle() retries rather than resume from stale state.
            # Skipped when no partition came to us: the workers of the partitions we kept
            # were ours all along (every write of theirs was ours), so the mirror holds
            # their latest state, and nobody else's is needed here.
            self._report_lost_state(await self.table.load(seen=self._claimed_at(gained)), placement)
            trace.step(f"load {len(self.table.mirror)} states from {self.table.loaded_from}")
        mirror = self.table.mirror if self.table is not None else {}
        self.merge_table()
        specs, workers, parked = engine.specs, engine.workers, engine.parked
        before = len(workers)
        # A snapshot, with a yield every few thousand ids: a million specs take seconds,
        # and heartbeats (and the workers already running) must not wait for them.
        for count, (worker_id, spec) in enumerate(list(specs.items()), 1):
            if not count % YIELD_EVERY:
                await asyncio.sleep(0)
                if lifecycle.down:
                    return  # killed meanwhile: start nothing more
            if (
                worker_id in workers
                or specs.get(worker_id) is not spec  # deleted or replaced meanwhile
                or not placement.mine(worker_id)
                or (denied and placement.partition_of(worker_id) in denied)
            ):
                continue
            payload, fresh = None, True
            handed = self.handed.pop(worker_id, None)
            watermark = 0
            respec = False  # a runtime spec: stored and shipped with the worker from now on
            if handed is not None:
                payload, fresh, watermark = handed[0], False, handed[2]
                if handed[3] is not None:  # its period changed for good on the last owner
                    spec = specs[worker_id] = handed[3]
                    respec = True
                parked[worker_id] = [Message("cast", m) for m in handed[1]] + parked.get(
                    worker_id, []
                )
            else:
                stored = mirror.get(worker_id)
                if stored is not None and stored.has_payload:
                    payload, fresh, watermark = stored.payload, False, stored.watermark
                    respec = stored.spec is not None
            self.counters.taken_over += 0 if fresh else 1
            await engine.spawn(worker_id, spec, payload, now, fresh=fresh)
            if watermark or respec:
                worker = engine.materialize(worker_id)
                if worker is not None:
                    worker.watermark = watermark
                    if respec:
                        worker.flags |= RESPEC
        started = len(workers) - before
        if started:
            trace.step(f"start {started} workers")
        if self.consumers is not None:
            moves = self._rebalance(topology, placement)
            if moves.revoked or denied:
                await self.consumers.release(set(moves.revoked) | denied)
                trace.step(f"give up {len(moves.revoked | denied)} partitions")
            taken = await self.consumers.take(set(moves.owned) - denied)
            if taken:
                trace.step(f"take {taken} partitions")
        await lifecycle.enter(Phase.UP)

    def _claimed_at(self, gained: set[int] | None) -> int | None:
        """The revision of our latest claim of the partitions just ``gained``: a listing
        that holds it holds every write made before them. None (read from the leader)
        without claims, or when none of them was won."""
        if not gained or self.claims is None:
            return None
        guards = (self.claims.guard(partition) for partition in gained)
        return max((guard.revision for guard in guards if guard is not None), default=None)

    def _report_lost_state(self, lost: set[Any], placement: Placement) -> None:
        """Say which stored records of our partitions the medium lost (each node reports
        the partitions it takes, so the cluster's sum counts each record once)."""
        ours = sorted((i for i in lost if placement.mine(i)), key=repr)
        if not ours:
            return
        self.counters.state_lost += len(ours)
        log.error(
            "manager %s on node %s: the medium lost the stored state of %d worker(s) of "
            "this node's partitions (e.g. %s); they start again from their specs",
            self.options.name,
            self.cluster.node,
            len(ours),
            ", ".join(repr(i) for i in ours[:5]),
        )

    async def suspend(self, reason: SuspendReason) -> None:
        """The node may not process now (lease lost, short of consensus, stopping)."""
        if self.lifecycle.leaving or self.lifecycle.down:
            return
        if reason is SuspendReason.STOPPING:
            await self.hand_everything_over()
            return
        async with self.lock:
            await self._suspend()

    async def _suspend(self) -> None:
        engine = self.engine
        await self.lifecycle.enter(Phase.SUSPENDING)
        await engine.drain()
        if self.consumers is not None:
            # Give the partitions up; whoever consumes them next (us again, or the node
            # that takes over) starts from the oldest unhandled message.
            self.forget_inbox_messages()
            await self.consumers.release(self.consumers.held_or_wanted)
            # While we were away the topology may change and our workers move and come
            # back: never resume them from what is in memory here. Unacknowledged state is
            # dropped (its messages are delivered again); the rest is in the state table.
            assert self.table is not None
            self.table.dirty.clear()
            # Nor from a handoff received before: the stored state is the one to resume
            # from (and after a medium lost its data, a handed watermark names a sequence
            # of a log that is gone — it would skip the new log's records as duplicates).
            self.handed.clear()
            for count, worker_id in enumerate(list(engine.workers), 1):
                await engine.remove(worker_id, Reason.SUSPEND)
                if not count % YIELD_EVERY:
                    await asyncio.sleep(0)  # heartbeats go on while a million workers stop
            if not self.consumers.held_or_wanted:  # (a settle may have raced in meanwhile)
                self.consumers.reset()
        if self.claims is not None:  # claimed afresh on the next settle
            self.claims.clear()
        await self.lifecycle.enter(Phase.WAITING)

    # -- handoff -------------------------------------------------------------------------------

    async def hand_everything_over(self) -> None:
        """Leave: hand every worker to its next owner and give every partition up."""
        async with self.lock:
            await self._hand_all_over()

    async def _hand_all_over(self) -> None:
        cluster, engine = self.cluster, self.engine
        if self.lifecycle.down or cluster.topology is None:
            return
        placement = self.placement_now()
        self.lifecycle.move(Phase.LEAVING)
        if self.consumers is not None:
            self.consumers.stop_fetching(self.consumers.partitions)
        consumers = self.consumers

        async def give_up() -> None:  # every partition, while the payloads are shipped
            if consumers is not None:
                self.forget_inbox_messages()
                await consumers.release(consumers.held_or_wanted)

        # Hand over to the next preferred node that is still there: in a rolling stop the
        # ring may still name a node that left a moment ago (no epoch without it yet).
        if len(placement.ring) > 1:
            gone = [n for n in placement.ring.nodes if n not in cluster.members_seen]
            if all(n == cluster.node or n in gone for n in placement.ring.nodes):
                # The last one out: nobody to ship to, the stored payloads carry on.
                await self.hand_over(list(engine.workers), lambda worker_id: None, give_up)
            else:
                await self.hand_over(
                    list(engine.workers),
                    lambda worker_id: placement.successor_of(worker_id, gone),
                    give_up,
                )
        else:
            await give_up()
        # The claims stay: the last one out stores its payloads as it stops (core.stop),
        # and the nodes that take the partitions over claim them anew, which ends ours.
        self.lifecycle.move(Phase.LEFT)

    async def hand_over(
        self,
        leaving: list[Key],
        owner_of: Callable[[Key], str | None],
        meanwhile: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Stop ``leaving`` workers and ship their payloads and queued casts to their owners
        (``owner_of`` None: nobody to ship to, store the payloads).

        ``meanwhile`` runs alongside the shipping, once every leaving worker has stopped
        (the acks of what they handled are queued by then): giving their partitions up
        needs that, not the shipping, and on a replicated medium each costs as much.
        """
        engine, table = self.engine, self.table
        entries = [(i, engine.workers.get(i)) for i in leaving]
        for _, entry in entries:
            if isinstance(entry, Worker):
                entry.flags |= GONE  # no new callbacks; the running ones finish first
        batches: dict[str, list[list[Any]]] = {}
        for worker_id, entry in entries:
            if entry is None:
                continue
            casts: list[Any] = []
            watermark = 0
            respec = None
            if isinstance(entry, Worker):
                respec = entry.runtime_spec()
                await engine.wait_idle(entry)
                for m in entry.mailbox or ():
                    if m.reply is not None and not m.reply.done():
                        m.reply.set_exception(NotOwnerError(f"worker {worker_id!r} moved; retry"))
                    elif m.inbox is not None:
                        self.consumers.forget()  # type: ignore[union-attr]  # redelivered there
                    elif m.kind == "cast":
                        casts.append(m.body)
                entry.mailbox = None
                watermark = entry.watermark
            stateful = isinstance(entry, Worker) and (
                entry.payload is not entry.spec.payload or watermark or respec is not None
            )
            payload = entry.payload
            await engine.remove(worker_id, Reason.HANDOFF)
            if not (stateful or casts):  # the others restart from their spec: nothing to ship
                continue
            owner = owner_of(worker_id)
            if owner is not None:
                shipped = [worker_id, payload, casts, watermark]
                if respec is not None:  # a period changed for good travels with the worker
                    shipped.append(respec)
                batches.setdefault(owner, []).append(shipped)
            elif table is not None and stateful:
                table.mark(Stored(worker_id, respec, payload, True, watermark=watermark))
        self.counters.handed_off += len(leaving)
        steps: list[Awaitable[None]] = [self._ship_all(batches, leaving)]
        if meanwhile is not None:
            steps.append(meanwhile())
        results = await asyncio.gather(*steps, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _ship_all(self, batches: dict[str, list[list[Any]]], leaving: list[Key]) -> None:
        """Ship each owner's workers (owners at once), then store the leaving workers'
        payloads (those a failed shipping marked among them)."""

        async def ship(owner: str, batch: list[list[Any]]) -> None:
            for start in range(0, len(batch), HANDOFF_CHUNK):
                await self._ship(owner, batch[start : start + HANDOFF_CHUNK])

        await asyncio.gather(*(ship(owner, batch) for owner, batch in batches.items()))
        table = self.table
        if table is not None and self._lease_valid():  # past it, the stored state stands
            try:
                await table.flush(leaving)
            except FencedError as exc:  # another node claimed them: its state stands
                log.info("manager %s: handoff flush refused (%s)", self.options.name, exc)
                if isinstance(exc, PartitionsFencedError) and exc.unavailable is not None:
                    raise exc.unavailable from None

    async def _ship(self, owner: str, chunk: list[list[Any]]) -> None:
        # The batch names the epoch it moves under: a node that moved on refuses it.
        batch = {"epoch": self.cluster.epoch, "workers": chunk}
        try:
            await self.cluster.call(
                owner, f"cloister.manager.{self.options.name}.handoff", batch, timeout=10
            )
        except CloisterError as exc:
            if not self._lease_valid():
                # Past our lease these payloads may be stale: another node may own the
                # keys by now. Storing them could undo its work; the stored ones stand.
                log.warning(
                    "handoff of %d worker(s) to %s failed (%s) after the lease ran out; "
                    "nothing stored",
                    len(chunk),
                    owner,
                    exc,
                )
                return
            log.warning(
                "handoff of %d worker(s) to %s failed (%s); storing payloads instead",
                len(chunk),
                owner,
                exc,
            )
            if self.table is not None:
                for worker_id, payload, _casts, watermark, *respec in chunk:
                    spec = respec[0] if respec else None
                    self.table.mark(Stored(worker_id, spec, payload, True, watermark=watermark))

    async def receive_handoff(self, batch: Any) -> int:
        """Keep what a previous owner shipped (the RPC handler ``handoff``).

        :class:`FencedError` for a batch from an epoch older than ours (its sender lost
        touch: the stored state stands); :class:`WireFormatError` for a malformed one.
        """
        epoch, workers = _handoff_batch(batch)
        if epoch < self.cluster.epoch:
            raise FencedError(
                f"handoff of {len(workers)} worker(s) from epoch {epoch} refused: "
                f"node {self.cluster.node} is at epoch {self.cluster.epoch}"
            )
        for worker_id, payload, casts, watermark, fields in workers:
            spec = None
            if fields is not None:
                try:
                    spec = make_spec(worker_id, fields)
                except ConfigurationError as exc:
                    raise WireFormatError(f"handoff: worker {worker_id!r}: {exc}") from None
            self.handed[worker_id] = (payload, list(casts), watermark, spec)
        return len(workers)

    # -- inbox and table -----------------------------------------------------------------------

    def forget_inbox_messages(self, worker_ids: Collection[Key] | None = None) -> None:
        """Drop delivered, unhandled inbox messages: their next consumer gets them again."""
        consumers, engine = self.consumers, self.engine
        if consumers is None:
            return
        workers, parked = engine.workers, engine.parked
        for worker_id in list(workers if worker_ids is None else worker_ids):
            worker = workers.get(worker_id)
            if isinstance(worker, Worker) and worker.mailbox:
                kept = deque(m for m in worker.mailbox if m.inbox is None)
                consumers.forget(len(worker.mailbox) - len(kept))
                worker.mailbox = kept
        for worker_id in list(parked) if worker_ids is None else list(worker_ids):
            waiting = parked.get(worker_id)
            if waiting:
                kept_parked = [m for m in waiting if m.inbox is None]
                consumers.forget(len(waiting) - len(kept_parked))
                parked[worker_id] = kept_parked

    def _lease_valid(self) -> bool:
        return time.monotonic() < self.cluster.lease.lease_until

    def _unstorable(self, worker_id: Key, previous: Stored | None) -> None:
        """A worker's payload could not be stored: it goes on from the one last stored
        (or its spec's), so its next state is not built on one that cannot be kept."""
        worker = self.engine.workers.get(worker_id)
        if isinstance(worker, Worker):
            if previous is not None and previous.has_payload:
                # a copy: the mirror must stay what is stored, whatever the worker does
                worker.payload = wire.decode(wire.encode(previous.payload))
            else:
                worker.payload = worker.spec.payload

    async def _store_before_ack(self, keys: list[Any]) -> dict[Any, Unstorable]:
        """Store the payloads a batch of acks vouches for — only while the lease is valid:
        a node past its lease may have lost these keys, and its payloads are stale.

        :class:`PartitionsFencedError` when the medium refused some partitions' payloads:
        those partitions are given up already (:meth:`refused`), their acks are dropped.
        """
        if not self._lease_valid():
            # Not fenced yet: a lapse is waited out (a renewal that lands resumes the node
            # with its keys), an expiry suspends it — and then these acks are dropped with
            # their consumers. Never stored now: the keys may be someone else's already.
            raise LeaseLapsedError(
                f"node {self.cluster.node}: lease ran out; {len(keys)} payload(s) wait"
            )
        assert self.table is not None
        try:
            await self.table.flush(keys)
        except PartitionsFencedError as exc:
            # Refused at the medium (abandoned already) or never claimed here: either way
            # no ack of theirs may vouch for state that was not stored.
            if self.consumers is not None:
                self.consumers.abandon(set(exc.partitions) & self.consumers.held_or_wanted)
            raise
        table = self.table
        if not table.unstorable:
            return {}
        return {k: u for k in set(keys) if (u := table.take_unstorable(k)) is not None}

    async def _flush_loop(self) -> None:
        assert self.table is not None
        while True:
            await asyncio.sleep(self.options.flush_interval)
            if self.table.dirty and self._lease_valid():
                try:
                    await self.table.flush()
                except PartitionsFencedError as exc:
                    if exc.unavailable is not None:
                        log.warning(
                            "manager %s: payload flush postponed (%s)",
                            self.options.name,
                            exc.unavailable,
                        )
                except CloisterError as exc:
                    log.warning("manager %s: payload flush postponed (%s)", self.options.name, exc)

    async def _write_owned(self, stored: Stored) -> None:
        """The engine's one-record writes (a halted or re-keyed worker's deletion), as
        the owner: a refused one is dropped (the partition's next owner decides)."""
        assert self.table is not None
        try:
            await self.table.write(stored)
        except FencedError as exc:
            log.info("manager %s: %s", self.options.name, exc)

    # -- fencing at the medium (the state table's Fencing) ----------------------------------------

    def guard_of(self, worker_id: Any) -> tuple[int, Guard | None]:
        """The partition of ``worker_id`` and the guard of its claim (None: not ours)."""
        topology = self.cluster.topology
        if topology is None or self.claims is None:
            return -1, None
        partition = self.placement_for(topology).partition_of(worker_id)
        return partition, self.claims.guard(partition)

    def refused(self, partition: int, guard: Guard, records: int) -> None:
        """The medium refused ``records`` writes of ``partition``: another node claimed it.

        Synchronous, so that nothing more of the partition is acked or written: its token
        goes, its consumer stops; then (a task, under the region's lock) its workers are
        dropped without storing anything and the partition is given up — its records go
        to the node that claimed it.
        """
        self.counters.fenced_writes += records
        assert self.claims is not None
        if not self.claims.drop(partition, guard.revision):
            return  # refused before, or claimed again since: handled already
        log.warning(
            "manager %s: the medium refused %d state write(s) of partition %d: node %s "
            "lost it to another claimant (a pause or partition outlived its lease?). "
            "Dropping its workers here; its messages go to the new owner",
            self.options.name,
            records,
            partition,
            self.cluster.node,
        )
        if self.consumers is not None:
            self.consumers.abandon({partition})
        self.engine.supervisor.spawn(self._drop_partition(partition), f"fenced {partition}")

    async def _drop_partition(self, partition: int) -> None:
        async with self.lock:
            assert self.claims is not None
            topology = self.cluster.topology
            if topology is None or self.claims.guard(partition) is not None:
                return  # claimed anew meanwhile (a settle): its workers are valid
            placement = self.placement_for(topology)
            doomed = [i for i in self.engine.workers if placement.partition_of(i) == partition]
            self.forget_inbox_messages(doomed)
            assert self.table is not None
            for count, worker_id in enumerate(doomed, 1):
                self.table.dirty.pop(worker_id, None)  # never stored: it is not ours
                self.engine.parked.pop(worker_id, None)
                await self.engine.remove(worker_id, Reason.FENCED)
                if not count % YIELD_EVERY:
                    await asyncio.sleep(0)
        # If the epoch we settled on still gives us the partition, claim it again: the
        # other claim may be older than our epoch (then ours wins), or newer (then this
        # node is behind, takes nothing and waits for the next epoch).
        if (
            self.cluster.state is State.READY
            and topology.epoch == self.fence
            and partition in placement.owned()
            and not self.lifecycle.leaving
        ):
            await self.settle(topology)


def _handoff_batch(
    batch: Any,
) -> tuple[int, list[tuple[Any, Any, list[Any], int, dict[str, Any] | None]]]:
    """The epoch and the workers (``[id, payload, casts, watermark]``, and the worker's
    spec fields when its period changed for good) of a handoff batch, checked against its
    schema."""
    checked = schema.HANDOFF.convert(batch)
    return checked.epoch, [
        (entry[0], entry[1], entry[2], entry[3], entry[4] if len(entry) == 5 else None)
        for entry in checked.workers
    ]
