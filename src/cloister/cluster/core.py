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
and the heartbeat only feed it facts and wake it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from enum import StrEnum
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from cloister import wire
from cloister._tasks import Supervisor, wait_event
from cloister.backends import Backend, KeyValue, KVEvent, KVOp, check_url, open_backend
from cloister.cluster.info import ClusterInfo
from cloister.cluster.listener import ListenerDispatcher
from cloister.cluster.membership import MemberRecord
from cloister.cluster.placement import DEFAULT_PARTITIONS, Placed, Placement
from cloister.cluster.rpc import CallResult, Handler, Handlers, decode_reply, encode_request, failed
from cloister.cluster.states import State, StateMachine
from cloister.cluster.topology import EpochRecord, Topology
from cloister.errors import (
    BackendError,
    BackendUnavailableError,
    CloisterError,
    ClusterNotReadyError,
    ConfigurationError,
    KeyExistsError,
    NodeNameTakenError,
    NotRunningError,
    RevisionMismatchError,
    WireFormatError,
)
from cloister.ring import HashRing

if TYPE_CHECKING:
    from cloister.store import Table

log = logging.getLogger("cloister.cluster")


async def _within(seconds: float, renewal: Callable[[], Awaitable[None]]) -> None:
    """Run ``renewal()``; give it up after ``seconds`` as the medium being unavailable.

    Takes the function, not a coroutine: one cancelled before it started then leaves no
    coroutine behind that was never awaited.
    """
    try:
        async with asyncio.timeout(seconds):
            await renewal()
    except TimeoutError:
        raise BackendUnavailableError(
            f"renewal unanswered for {seconds:.2f}s; sending it again"
        ) from None


NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_=.-]{0,127}$")
CLUSTER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_EPOCH_KEY = "epoch"
_SENTRY_KEY = "sentry"
_MULTICAST_TOPIC = "multicast"


class SuspendReason(StrEnum):
    """Why a node stops processing (``TopologyHook.suspend``)."""

    LEASE_LOST = "lease lost"
    SHORT_OF_CONSENSUS = "short of consensus"
    STOPPING = "stopping"


class TopologyHook(Protocol):
    """How a component (the DynamicManager) follows ownership. Internal contract.

    ``release`` runs before the node acknowledges a new epoch: stop what is no longer
    yours. ``settle`` runs once every member acknowledged (the node becomes ready): start
    what is yours. ``suspend`` runs when the node must stop everything. A node that dies
    calls no hook: its components' tasks die with it (see :attr:`Cluster.supervisor`).
    """

    async def release(self, topology: Topology) -> None: ...

    async def settle(self, topology: Topology) -> None: ...

    async def suspend(self, reason: SuspendReason) -> None: ...


def _default_node_name() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40].strip("-") or "node"
    return f"{host}-{secrets.token_hex(3)}"


class Cluster:
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
        request_timeout: default timeout of ``multicall``.
        backend_options: passed to the backend (NATS credentials, TLS, ...).
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
        backend_options: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(name, str) or not CLUSTER_NAME.match(name):
            raise ConfigurationError(
                f"invalid cluster name {name!r}: use 1-64 characters of [A-Za-z0-9_-]"
            )
        node = _default_node_name() if node is None else node
        for what, value in [("node name", node), *(("group", g) for g in groups)]:
            if not isinstance(value, str) or not NAME.match(value):
                raise ConfigurationError(
                    f"invalid {what} {value!r}: use 1-128 characters of [A-Za-z0-9_=.-], "
                    "starting with a letter, digit or underscore"
                )
        if isinstance(consensus, bool) or not isinstance(consensus, int) or consensus < 1:
            raise ConfigurationError(
                f"consensus must be a whole number >= 1 (members needed before ready), "
                f"got {consensus!r}"
            )
        if not heartbeat > 0:
            raise ConfigurationError(f"heartbeat must be > 0 seconds, got {heartbeat!r}")
        failure_timeout = 3 * heartbeat if failure_timeout is None else failure_timeout
        if not failure_timeout >= 2 * heartbeat:
            raise ConfigurationError(
                f"failure_timeout ({failure_timeout!r}s) must be at least 2 heartbeats "
                f"({2 * heartbeat:g}s), or live nodes would be declared dead"
            )
        if not (isinstance(weight, int | float) and weight > 0):
            raise ConfigurationError(f"weight must be a positive number, got {weight!r}")
        check_url(backend)
        HashRing({node: weight})  # the ring's own validation of the name and weight
        self.name = name
        self.node = node
        self.backend_url = backend
        self.consensus = consensus
        self.groups = tuple(dict.fromkeys(groups))
        self.weight = float(weight)
        self.heartbeat = float(heartbeat)
        self.failure_timeout = float(failure_timeout)
        self.expected = frozenset(expected)
        self.request_timeout = request_timeout
        self.started_at = 0.0
        self._backend_options = dict(backend_options or {})
        self._listener = ListenerDispatcher(listener)
        self._machine = StateMachine()
        self._handlers = Handlers(node)
        self._handlers.register("cloister.info", self._info_handler, builtin=True)
        self._handlers.register("cloister.ping", lambda _payload: "pong", builtin=True)
        self._hooks: list[TopologyHook] = []
        self._supervisor = Supervisor(f"cluster {name}/{node}")
        self._backend: Backend | None = None
        self._members_kv: KeyValue | None = None
        self._control_kv: KeyValue | None = None
        # Facts fed by the watches and the heartbeat; decisions are taken in _step().
        self._view: dict[str, MemberRecord] = {}
        self._view_changed_at = 0.0
        self._epoch_record: EpochRecord | None = None
        self._epoch_revision: int | None = None
        self._sentry_holder: str | None = None
        self._record: MemberRecord | None = None
        self._record_revision: int | None = None
        self._record_lock = asyncio.Lock()
        self._lease_until = 0.0
        self._sentry_revision: int | None = None
        self._sentry_until = 0.0
        # What this node has adopted.
        self._topology: Topology | None = None
        self._ring: HashRing | None = None
        # The placement of keys that name no manager, rebuilt on every adopted epoch.
        self._placement = Placement(HashRing(()), DEFAULT_PARTITIONS, node)
        self._suspended = True
        self._settled_epoch = 0
        self._wake = asyncio.Event()
        self._resync = asyncio.Event()
        self._ready = asyncio.Event()
        self._crashed = False
        self.counters: dict[str, int] = {
            "epochs_adopted": 0,
            "bad_records": 0,
            "fenced": 0,
            "heartbeat_failures": 0,
        }

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
        self._listener.start()
        try:
            await backend.connect()
            backend.on_reconnect(self._on_reconnect)
            backend.on_closed(self._on_closed)
            self._members_kv = await backend.kv("members", ttl_keys=True)
            self._control_kv = await backend.kv("control", ttl_keys=True)
            self._move(State.ASSEMBLING)
            previous = await self._check_name_free()
            synced = asyncio.Event(), asyncio.Event()
            self._supervisor.spawn(self._follow_members(synced[0]), "members watch")
            self._supervisor.spawn(self._follow_control(synced[1]), "control watch")
            await asyncio.gather(synced[0].wait(), synced[1].wait())
            await self._join(previous)
            await backend.serve(self._handlers.answer)
            await backend.subscribe(_MULTICAST_TOPIC, self._on_multicast)
            self._supervisor.spawn(self._heartbeat_loop(), "heartbeat")
            self._supervisor.spawn(self._resync_loop(), "resync")
            self._supervisor.spawn(self._control_loop(), "control")
        except BaseException:
            await self._teardown()
            raise
        log.info("node %s joined cluster %s via %s", self.node, self.name, backend.url)

    async def stop(self) -> None:
        """Leave gracefully: stop owned work, hand the sentry lease over, leave at once."""
        if self._machine.state in (State.DOWN, State.STOPPING, State.STOPPED):
            return
        self._move(State.STOPPING)
        self._ready.clear()
        await self._supervisor.close()  # no more decisions: the control loop is gone
        if not self._crashed:
            await self._run_hooks("suspend", SuspendReason.STOPPING)
            await self._leave()
        await self._teardown()
        self._move(State.STOPPED)
        await self._listener.close()

    async def _leave(self) -> None:
        assert self._members_kv is not None and self._control_kv is not None
        try:
            if self._sentry_revision is not None:
                await self._delete_if_ours(self._control_kv, _SENTRY_KEY, self._sentry_revision)
            await self._delete_if_ours(self._members_kv, self.node, self._record_revision)
        except BackendError as exc:
            log.warning(
                "node %s could not leave cleanly (%s); it will expire instead", self.node, exc
            )

    async def _delete_if_ours(self, kv: KeyValue, key: str, revision: int | None) -> None:
        """Delete our key. A renewal cancelled in flight may have moved its revision on:
        then delete it at its current revision, if it still holds our incarnation."""
        try:
            await kv.delete(key, revision=revision)
            return
        except RevisionMismatchError:
            current = await kv.get(key)
        if current is None:
            return
        try:
            holder = wire.decode_map(current.value, "record")
        except WireFormatError:
            return
        ours = (
            holder.get("inc") == self._record.incarnation
            if key == self.node and self._record is not None
            else holder.get("node") == self.node
        )
        if ours:
            await kv.delete(key, revision=current.revision)

    async def _teardown(self) -> None:
        await self._supervisor.close()
        if self._backend is not None:
            await self._backend.close()
        self._ready.clear()
        if self._machine.state is State.DOWN:
            await self._listener.close()

    def _on_closed(self) -> None:
        """The connection is gone for good: this node is dead. Stop everything now (the
        components' tasks too), say goodbye to nobody; its records expire on their TTL."""
        log.error(
            "node %s lost its connection to %s for good; it stops at once",
            self.node,
            self.backend_url,
        )
        self._crashed = True
        self._ready.clear()
        self._supervisor.kill()

    def _on_reconnect(self) -> None:
        self._resync.set()
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
        return frozenset(self._view)

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
            and self._sentry_revision is not None
            and time.monotonic() < self._sentry_until
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

    def handle(self, name: str) -> Callable[[Handler], Handler]:
        """Register a handler callable by ``multicall``/``multicast``: ``@cluster.handle("x")``."""

        def register(fn: Handler) -> Handler:
            self.register_handler(name, fn)
            return fn

        return register

    def register_handler(self, name: str, fn: Handler, *, internal: bool = False) -> None:
        """Register ``fn`` as the handler ``name`` on this node.

        Names starting ``cloister.`` are reserved for the library's own components, which
        pass ``internal=True``; :class:`ConfigurationError` for a name taken already.
        """
        self._handlers.register(name, fn, builtin=internal)

    async def call(
        self, node: str, handler: str, payload: Any = None, *, timeout: float | None = None
    ) -> Any:
        """Invoke ``handler`` on one ``node`` and return its result (raises its error)."""
        return (await self._call_one(node, handler, payload, timeout)).unwrap()

    async def multicall(
        self,
        handler: str,
        payload: Any = None,
        *,
        nodes: Iterable[str] | None = None,
        timeout: float | None = None,
    ) -> dict[str, CallResult]:
        """Invoke ``handler`` on every member (or ``nodes``); one result per node.

        Errors (unknown handler, handler failure, timeout, dead node) are per-node results;
        this method itself only raises when the cluster is not running.
        """
        targets = list(self.siblings() if nodes is None else nodes)
        results = await asyncio.gather(
            *(self._call_one(node, handler, payload, timeout) for node in targets)
        )
        return {result.node: result for result in results}

    async def multicast(
        self, handler: str, payload: Any = None, *, nodes: Iterable[str] | None = None
    ) -> None:
        """Invoke ``handler`` on every member (or ``nodes``) without waiting for results."""
        backend = self._require_backend()
        message = {
            "h": handler,
            "p": payload,
            "f": self.node,
            "to": None if nodes is None else list(nodes),
        }
        await backend.publish(_MULTICAST_TOPIC, wire.encode(message))

    async def states(
        self, *, timeout: float | None = None
    ) -> dict[str, ClusterInfo | CloisterError]:
        """Every member's :class:`ClusterInfo` (or the error that member produced)."""
        results = await self.multicall("cloister.info", timeout=timeout)
        states: dict[str, ClusterInfo | CloisterError] = {}
        for node, result in results.items():
            if result.error is not None:
                states[node] = result.error
                continue
            try:
                states[node] = ClusterInfo.from_wire(result.value)
            except WireFormatError as exc:
                states[node] = exc
        return states

    def add_hook(self, hook: TopologyHook) -> None:
        """Follow ownership changes (used by :class:`~cloister.manager.DynamicManager`)."""
        self._hooks.append(hook)
        self._wake.set()

    def remove_hook(self, hook: TopologyHook) -> None:
        """Stop following ownership changes."""
        if hook in self._hooks:
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
        from cloister.store import open_table  # the layer above: imported on use

        return await open_table(self.backend, name, replicas=replicas)

    @property
    def crashed(self) -> bool:
        """True once this node died: its connection to the medium closed for good."""
        return self._crashed

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

    # -- internals: requests ----------------------------------------------------------------

    async def _call_one(
        self, node: str, handler: str, payload: Any, timeout: float | None
    ) -> CallResult:
        backend = self._require_backend()
        timeout = self.request_timeout if timeout is None else timeout
        if node == self.node:
            try:
                async with asyncio.timeout(timeout):
                    return CallResult(node, value=await self._handlers.invoke(handler, payload))
            except TimeoutError:
                return failed(node, ClusterNotReadyError(f"local handler {handler!r} timed out"))
            except Exception as exc:
                return failed(node, exc)
        try:
            reply = await backend.request(
                node, encode_request(handler, payload, self.node), timeout=timeout
            )
        except Exception as exc:
            return failed(node, exc)
        return decode_reply(node, reply)

    async def _on_multicast(self, data: bytes) -> None:
        try:
            message = wire.decode_map(data, "multicast", ("h",))
            name = wire.field(message, "h", str, "multicast")
        except WireFormatError as exc:
            self._handlers.errors += 1
            log.warning("node %s rejected a malformed multicast: %s", self.node, exc)
            return
        targets = message.get("to")
        if targets is not None and self.node not in targets:
            return
        try:
            await self._handlers.invoke(name, message.get("p"))
        except Exception:
            self._handlers.errors += 1
            log.exception("multicast handler %r failed on node %s", name, self.node)

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

    async def _check_name_free(self) -> int | None:
        """Refuse a name a live member uses; return the revision of a dead one's record."""
        assert self._members_kv is not None and self._backend is not None
        existing = await self._members_kv.get(self.node)
        if existing is None:
            return None
        try:
            await self._backend.request(
                self.node,
                encode_request("cloister.ping", None, self.node),
                timeout=min(1.0, self.heartbeat),
            )
        except BackendError:
            raise
        except CloisterError:
            log.info("node %s takes over the record of its crashed predecessor", self.node)
            return existing.revision
        raise NodeNameTakenError(
            f"node name {self.node!r} is already used by a live member of cluster {self.name!r}; "
            "choose another name (or omit it to get a generated one)"
        )

    async def _join(self, previous_revision: int | None) -> None:
        assert self._members_kv is not None
        record = MemberRecord(
            node=self.node,
            incarnation=secrets.randbits(62),
            weight=self.weight,
            groups=self.groups,
            started_at=self.started_at,
            state=str(self.state),
        )
        sent = time.monotonic()
        if previous_revision is None:
            revision = await self._members_kv.create(
                self.node, record.encode(), ttl=self.failure_timeout
            )
        else:
            revision = await self._members_kv.update(
                self.node, record.encode(), revision=previous_revision, ttl=self.failure_timeout
            )
        self._record, self._record_revision = record, revision
        self._lease_until = sent + self._fence_after
        self._note_member(record)

    @property
    def _fence_after(self) -> float:
        # Others expire us failure_timeout after the medium *received* our last renewal; we
        # count from when we *sent* it and stop one heartbeat earlier than that.
        return self.failure_timeout - self.heartbeat

    async def _write_record(self, **changes: Any) -> None:
        """Renew (and optionally change) our member record; refreshes the lease."""
        assert self._members_kv is not None
        async with self._record_lock:
            assert self._record is not None
            record = self._record.with_(state=str(self.state), **changes)
            sent = time.monotonic()
            try:
                if self._record_revision is None:
                    raise RevisionMismatchError("no record")
                revision = await self._members_kv.update(
                    self.node,
                    record.encode(),
                    revision=self._record_revision,
                    ttl=self.failure_timeout,
                )
            except RevisionMismatchError:
                revision = await self._rejoin(record)
            self._record, self._record_revision = record, revision
            self._lease_until = sent + self._fence_after

    async def _rejoin(self, record: MemberRecord) -> int:
        """Our record vanished (we were expired) or was taken over by another process."""
        assert self._members_kv is not None
        current = await self._members_kv.get(self.node)
        if current is not None:
            try:
                other = MemberRecord.decode(current.value)
            except WireFormatError:
                other = None
            if other is not None and other.incarnation != record.incarnation:
                raise NodeNameTakenError(
                    f"another process took over node name {self.node!r}; "
                    "this one stops claiming keys"
                )
            return await self._members_kv.update(
                self.node, record.encode(), revision=current.revision, ttl=self.failure_timeout
            )
        log.warning("node %s lost its membership (expired); rejoining", self.node)
        return await self._members_kv.create(self.node, record.encode(), ttl=self.failure_timeout)

    async def _heartbeat_loop(self) -> None:
        # A renewal stuck on a medium that lost its leader is given up after this long and
        # sent again, so that one reaches the new leader soon after it takes over: records
        # it does not hear of within their TTL from then on expire (measured on R3 NATS).
        patience = self.failure_timeout / 2 - self.heartbeat / 4
        while True:
            # Membership and sentry lease live in different streams, which fail over
            # separately: one renewal never waits for the other.
            renewals = [_within(patience, self._write_record)]
            if self._sentry_revision is not None:
                renewals.append(_within(patience, self._renew_sentry))
            delay = self.heartbeat
            for outcome in await asyncio.gather(*renewals, return_exceptions=True):
                if isinstance(outcome, NodeNameTakenError):
                    log.error("%s", outcome)
                    self._lease_until = 0.0
                elif isinstance(outcome, BackendError):
                    self.counters["heartbeat_failures"] += 1
                    log.warning("node %s failed to renew its lease: %s", self.node, outcome)
                    delay = self.heartbeat / 4
                elif isinstance(outcome, BaseException):
                    raise outcome  # a bug of ours: the supervisor reports it
            if time.monotonic() >= self._lease_until:
                self._wake.set()
            await asyncio.sleep(delay)

    async def _renew_sentry(self) -> None:
        """Renew the sentry lease (compare-and-set on the revision we hold)."""
        assert self._control_kv is not None and self._sentry_revision is not None
        sent = time.monotonic()
        try:
            self._sentry_revision = await self._control_kv.update(
                _SENTRY_KEY,
                wire.encode({"node": self.node}),
                revision=self._sentry_revision,
                ttl=self.failure_timeout,
            )
            self._sentry_until = sent + self._fence_after
        except RevisionMismatchError:
            current = await self._control_kv.get(_SENTRY_KEY, consistent=True)
            if current is not None and current.value == wire.encode({"node": self.node}):
                # A renewal we gave up on landed after all: the lease is still ours.
                self._sentry_revision = await self._control_kv.update(
                    _SENTRY_KEY, current.value, revision=current.revision, ttl=self.failure_timeout
                )
                self._sentry_until = sent + self._fence_after
                return
            log.warning("node %s lost the sentry lease", self.node)
            self._sentry_revision = None
            self._sentry_until = 0.0
            self._wake.set()

    async def _follow_members(self, synced: asyncio.Event) -> None:
        assert self._members_kv is not None
        while True:
            try:
                async with self._members_kv.watch() as events:
                    await self._reload_members()
                    synced.set()
                    async for event in events:
                        self._apply_member_event(event)
            except BackendError as exc:
                log.debug("members watch of %s interrupted: %s", self.node, exc)
                await asyncio.sleep(self.heartbeat / 4)

    async def _reload_members(self) -> None:
        assert self._members_kv is not None
        entries = await self._members_kv.entries()
        view: dict[str, MemberRecord] = {}
        for name, entry in entries.items():
            record = self._decode_member(entry.value)
            if record is not None:
                view[name] = record
        if {n: r.spec for n, r in view.items()} != {n: r.spec for n, r in self._view.items()}:
            self._view_changed_at = time.monotonic()
        self._view = view
        self._wake.set()

    def _apply_member_event(self, event: KVEvent) -> None:
        if event.op is KVOp.PUT and event.value is not None:
            record = self._decode_member(event.value)
            if record is not None:
                self._note_member(record)
        elif self._view.pop(event.key, None) is not None:
            self._view_changed_at = time.monotonic()
            self._wake.set()

    def _note_member(self, record: MemberRecord) -> None:
        old = self._view.get(record.node)
        self._view[record.node] = record
        if old is None or old.spec != record.spec:
            self._view_changed_at = time.monotonic()
        self._wake.set()

    def _decode_member(self, data: bytes) -> MemberRecord | None:
        try:
            return MemberRecord.decode(data)
        except WireFormatError as exc:
            self.counters["bad_records"] += 1
            log.warning("ignoring a malformed member record: %s", exc)
            return None

    async def _follow_control(self, synced: asyncio.Event) -> None:
        assert self._control_kv is not None
        while True:
            try:
                async with self._control_kv.watch() as events:
                    await self._reload_control()
                    synced.set()
                    async for event in events:
                        self._apply_control_event(event)
            except BackendError as exc:
                log.debug("control watch of %s interrupted: %s", self.node, exc)
                await asyncio.sleep(self.heartbeat / 4)

    async def _reload_control(self) -> None:
        assert self._control_kv is not None
        entries = await self._control_kv.entries()
        sentry = entries.get(_SENTRY_KEY)
        self._apply_control_event(
            KVEvent(KVOp.DELETE, _SENTRY_KEY, None, 0)
            if sentry is None
            else KVEvent(KVOp.PUT, _SENTRY_KEY, sentry.value, sentry.revision)
        )
        epoch = entries.get(_EPOCH_KEY)
        if epoch is not None:
            self._apply_control_event(KVEvent(KVOp.PUT, _EPOCH_KEY, epoch.value, epoch.revision))

    def _apply_control_event(self, event: KVEvent) -> None:
        if event.key == _SENTRY_KEY:
            holder = None
            if event.op is KVOp.PUT and event.value is not None:
                try:
                    holder = wire.field(
                        wire.decode_map(event.value, "sentry lease"), "node", str, "sentry lease"
                    )
                except WireFormatError as exc:
                    self.counters["bad_records"] += 1
                    log.warning("malformed sentry lease: %s", exc)
                    holder = "?"
            self._sentry_holder = holder
        elif event.key == _EPOCH_KEY and event.op is KVOp.PUT and event.value is not None:
            try:
                record = EpochRecord.decode(event.value)
            except WireFormatError as exc:
                self.counters["bad_records"] += 1
                log.warning("malformed epoch record: %s", exc)
                return
            if self._epoch_record is None or record.epoch >= self._epoch_record.epoch:
                self._epoch_record, self._epoch_revision = record, event.revision
        self._wake.set()

    async def _resync_loop(self) -> None:
        """Never trust the watches alone: re-list periodically and after a reconnect."""
        interval = max(5 * self.heartbeat, 1.0)
        while True:
            await wait_event(self._resync, interval)
            self._resync.clear()
            try:
                await self._reload_members()
                await self._reload_control()
            except BackendError as exc:
                log.debug("resync of %s failed: %s", self.node, exc)

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

    async def _step(self, settle: float) -> float:
        """Take every decision the current facts call for; return when to look again."""
        now = time.monotonic()
        delay = self.heartbeat
        lease_ok = now < self._lease_until
        if not lease_ok and not self._suspended:
            self.counters["fenced"] += 1
            log.warning(
                "node %s cannot renew its membership: fencing (stops claiming keys)", self.node
            )
        if lease_ok:
            await self._maybe_claim_sentry(now)
            if self._sentry_revision is not None and now < self._sentry_until:
                quiet = now - self._view_changed_at
                if quiet < settle:
                    delay = settle - quiet
                else:
                    await self._maybe_publish_epoch()
        record = self._epoch_record
        if record is not None and (self._topology is None or record.epoch > self._topology.epoch):
            await self._adopt(record)
        if (
            self._record is not None
            and self._topology is not None
            and self._record.acked != self._topology.epoch
        ):
            await self._write_record(acked=self._topology.epoch)
        await self._update_state(lease_ok)
        return delay

    async def _maybe_claim_sentry(self, now: float) -> None:
        assert self._control_kv is not None
        if self._sentry_holder is not None or self._sentry_revision is not None:
            return
        try:
            revision = await self._control_kv.create(
                _SENTRY_KEY, wire.encode({"node": self.node}), ttl=self.failure_timeout
            )
        except KeyExistsError:
            return
        self._sentry_revision = revision
        self._sentry_until = now + self._fence_after
        self._sentry_holder = self.node
        self._view_changed_at = 0.0  # publish at once: the new sentry must name itself
        log.info("node %s won the sentry lease", self.node)

    async def _maybe_publish_epoch(self) -> None:
        assert self._control_kv is not None
        members = {name: record.spec for name, record in self._view.items()}
        current = self._epoch_record
        if current is not None and current.sentry == self.node and dict(current.members) == members:
            return
        if self.node not in members:
            return  # our own record is not visible yet; never publish a topology without us
        record = EpochRecord(
            epoch=(current.epoch if current else 0) + 1, sentry=self.node, members=members
        )
        try:
            if self._epoch_revision is None:
                revision = await self._control_kv.create(_EPOCH_KEY, record.encode())
            else:
                revision = await self._control_kv.update(
                    _EPOCH_KEY, record.encode(), revision=self._epoch_revision
                )
        except (RevisionMismatchError, KeyExistsError):
            await self._reload_control()  # somebody wrote in between; look again
            self._wake.set()
            return
        if self._epoch_record is None or record.epoch > self._epoch_record.epoch:
            self._epoch_record, self._epoch_revision = record, revision

    async def _adopt(self, record: EpochRecord) -> None:
        previous = self._topology
        topology = Topology.from_record(record)
        self._topology, self._ring = topology, topology.ring
        self._placement = topology.placement(self.node)
        self.counters["epochs_adopted"] += 1
        if self.state is State.READY:
            self._move(State.REHASHING)
        self._ready.clear()
        if previous is None or previous.sentry != topology.sentry:
            self._listener.sentry_changed(
                None if previous is None else previous.sentry, topology.sentry, self.info
            )
        self._log_topology(previous, topology)
        await self._run_hooks("release", topology)

    def _log_topology(self, previous: Topology | None, topology: Topology) -> None:
        before = set() if previous is None else set(previous.members)
        after = set(topology.members)
        log.info(
            "node %s adopted epoch %d: %d member(s)%s%s, sentry %s",
            self.node,
            topology.epoch,
            len(after),
            "".join(f" +{n}" for n in sorted(after - before)),
            "".join(f" -{n}" for n in sorted(before - after)),
            topology.sentry,
        )

    def _quorum(self, topology: Topology | None) -> bool:
        return (
            topology is not None
            and self.node in topology.members
            and len(topology.members) >= self.consensus
            and self.expected <= topology.members.keys()
        )

    def _acknowledged(self, topology: Topology) -> bool:
        view = self._view
        return all(
            (record := view.get(name)) is not None
            and record.acked == topology.epoch
            and record.incarnation == spec.incarnation
            for name, spec in topology.members.items()
        )

    async def _update_state(self, lease_ok: bool) -> None:
        topology = self._topology
        quorum = lease_ok and self._quorum(topology)
        if not quorum:
            if not self._suspended:
                reason = (
                    SuspendReason.LEASE_LOST if not lease_ok else SuspendReason.SHORT_OF_CONSENSUS
                )
                await self._run_hooks("suspend", reason)
                self._suspended = True
            if self.state is State.READY:
                self._move(State.REHASHING)
                self._ready.clear()
            return
        assert topology is not None
        if self.state is State.ASSEMBLING:
            self._move(State.REHASHING)
        if self._acknowledged(topology) and (self.state is not State.READY or self._suspended):
            await self._run_hooks("settle", topology)
            self._suspended = False
            self._settled_epoch = topology.epoch
            if self.state is State.REHASHING:
                self._move(State.READY)
            self._ready.set()

    async def _run_hooks(self, method: str, argument: Any) -> None:
        for hook in list(self._hooks):
            try:
                await getattr(hook, method)(argument)
            except Exception:
                log.exception(
                    "topology hook %s.%s failed on node %s", type(hook).__name__, method, self.node
                )

    def _move(self, to: State) -> None:
        previous = self._machine.move(to)
        log.debug("node %s: %s -> %s (epoch %d)", self.node, previous, to, self.epoch)
        self._listener.state_changed(previous, to, self.info)
