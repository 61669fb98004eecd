"""``Cluster``: turns a set of processes into a cluster.

How a node works, in one paragraph: it writes a member record with a TTL and renews it
every heartbeat (:mod:`~cloister.cluster.membership`); it watches every member record and
the ``control`` bucket; one node holds the *sentry* lease (a TTL key won by
compare-and-set) and turns membership changes into numbered *epochs* — one record, also
written by compare-and-set, listing the members (:mod:`~cloister.cluster.topology`).
Every node adopts each new epoch, builds its rings from it, releases the keys it no
longer owns and acknowledges the epoch in its member record. When every member has
acknowledged, the node is ``ready`` and takes up the keys it gained. A node that cannot
renew its own record stops claiming anything before the record can expire on the others
(self-fencing), so ring ownership is never shared.

All of the node's decisions are taken in one control task, so they never race; watches
and the heartbeat only feed it facts and wake it. The task asks the pure
:func:`~cloister.cluster.control.decide` what to do and carries it out; the leases live in
:mod:`~cloister.cluster.lease`, the facts and their readers in :mod:`~cloister.cluster.control`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Collection, Iterable
from types import TracebackType
from typing import Any

from cloister._loopwatch import LoopWatch, watch
from cloister._tasks import Supervisor, wait_event
from cloister.backends import Backend, KeyValue, ServeLimits, open_backend
from cloister.cluster.control import (
    ClusterCounters,
    Control,
    Decision,
    Facts,
    decide,
    foreign_members,
)
from cloister.cluster.hooks import Hooks, SuspendReason, TopologyHook
from cloister.cluster.info import ClusterInfo, DataLoss
from cloister.cluster.lease import Lease
from cloister.cluster.listener import ListenerDispatcher
from cloister.cluster.membership import MemberRecord
from cloister.cluster.placement import DEFAULT_PARTITIONS, Placed, Placement
from cloister.cluster.probe import Prober
from cloister.cluster.requests import MULTICAST_TOPIC, RemoteCalls, Requests
from cloister.cluster.rpc import Handlers, encode_request
from cloister.cluster.schedules import BUCKET as SCHEDULE_BUCKET
from cloister.cluster.schedules import Callback, Missed, ScheduledJob, Schedules, When
from cloister.cluster.settings import ClusterSettings
from cloister.cluster.states import State, StateMachine
from cloister.cluster.topology import EpochRecord, Topology
from cloister.errors import (
    BackendError,
    CloisterError,
    ClusterNotReadyError,
    ConfigurationError,
    NodeDiedError,
    NotRunningError,
)
from cloister.ring import HashRing
from cloister.schema import SECRET_ENV, Keyring
from cloister.store import Table, open_table

__all__ = ["Cluster", "SuspendReason", "TopologyHook"]

log = logging.getLogger("cloister.cluster")


def _pong(_payload: Any) -> str:
    return "pong"


class Cluster(RemoteCalls):
    """One node of a cluster. Use ``async with Cluster(...) as cluster:``.

    Args:
        name: the cluster's name; clusters with different names never see each other.
        node: this node's name (unique in the cluster); generated when None.
        backend: ``memory://NAME`` (embedded) or ``nats://host:port[,host:port...]``.
        consensus: how many members must be present before any node is ``ready``.
        listener: an object with ``on_state_change(from, to, info)`` (and optionally
            ``on_sentry_change(old, new, info)``), sync or async.
        groups: named rings this node also belongs to (``whois(key, group=...)``).
        weight: this node's share of the main ring, relative to the others.
        heartbeat: seconds between membership renewals.
        failure_timeout: seconds after which a silent member is removed (default
            3 heartbeats; at least 2).
        expected: node names that must all be present before ``ready`` (Cloister's
            static ``sentry: [...]`` list).
        request_timeout: default timeout of ``call``/``multicall`` (seconds); a multicast
            handler runs no longer than this either.
        max_concurrent_requests: requests from other nodes this node runs at once; more
            are refused at once with :class:`~cloister.errors.NodeBusyError` (counted in
            ``requests_refused``).
        max_queued_request_bytes: bytes of requests that may wait to be run; past that
            they are refused the same way (a flood costs bounded memory).
        backend_options: passed to the backend (NATS credentials, TLS, ...).
        secret: the cluster secret every record and internal request is sealed with
            (HMAC-SHA256, see :mod:`cloister.schema`): a str (several separated by
            commas: the first signs, all verify), bytes, or a list of them. None reads
            ``CLOISTER_SECRET``; unset, records are not sealed. Every node of a cluster
            needs the same secret: records without a valid tag are ignored and counted.
    """

    def __init__(
        self,
        name: str,
        node: str | None = None,
        *,
        backend: str = "memory://default",
        consensus: int = 1,
        listener: object | None = None,
        groups: Iterable[str] = (),
        weight: float = 1.0,
        heartbeat: float = 1.0,
        failure_timeout: float | None = None,
        expected: Collection[str] = (),
        request_timeout: float = 5.0,
        max_concurrent_requests: int = 256,
        max_queued_request_bytes: int = 8 * 1024 * 1024,
        backend_options: dict[str, Any] | None = None,
        secret: str | bytes | Iterable[str | bytes] | None = None,
    ) -> None:
        settings = ClusterSettings.check(
            name,
            node,
            backend=backend,
            consensus=consensus,
            groups=groups,
            weight=weight,
            heartbeat=heartbeat,
            failure_timeout=failure_timeout,
            expected=expected,
            request_timeout=request_timeout,
            max_concurrent_requests=max_concurrent_requests,
            max_queued_request_bytes=max_queued_request_bytes,
        )
        self.settings = settings
        name, node = settings.name, settings.node
        self.name = name
        self.node = node
        self.backend_url = settings.backend_url
        self.consensus = settings.consensus
        self.groups = settings.groups
        self.weight = settings.weight
        self.heartbeat = settings.heartbeat
        self.failure_timeout = settings.failure_timeout
        self.expected = settings.expected
        self.request_timeout = settings.request_timeout
        self.started_at = 0.0
        self._backend_options = dict(backend_options or {})
        self._listener = ListenerDispatcher(listener)
        self._machine = StateMachine()
        self.keyring = keyring = Keyring.resolve(secret)
        self.counters = ClusterCounters(unauthenticated=keyring.rejected)
        self._handlers = Handlers(
            node,
            keyring,
            max_concurrent=settings.max_concurrent_requests,
            default_timeout=settings.request_timeout,
            counters=self.counters,
        )
        # Exempt from the request limit: a flooded node still answers status and pings.
        self._handlers.register("cloister.info", self._info_handler, builtin=True, exempt=True)
        self._handlers.register("cloister.ping", _pong, builtin=True, exempt=True)
        self._requests = Requests(
            node, self._handlers, self._require_backend, settings.request_timeout
        )
        self._hooks = Hooks(node)
        self._supervisor = Supervisor(f"cluster {name}/{node}")
        self._backend: Backend | None = None
        self._wake = asyncio.Event()

        # Facts fed by the watches and the heartbeat; decisions are taken in _step().
        self._control = Control(node, self.heartbeat, self.counters, self._wake.set, keyring)
        self._lease = Lease(
            name,
            node,
            heartbeat=self.heartbeat,
            failure_timeout=self.failure_timeout,
            machine=self._machine,
            counters=self.counters,
            wake=self._wake.set,
            keyring=keyring,
        )
        # Members whose process is gone, found ahead of their TTL (probe.py).
        self._prober = Prober(
            self._ping,
            self._probe_targets,
            self._wake.set,
            interval=min(0.2, self.heartbeat / 4),
        )
        # What this node has adopted.
        self._topology: Topology | None = None
        self._ring: HashRing | None = None
        # The placement of keys that name no manager, rebuilt on every adopted epoch.
        self._placement = Placement(HashRing(()), DEFAULT_PARTITIONS, node)
        self._suspended = True
        self._settled_epoch = 0
        # A lapse the node waits out (renewals failing while the medium elects a leader):
        # its work stops, its keys stay (see control.Decision.pause).
        self._paused = False
        self._paused_at = 0.0
        self._ready = asyncio.Event()
        self._crashed = False
        self._failure: CloisterError | None = None
        self._dead = asyncio.Event()
        self._supervisor.on_critical = self._on_critical_failure
        self._loop_watch: LoopWatch | None = None
        # The medium lost its data (see _on_data_loss): the step suspends once for it, and
        # the node settles only on an epoch above the one it had adopted then.
        self._data_lost = False
        self._rebuild_above: int | None = None
        self._last_data_loss: DataLoss | None = None
        self._control.on_data_loss = self._lease.on_data_loss = self._on_data_loss
        self._schedules = Schedules(
            node,
            lambda: self.backend.kv(SCHEDULE_BUCKET),
            self._may_run_job,
            self._supervisor,
            poll=min(0.25, self.heartbeat / 2),
            # What a crash failover takes: the dead owner's record expires, the next
            # owner adopts the epoch (one more heartbeat), with room to spare.
            grace=2 * self.failure_timeout + self.heartbeat,
        )

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Cluster:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect, join the cluster and start following it. Returns once joined."""
        if self._machine.state is not State.DOWN:
            raise CloisterError(f"node {self.node} was already started (state {self.state})")
        self.started_at = time.time()
        self._backend = backend = open_backend(
            self.backend_url, self.name, self.node, **self._backend_options
        )
        backend.keyring = self.keyring  # what the store and the managers seal records with
        self._listener.start()
        self._loop_watch = watch()
        self._loop_watch.start()
        try:
            await backend.connect()
            self._prober.allow_for(backend.reconnect_spread, lambda: backend.server_lost_at)
            backend.on_reconnect(self._on_reconnect)
            backend.on_closed(self._on_closed)
            backend.on_data_loss(self._on_data_loss)
            members = await backend.kv("members", ttl_keys=True)
            control = await backend.kv("control", ttl_keys=True)
            self._control.attach(members, control)
            self._lease.attach(members, control)
            self._move(State.ASSEMBLING)
            await self._refuse_foreign_cluster(members)
            previous = await self._lease.check_name_free(backend)
            synced = asyncio.Event(), asyncio.Event()
            self._supervisor.spawn(
                self._control.follow_members(synced[0]), "members watch", critical=True
            )
            self._supervisor.spawn(
                self._control.follow_control(synced[1]), "control watch", critical=True
            )
            await asyncio.gather(synced[0].wait(), synced[1].wait())
            await self._join(previous)
            settings = self.settings
            limits = ServeLimits(
                settings.max_concurrent_requests,
                settings.max_queued_request_bytes,
                self._handlers.refuse,
            )
            await backend.serve(self._handlers.answer, limits)
            await backend.subscribe(MULTICAST_TOPIC, self._requests.on_multicast)
            spawn = self._supervisor.spawn
            spawn(self._lease.heartbeat_loop(), "heartbeat", critical=True)
            spawn(self._control.resync_loop(), "resync", critical=True)
            spawn(self._control_loop(), "control", critical=True)
            spawn(self._prober.run(), "crash probes")
        except BaseException:
            await self._teardown()
            raise
        log.info("node %s joined cluster %s via %s", self.node, self.name, backend.url)

    async def _refuse_foreign_cluster(self, members: KeyValue) -> None:
        """Refuse to join members whose records this node cannot authenticate (another
        secret, or a secret on one side only): it could only fight them."""
        foreign = await foreign_members(
            members, self.keyring, wait=self.failure_timeout, poll=self.heartbeat / 2
        )
        if foreign:
            mine = "has a secret they do not share" if self.keyring.signing else "has no secret"
            raise ConfigurationError(
                f"node {self.node} cannot join cluster {self.name!r}: its live members "
                f"({', '.join(foreign[:5])}) write records this node cannot authenticate, "
                f"and this node {mine}. Give every node the same secret ({SECRET_ENV} or "
                "Cluster(secret=...)), or none to all"
            )

    async def stop(self) -> None:
        """Leave gracefully: stop owned work, hand the sentry lease over, leave at once."""
        if self._machine.state in (State.DOWN, State.STOPPING, State.STOPPED):
            return
        self._move(State.STOPPING)
        self._ready.clear()
        await self._supervisor.close()  # no more decisions: the control loop is gone
        if not self._crashed:
            await self._hooks.suspend(SuspendReason.STOPPING)
            await self._lease.leave()
        await self._teardown()
        self._move(State.STOPPED)
        await self._listener.close()

    async def _teardown(self) -> None:
        if self._loop_watch is not None:
            self._loop_watch.stop()
            self._loop_watch = None
        await self._supervisor.close()
        if self._backend is not None:
            await self._backend.close()
        self._ready.clear()
        if self._machine.state is State.DOWN:
            await self._listener.close()

    def _on_closed(self) -> None:
        """The connection is gone for good: this node is dead. Stop everything now (the
        components' tasks too), say goodbye to nobody; its records expire on their TTL.

        Not recovered in place: a new connection would have to rebuild every watch,
        consumer and subscription of every component, and a node that half did so would
        follow the cluster no more than a dead one. A new process starts clean.
        """
        backend = self._backend
        cause = None if backend is None else backend.closed_reason
        because = "" if cause is None else f" ({cause})"
        where = self.backend_url if backend is None else backend.url  # no credentials
        message = (
            f"node {self.node} lost its connection to {where} for good{because} "
            "and stopped; start it again (its records expire on their TTL and the others "
            "take its keys meanwhile; run nodes under a supervisor that restarts them)"
        )
        log.error("%s", message)
        self._die(NodeDiedError(message))

    def _on_critical_failure(self, task: str, error: BaseException | None) -> None:
        """A task the node cannot live without ended: the node stops loudly (its records
        expire on their TTL), never a live process that stopped following the cluster."""
        what = "ended" if error is None else f"died of {type(error).__name__}: {error}"
        log.error("node %s stops: its task %s %s", self.node, task, what)
        failure = NodeDiedError(f"node {self.node} stopped: its task {task} {what}")
        failure.__cause__ = error
        self._die(failure)

    def _die(self, failure: CloisterError) -> None:
        if self._failure is None:
            self._failure = failure
        self._crashed = True
        self._ready.clear()
        self._supervisor.kill()
        self._dead.set()

    def _on_reconnect(self) -> None:
        self._prober.reconnected()
        self._control.resync.set()
        self._wake.set()

    def _on_data_loss(self, why: str) -> None:
        """The medium lost its data (the backend re-created streams, or the records show
        it: see :mod:`~cloister.cluster.control`). Said loudly once per episode; each sign
        makes the node forget what the medium no longer holds, and the control loop
        suspends the node and settles it afresh on a new epoch."""
        self._control.forget_medium()
        self._lease.medium_lost()
        if self._rebuild_above is not None:
            log.debug("node %s: the medium lost data (same episode): %s", self.node, why)
            self._wake.set()
            return
        self.counters.medium_data_loss += 1
        self._rebuild_above = self.epoch
        self._data_lost = True
        self._last_data_loss = DataLoss(why, time.time(), self.epoch)
        log.error(
            "node %s: the medium %s lost its data (%s); the control plane is rebuilt: "
            "member record and sentry lease written anew, a new epoch above %d, partitions "
            "claimed again; what the medium stored (worker state, inbox records not yet "
            "handled) is lost",
            self.node,
            self.backend_url,
            why,
            self.epoch,
        )
        self._wake.set()

    # -- public API -----------------------------------------------------------------------

    @property
    def state(self) -> State:
        """This node's current state."""
        return self._machine.state

    @property
    def epoch(self) -> int:
        """The epoch this node has adopted (0 before the first)."""
        return 0 if self._topology is None else self._topology.epoch

    @property
    def topology(self) -> Topology | None:
        """The adopted topology: epoch, members and rings."""
        return self._topology

    @property
    def ring(self) -> HashRing:
        """The main ring of the adopted epoch (empty before the first)."""
        return HashRing(()) if self._ring is None else self._ring

    @property
    def members_seen(self) -> frozenset[str]:
        """The nodes whose member record this node sees right now.

        It runs ahead of :attr:`topology`: a node that has just left is gone from here
        before an epoch without it is published.
        """
        return frozenset(self._control.view)

    @property
    def sentry(self) -> str | None:
        """The sentry named by the adopted epoch."""
        return None if self._topology is None else self._topology.sentry

    @property
    def is_sentry(self) -> bool:
        """True while this node is the sentry of the adopted epoch and holds the lease."""
        return (
            self._topology is not None
            and self._topology.sentry == self.node
            and self._lease.sentry_valid(time.monotonic())
        )

    def whois(self, key: Any, group: str | None = None, *, manager: Placed | None = None) -> str:
        """The node that owns ``key`` in the adopted epoch.

        With ``manager`` (a :class:`~cloister.DynamicManager` class or instance): the node
        that runs that manager's worker ``key`` — the same answer as
        ``manager.owner_of(key)``. Without: the node that owns ``key`` among
        ``DEFAULT_PARTITIONS`` partitions placed on the main ring (``group``'s ring when
        given), which is where a manager with default settings runs it.
        """
        return self._placement_of(self._require_topology(), group, manager).owner_of(key)

    def mine(self, key: Any, group: str | None = None, *, manager: Placed | None = None) -> bool:
        """True when this node owns ``key`` in the adopted epoch (see :meth:`whois`).

        Synchronous and cheap (one hash, one index): call it inside ``perform``.
        """
        if group is None and manager is None:
            return self._placement.mine(key)
        topology = self._topology
        return topology is not None and self._placement_of(topology, group, manager).mine(key)

    def _placement_of(
        self, topology: Topology, group: str | None, manager: Placed | None
    ) -> Placement:
        if manager is None:
            return topology.placement(self.node, DEFAULT_PARTITIONS, group)
        if group is not None:
            raise ConfigurationError("give a group or a manager, not both: a manager has its own")
        return topology.placement(
            self.node, manager.partitions, manager.placement_group(), strict=False
        )

    def siblings(self, group: str | None = None) -> tuple[str, ...]:
        """The members of the adopted epoch (of ``group`` when given), this node included."""
        if self._topology is None:
            return ()
        return self._topology.ring_for(group).nodes

    @property
    def info(self) -> ClusterInfo:
        """A snapshot of this node's view."""
        topology = self._topology
        return ClusterInfo(
            cluster=self.name,
            node=self.node,
            state=self.state,
            members=() if topology is None else topology.ring.nodes,
            epoch=self.epoch,
            consensus=self.consensus,
            sentry=self.sentry,
            is_sentry=self.is_sentry if self._backend is not None else False,
            started_at=self.started_at,
            fingerprint="" if topology is None else topology.ring.fingerprint,
            groups=self.groups,
            data_losses=self.counters.medium_data_loss,
            last_data_loss=self._last_data_loss,
            rebuilding=self._rebuild_above is not None,
            schedules=self._schedules.infos,
        )

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until this node is ``ready``; :class:`ClusterNotReadyError` on timeout."""
        if not await wait_event(self._ready, timeout):
            raise ClusterNotReadyError(
                f"node {self.node} not ready after {timeout}s: state {self.state}, "
                f"{len(self.siblings())} member(s) in epoch {self.epoch}, consensus "
                f"{self.consensus}"
                + (f", expecting {sorted(self.expected)}" if self.expected else "")
            )

    def add_hook(self, hook: TopologyHook) -> None:
        """Follow ownership changes (used by :class:`~cloister.manager.DynamicManager`)."""
        self._hooks.add(hook)
        self._wake.set()

    def remove_hook(self, hook: TopologyHook) -> None:
        """Stop following ownership changes."""
        self._hooks.remove(hook)

    @property
    def backend(self) -> Backend:
        """The connected backend (for the layers above: tables, inbox)."""
        return self._require_backend()

    async def table(self, name: str, *, replicas: int | None = None) -> Table:
        """Open (creating if needed) the cluster's replicated table ``name``.

        The same table from every node: see :class:`cloister.store.Table`. ``replicas``
        asks the backend for that many copies where it supports it per table.
        """
        return await open_table(self.backend, name, replicas=replicas)

    async def schedule(
        self,
        name: str,
        when: When,
        callback: Callback,
        *,
        missed: Missed = "once",
        grace: float | None = None,
    ) -> ScheduledJob:
        """Run ``callback(tick)`` at every tick of ``when``, once in the whole cluster.

        Call it on every node that may run the job (typically all): the owner of
        ``name`` (``whois(name)``) claims each tick at the medium and runs it, so a tick
        runs on one node, once, however many nodes schedule it, and the job moves with
        the ring when nodes come and go. ``when``: seconds (or a ``timedelta``) — ticks
        at every multiple of it since the Unix epoch —, or a cron expression (UTC; needs
        ``pip install 'pycloister[cron]'``). ``callback`` gets a
        :class:`~cloister.cluster.schedules.Tick`; sync callbacks run off the event loop.
        Ticks missed by less than ``grace`` seconds (default: twice the failure timeout
        plus a heartbeat, what a crash failover takes) run late, each once; ``missed``
        says what becomes of those missed longer, while no node could run them:
        ``"once"`` runs them as one run, ``"skip"`` drops them. See
        :mod:`cloister.cluster.schedules` for the guarantees.
        """
        self._require_backend()
        return await self._schedules.add(name, when, callback, missed=missed, grace=grace)

    async def unschedule(self, name: str) -> bool:
        """Stop following job ``name`` on this node (its running callback finishes first);
        True when it was scheduled here. Nodes that still schedule it go on running it."""
        return await self._schedules.remove(name)

    @property
    def schedules(self) -> dict[str, ScheduledJob]:
        """The jobs this node follows, by name (see :meth:`schedule`)."""
        return dict(self._schedules.jobs)

    def _may_run_job(self, name: str) -> bool:
        """This node may claim ``name``'s ticks now: ready, its lease holding, the owner."""
        return (
            self.state is State.READY
            and not self._paused
            and time.monotonic() < self._lease.lease_until
            and self.mine(name)
        )

    @property
    def incarnation(self) -> int:
        """This process's incarnation of the node name: a random number drawn on every
        start, in the member record. What the node holds on the medium in its own name
        (inbox claims) is named with it too, so that a process that took the name over
        and the one it replaced never touch each other's. 0 before :meth:`start`."""
        record = self._lease.record
        return 0 if record is None else record.incarnation

    @property
    def crashed(self) -> bool:
        """True once this node died: its connection to the medium closed for good, or a
        task it cannot live without (heartbeat, control loop, watches) ended."""
        return self._crashed

    @property
    def failure(self) -> CloisterError | None:
        """Why this node died (see :attr:`crashed`); None while it lives."""
        return self._failure

    async def wait_dead(self) -> CloisterError:
        """Wait until this node dies (see :attr:`crashed`); return why."""
        await self._dead.wait()
        assert self._failure is not None
        return self._failure

    @property
    def loop_watch(self) -> LoopWatch | None:
        """The lag of this node's event loop (``lag``, ``max_lag``, ``stalls``, and
        ``last_culprit``: the code that held it last); None when not started."""
        return self._loop_watch

    @property
    def paused(self) -> bool:
        """True while this node waits out a lapse of its lease: its renewals fail (the
        medium may be electing a leader), so no work starts, but its keys stay here until
        a renewal lands or ``backend.failover_time`` has passed (then it suspends)."""
        return self._paused

    @property
    def lease(self) -> Lease:
        """This node's member lease; ``lease.lease_until`` (``time.monotonic()``) is when
        its right to work runs out unless renewed. Read it, never write it: components
        check it before work starts and when a result comes back."""
        return self._lease

    @property
    def supervisor(self) -> Supervisor:
        """The owner of this node's tasks. A component started on the node (a manager)
        takes a child of it (``cluster.supervisor.child(name)``): a dying node takes its
        components' tasks with it."""
        return self._supervisor

    @property
    def listener_errors(self) -> int:
        """How many times the listener raised."""
        return self._listener.errors

    # -- internals ----------------------------------------------------------------------------

    def _info_handler(self, _payload: Any) -> dict[str, Any]:
        return self.info.to_wire()

    def _require_backend(self) -> Backend:
        if self._backend is None or self._machine.state in (State.DOWN, State.STOPPED):
            raise NotRunningError(f"node {self.node} is not running; await cluster.start() first")
        return self._backend

    def _require_topology(self) -> Topology:
        if self._topology is None:
            raise ClusterNotReadyError(
                f"node {self.node} has no topology yet; await cluster.wait_ready() first"
            )
        return self._topology

    # -- internals: membership ------------------------------------------------------------

    async def _join(self, previous_revision: int | None) -> None:
        record = MemberRecord(
            node=self.node,
            incarnation=secrets.randbits(62),
            weight=self.weight,
            groups=self.groups,
            started_at=self.started_at,
            state=str(self.state),
            ttl=self.failure_timeout,
        )
        await self._lease.join(record, previous_revision)
        self._control.note_member(record)

    # -- internals: crash probes ------------------------------------------------------------

    async def _ping(self, node: str, timeout: float) -> object:
        """One probe of ``node`` (its reply is not read: any answer means it lives)."""
        return await self.backend.request(
            node,
            encode_request("cloister.ping", None, self.node, timeout=timeout, keyring=self.keyring),
            timeout=timeout,
        )

    def _probe_targets(self) -> dict[str, int]:
        """What this node probes, with the revision of each one's member record: as the
        sentry (it deletes the records of the dead), every other member; otherwise the
        sentry (any member claims over a dead one's lease)."""
        if self._crashed:
            return {}
        control = self._control
        renewed = control.renewed
        if self._lease.sentry_valid(time.monotonic()):
            names = [name for name in control.view if name != self.node]
        elif control.sentry_holder is not None and control.sentry_holder != self.node:
            names = [control.sentry_holder]
        else:
            names = []
        return {name: renewed[name][0] for name in names if name in renewed}

    # -- internals: the control loop --------------------------------------------------------

    async def _control_loop(self) -> None:
        settle = min(0.05, self.heartbeat / 4)
        while True:
            self._wake.clear()
            try:
                delay = await self._step(settle)
            except BackendError as exc:
                log.debug("node %s control step postponed: %s", self.node, exc)
                delay = self.heartbeat / 4
            await wait_event(self._wake, delay)

    def _facts(
        self,
        now: float,
        lease_ok: bool,
        settle: float,
        record_lost: bool = False,
        data_lost: bool = False,
    ) -> Facts:
        control, lease = self._control, self._lease
        return Facts(
            node=self.node,
            view=control.view,
            view_changed_at=control.view_changed_at,
            epoch_record=control.epoch_record,
            epoch_revision=control.epoch_revision,
            sentry_holder=control.sentry_holder,
            holds_sentry=lease.sentry_revision is not None,
            lease_ok=lease_ok,
            sentry_ok=lease.sentry_valid(now),
            acked=None if lease.record is None else lease.record.acked,
            topology=self._topology,
            state=self.state,
            suspended=self._suspended,
            consensus=self.consensus,
            expected=self.expected,
            heartbeat=self.heartbeat,
            settle=settle,
            record_lost=record_lost,
            lapsed_for=0.0 if lease_ok else max(0.0, now - lease.renewed_until),
            paused=self._paused,
            settled_epoch=self._settled_epoch,
            failover_time=self.backend.failover_time,
            epoch_garbage=control.epoch_garbage is not None,
            sentry_garbage=control.sentry_garbage is not None,
            ghosts=dict(control.ghosts),
            renewed=dict(control.renewed),
            failure_timeout=self.failure_timeout,
            data_lost=data_lost,
            rebuild_above=self._rebuild_above,
            unreachable=dict(self._prober.unreachable),
            sentry_revision=control.sentry_revision,
            held_sentry_revision=lease.sentry_revision,
        )

    async def _step(self, settle: float) -> float:
        """Carry out what :func:`~cloister.cluster.control.decide` says; return when to look
        again. Facts move while an effect is awaited (watches, heartbeat), so the step
        decides again after each one; the lease counts as it stood when the step began."""
        now = time.monotonic()
        # A rejoin after our record expired counts as a lost lease for one step: suspend.
        record_lost = self._lease.take_expiry()
        lease_ok = not record_lost and now < self._lease.renewed_until
        data_lost, self._data_lost = self._data_lost, False

        def facts() -> Facts:
            return self._facts(now, lease_ok, settle, record_lost, data_lost)

        try:
            return await self._carry_out(now, facts)
        except BaseException:
            self._data_lost = self._data_lost or data_lost  # not acted on yet: next step
            raise

    async def _carry_out(self, now: float, facts: Callable[[], Facts]) -> float:
        """One step's decisions, deciding again after each awaited effect (see _step)."""
        decision = decide(facts(), now)
        if decision.fence:
            self.counters.fenced += 1
            if decision.pause:
                log.warning(
                    "node %s cannot renew its membership: pausing its work and keeping its "
                    "keys for up to %.1f s while the medium may be electing a leader",
                    self.node,
                    self.backend.failover_time,
                )
            else:
                log.warning(
                    "node %s cannot renew its membership: fencing (stops claiming keys)",
                    self.node,
                )
        if decision.claim_sentry:
            over, why = self._control.sentry_garbage, "a malformed one"
            if decision.claim_over is not None:
                over, why = decision.claim_over, f"{self._control.sentry_holder}'s (gone)"
            if await self._lease.claim_sentry(now, over, why=why):
                self._control.sentry_holder = self.node
                self._control.view_changed_at = 0.0  # publish at once: the sentry names itself
            self._control.sentry_garbage = None  # claimed, or somebody wrote it since
            decision = decide(facts(), now)
        for key, revision in decision.delete_ghosts:
            await self._control.delete_member(key, revision, "a ghost: stored under another key")
        for key, revision in decision.departed:
            self._prober.unreachable.pop(key, None)
            self.counters.crashes_seen += 1
            await self._control.delete_member(key, revision, "its process is gone (no responders)")
        for key, revision in decision.expire:
            await self._control.delete_member(
                key, revision, "not renewed for twice its TTL: written without one?"
            )
        delay = decision.delay
        if decision.publish is not None:
            await self._control.publish(decision.publish)
            decision = decide(facts(), now)
        if decision.adopt is not None:
            await self._adopt(decision.adopt)
            decision = decide(facts(), now)
        if decision.ack is not None:
            await self._lease.write_record(acked=decision.ack)
            decision = decide(facts(), now)
        await self._enact_state(decision)
        return delay

    async def _adopt(self, record: EpochRecord) -> None:
        previous = self._topology
        topology = Topology.from_record(record)
        self._topology, self._ring = topology, topology.ring
        self._placement = topology.placement(self.node)
        self.counters.epochs_adopted += 1
        if self.state is State.READY:
            self._move(State.REHASHING)
        self._ready.clear()
        if previous is None or previous.sentry != topology.sentry:
            self._listener.sentry_changed(
                None if previous is None else previous.sentry, topology.sentry, self.info
            )
        log.info("node %s adopted %s", self.node, topology.describe(previous))
        await self._hooks.release(topology)

    async def _enact_state(self, decision: Decision) -> None:
        """Move, suspend, settle: the state part of a decision, in that order.

        The state (listener events, readiness, metrics) moves first: a fenced node says so
        at once, and then gives up its partitions, which may take timeouts on a medium it
        cannot reach."""
        if decision.pause:
            self._paused = True
            self._paused_at = time.monotonic()
            self._lease.hold()
        if decision.resume:
            self._paused = False
            log.info(
                "node %s renewed its membership after %.1f s; its keys were never released",
                self.node,
                time.monotonic() - self._paused_at,
            )
        if decision.move is not None:
            leaving_ready = self.state is State.READY
            self._move(decision.move)
            if leaving_ready:
                self._ready.clear()
            elif decision.move is State.READY:
                self._ready.set()  # back from a pause, on the epoch it had settled
        if decision.resume:
            # Work starts again only once the listener heard the node is ready again.
            await self._listener.delivered(timeout=self.heartbeat)
            self._lease.release_hold()
        if decision.suspend is not None:
            self._paused = False
            await self._hooks.suspend(decision.suspend)
            self._suspended = True
            # Nothing is left to start; the settle that follows finds the permit the
            # renewals earn.
            self._lease.release_hold()
        if decision.settle is not None:
            if self._rebuild_above is not None:
                log.info(
                    "node %s recovers from the medium's data loss: settling on epoch %d",
                    self.node,
                    decision.settle.epoch,
                )
                self._rebuild_above = None
            await self._hooks.settle(decision.settle)
            self._suspended = False
            self._settled_epoch = decision.settle.epoch
            if decision.move_after_settle is not None:
                self._move(decision.move_after_settle)
            self._ready.set()

    def _move(self, to: State) -> None:
        previous = self._machine.move(to)
        log.debug("node %s: %s -> %s (epoch %d)", self.node, previous, to, self.epoch)
        self._listener.state_changed(previous, to, self.info)
