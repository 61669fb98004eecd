"""``DynamicManager``: many keyed workers, one process or a whole cluster.

Subclass it, implement ``children_specs()`` and the callbacks you need, and start it::

    class Processor(DynamicManager):
        def children_specs(self):
            return {f"foo_{i}": {"timeout": 1.0} for i in range(1_000)}

        async def perform(self, id, payload):
            return Ok(None)

    manager = await Processor.start()          # standalone
    manager = await Processor.start(cluster)   # distributed: only owned ids run here

How it runs: one dispatcher task per manager pops due workers from a timer wheel and runs
their callbacks eagerly (see :mod:`.worker`); a worker runs one callback at a time, and
messages wait in its mailbox, in order. In a cluster the manager follows ownership through
the cluster's topology hooks: ids that moved away are stopped (``terminate("handoff")``)
and their state handed to the new owner *before* this node acknowledges the epoch; ids
that moved here start only once every member acknowledged it — never on two nodes at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Self

from cloister import wire
from cloister._tasks import Supervisor
from cloister.backends import LogConsumer
from cloister.cluster.core import SuspendReason
from cloister.cluster.placement import Placement
from cloister.cluster.states import State
from cloister.errors import (
    CloisterError,
    ConfigurationError,
    NoSuchNodeError,
    NotOwnerError,
    NotRunningError,
    RemoteError,
    RequestTimeoutError,
)
from cloister.manager.consumer import PartitionConsumers
from cloister.manager.responses import Halt, Ok, Replace, Timeout, reply_of
from cloister.manager.scheduler import TimerWheel
from cloister.manager.spec import Spec, check_id, make_spec
from cloister.manager.state import StateTable, Stored
from cloister.manager.worker import (
    GONE,
    PERFORM_PENDING,
    QUEUED,
    Continuation,
    Message,
    Worker,
    WorkerInfo,
    run_eagerly,
)
from cloister.ring import key_hash
from cloister.store.inbox import DeadLetter, Inbox, InboxMessage

if TYPE_CHECKING:
    from cloister.cluster import Cluster, Topology

log = logging.getLogger("cloister.manager")

ON_ERROR = ("continue", "restart", "remove")
_OPTIONS = (
    "name",
    "concurrency",
    "on_error",
    "pickup",
    "flush_interval",
    "durable",
    "partitions",
    "max_attempts",
    "max_in_flight",
)
PICKUP = ("random", "first_free", "hash")
_YIELD_EVERY = 10_000  # ids started between yields to the event loop


class UnknownWorkerError(CloisterError, KeyError):
    """A call or cast named an id that has no worker."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown worker"


class DynamicManager:
    """A manager of keyed workers (Tarearbol.DynamicManager in Python).

    Class attributes configure it (or pass them to :meth:`start`):

    - ``name``: distinguishes managers in one cluster (default: the class name).
    - ``concurrency``: at most this many callbacks suspended at once.
    - ``on_error``: what a raising callback does to its worker — ``"continue"``,
      ``"restart"`` (from its spec, with backoff) or ``"remove"``.
    - ``pickup``: how pool mode (``call(None, msg)``) picks a worker — ``"random"``,
      ``"first_free"`` or ``"hash"`` (of the message).
    - ``flush_interval``: seconds between write-behind flushes of replaced payloads.
    - ``durable``: in a cluster, casts go through the durable inbox (default True).
    - ``partitions``: inbox partitions; workers are placed on nodes by partition.
    - ``max_attempts``: tries of a failing inbox message before it is parked.
    - ``max_in_flight``: inbox messages delivered and not yet handled, per node.
    """

    name: ClassVar[str | None] = None
    concurrency: ClassVar[int] = 10_000
    on_error: ClassVar[str] = "continue"
    pickup: ClassVar[str] = "random"
    flush_interval: ClassVar[float] = 0.25
    restart_backoff: ClassVar[tuple[float, float]] = (0.05, 5.0)
    durable: ClassVar[bool] = True
    partitions: ClassVar[int] = 128
    max_attempts: ClassVar[int] = 5
    retry_backoff: ClassVar[tuple[float, float]] = (0.05, 2.0)
    max_in_flight: ClassVar[int] = 4096

    # -- callbacks to override ---------------------------------------------------------------

    def children_specs(self) -> Mapping[Any, Any]:
        """The workers to start: id -> spec (``payload``, ``timeout``, ``lull``,
        ``instant_perform``; ``{}`` or None for defaults)."""
        return {}

    def init(self, id: Any, payload: Any) -> Any:
        """Build a worker's payload lazily when it starts (default: the spec's payload)."""
        return payload

    def perform(self, id: Any, payload: Any) -> Any:
        """The periodic work of one worker. Return a response (see :mod:`.responses`)."""
        return Ok(None)

    def handle_call(self, message: Any, id: Any, payload: Any) -> Any:
        """Answer ``manager.call(id, message)``; the response's result is the reply."""
        return Ok(None)

    def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        """Handle ``manager.cast(id, message)``."""
        return Ok(None)

    def terminate(self, reason: str, id: Any, payload: Any) -> Any:
        """Called when a worker stops: ``shutdown``, ``handoff``, ``halt``, ``delete``,
        ``restart``, ``error``, ``rekey``, ``suspend`` (the node lost its lease or quorum)."""
        return None

    def handle_state_change(self, state: str) -> Any:
        """Called with ``starting``, ``up``, ``rehashing`` and ``down``."""
        return None

    def handle_timeout(self, info: WorkerInfo) -> Any:
        """A perform has run longer than ``lull x timeout`` (it is not cancelled)."""
        return None

    # -- lifecycle ------------------------------------------------------------------------------

    def __init__(self, cluster: Cluster | None = None, **options: Any) -> None:
        for option, value in options.items():
            if option not in _OPTIONS:
                raise ConfigurationError(f"unknown manager option {option!r}")
            setattr(self, option, value)
        if self.on_error not in ON_ERROR:
            raise ConfigurationError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        if self.pickup not in PICKUP:
            raise ConfigurationError(f"pickup must be one of {PICKUP}, got {self.pickup!r}")
        if not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise ConfigurationError(f"concurrency must be an int >= 1, got {self.concurrency!r}")
        self.manager_name = self.name or type(self).__name__
        self.cluster = cluster
        self.state = "down"
        # Every id this node may ever run (cluster mode only; standalone, _workers is all).
        self._specs: dict[Any, Spec] = {}
        # Live workers. An idle worker that still has its spec's payload is stored as its
        # (shared) Spec — a dict entry and nothing else; it becomes a Worker once it has
        # something to do or to remember.
        self._workers: dict[Any, Worker | Spec] = {}
        self._timers = TimerWheel()
        self._runnable: deque[Worker] = deque()
        self._in_flight = 0
        self._wake = asyncio.Event()
        # On a node, the manager's tasks die with the node (see Cluster.supervisor).
        self._supervisor = (
            Supervisor(f"manager {self.manager_name}")
            if cluster is None
            else cluster.supervisor.child(f"manager {self.manager_name}")
        )
        self._running_tasks: dict[Worker, asyncio.Task[Any]] = {}
        self._continuations: dict[Worker, Continuation] = {}
        self._paused = cluster is not None  # a cluster must say what is ours first
        self._leaving = False  # everything was handed over: refuse new messages
        # release/settle/suspend/handover run one at a time, whoever calls them (the
        # cluster's hooks, start(), stop()): they move the same workers and partitions.
        self._topology_lock = asyncio.Lock()
        self._parked: dict[Any, list[Message]] = {}  # messages for ids about to start here
        # id -> (payload, casts, watermark) handed over by the previous owner
        self._handed: dict[Any, tuple[Any, list[Any], int]] = {}
        self._table: StateTable | None = None
        self._inbox: Inbox | None = None
        self._consumers: PartitionConsumers | None = None
        self._has_init = type(self).init is not DynamicManager.init
        self._has_terminate = type(self).terminate is not DynamicManager.terminate
        self.counters: dict[str, int] = {
            "performs": 0,
            "calls": 0,
            "casts": 0,
            "errors": 0,
            "timeouts": 0,
            "handed_off": 0,
            "taken_over": 0,
            "duplicates": 0,
            "retries": 0,
            "dead_letters": 0,
        }

    @classmethod
    async def start(cls, cluster: Cluster | None = None, **options: Any) -> Self:
        """Create the manager, start its workers (the owned ones, given a cluster)."""
        manager = cls(cluster, **options)
        try:
            await manager._start()
        except BaseException:  # bad specs: leave no dispatcher (or hook) behind
            if cluster is not None:
                cluster.remove_hook(manager)
            await manager._supervisor.close()
            await manager._set_state("down")
            raise
        return manager

    async def _start(self) -> None:
        await self._set_state("starting")
        specs = self.children_specs()
        if not isinstance(specs, Mapping):
            raise ConfigurationError(
                f"children_specs() must return a mapping id -> spec, got {type(specs).__name__}"
            )
        self._supervisor.spawn(self._dispatch_loop(), "dispatcher")
        # A million ids take seconds: yield now and then, or the node's heartbeat (and
        # everything else on this loop) would wait, and a cluster node fence itself.
        if self.cluster is None:
            now = asyncio.get_running_loop().time()
            spawn_now = self._spawn_now
            for n, (worker_id, fields) in enumerate(specs.items(), 1):
                check_id(worker_id)
                spec = make_spec(worker_id, fields)
                if self._has_init:
                    await self._spawn(worker_id, spec, None, now)
                else:
                    spawn_now(worker_id, spec, spec.payload, now)
                if not n % _YIELD_EVERY:
                    await asyncio.sleep(0)
            await self._set_state("up")
            return
        add = self._specs.__setitem__
        for n, (worker_id, fields) in enumerate(specs.items(), 1):
            check_id(worker_id)
            add(worker_id, make_spec(worker_id, fields))
            if not n % _YIELD_EVERY:
                await asyncio.sleep(0)
        await self._join_cluster(self.cluster)

    async def _join_cluster(self, cluster: Cluster) -> None:
        prefix = f"cloister.manager.{self.manager_name}."
        for verb, fn in (
            ("call", self._remote_call),
            ("cast", self._remote_cast),
            ("put", self._remote_put),
            ("delete", self._remote_delete),
            ("handoff", self._remote_handoff),
        ):
            cluster.register_handler(prefix + verb, fn, internal=True)
        kv = await cluster.backend.kv(f"mgr-{self.manager_name}")
        self._table = StateTable(kv)
        await self._table.load()
        self._merge_table()
        self._supervisor.spawn(self._flush_loop(), "payload flusher")
        if self.durable:
            self._inbox = Inbox(
                cluster.backend,
                self.manager_name,
                partitions=self.partitions,
                max_in_flight=self.max_in_flight,
            )
            await self._inbox.open()
            self._consumers = PartitionConsumers(
                self._inbox,
                cluster.node,
                self._deliver_record,
                self._supervisor,
                max_in_flight=self.max_in_flight,
                before_ack=self._table.flush,
            )
        cluster.add_hook(self)
        if cluster.state is State.READY and cluster.topology is not None:
            await self.settle(cluster.topology)
        else:
            await self._set_state("rehashing")

    def _merge_table(self) -> None:
        assert self._table is not None
        for worker_id, stored in self._table.mirror.items():
            if stored.deleted:
                self._specs.pop(worker_id, None)
            elif stored.spec is not None:
                self._specs[worker_id] = make_spec(worker_id, stored.spec)

    async def stop(self) -> None:
        """Terminate every worker (``terminate("shutdown")``) and return when all are done."""
        if self.state == "down":
            return
        if self.cluster is not None:
            self.cluster.remove_hook(self)
            if not self.cluster.crashed:
                await self._hand_everything_over()
        self._paused = True
        await self._drain()
        for worker_id in list(self._workers):
            await self._remove(worker_id, "shutdown")
        if self._table is not None and self._cluster_reachable():
            try:
                await self._table.flush()
            except CloisterError as exc:
                log.warning(
                    "manager %s could not flush payloads on stop: %s", self.manager_name, exc
                )
        await self._supervisor.close()
        await self._set_state("down")

    def _cluster_reachable(self) -> bool:
        cluster = self.cluster
        return cluster is None or (
            not cluster.crashed and cluster.state not in (State.STOPPING, State.STOPPED)
        )

    async def restart(self) -> None:
        """Terminate every live worker and start it again from its spec."""
        self._paused = True
        await self._drain()
        now = asyncio.get_running_loop().time()
        for worker_id in list(self._workers):
            spec = self._spec_of(worker_id)
            await self._remove(worker_id, "restart")
            if spec is not None:
                await self._spawn(worker_id, spec, None, now)
        self._paused = self.cluster is not None and self.state != "up"
        self._wake.set()

    # -- runtime management ------------------------------------------------------------------

    def ids(self) -> list[Any]:
        """The ids of the workers live on this node."""
        return list(self._workers)

    def get(self, worker_id: Any) -> WorkerInfo | None:
        """A snapshot of a live worker, or None."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return None
        if not isinstance(worker, Worker):
            return WorkerInfo(worker_id, worker, worker.payload, None, None)
        return WorkerInfo(
            id=worker.id,
            spec=worker.spec,
            payload=worker.payload,
            last_result=worker.last,
            busy_since=worker.busy_since or None,
        )

    def __len__(self) -> int:
        return len(self._workers)

    async def put(self, worker_id: Any, **spec: Any) -> None:
        """Add a worker, or replace it (terminated, then started from the new spec)."""
        check_id(worker_id)
        fields = make_spec(worker_id, spec)
        await self._route(worker_id, "put", {"id": worker_id, "spec": fields.to_wire()}, None)

    async def put_new(self, worker_id: Any, **spec: Any) -> bool:
        """Add a worker unless the id exists; True when added."""
        check_id(worker_id)
        if self._spec_of(worker_id) is not None:
            return False
        await self.put(worker_id, **spec)
        return True

    async def delete(self, worker_id: Any) -> bool:
        """Remove a worker (``terminate("delete")``); True when it existed."""
        check_id(worker_id)
        existed = self._spec_of(worker_id) is not None
        await self._route(worker_id, "delete", {"id": worker_id}, None)
        return existed

    async def call(self, worker_id: Any, message: Any, *, timeout: float = 5.0) -> Any:
        """Ask worker ``worker_id`` (anywhere in the cluster) and wait for its reply.

        ``worker_id`` None = pool mode: a free local worker chosen by ``pickup``.
        """
        if worker_id is None:
            return await self._local_call(self._pick(message), message, timeout)
        check_id(worker_id)
        return await self._route(worker_id, "call", {"id": worker_id, "m": message}, timeout)

    async def cast(
        self, worker_id: Any, message: Any, *, msg_id: str | None = None, timeout: float = 30.0
    ) -> None:
        """Send ``message`` to worker ``worker_id`` (anywhere in the cluster).

        In a cluster it returns once the message is durably stored in the inbox (with
        ``msg_id``, a duplicate within the dedup window is dropped); standalone, once the
        worker's mailbox has it. ``worker_id`` None = pool mode (a local worker).
        """
        if worker_id is None:
            self._local_cast(self._pick(message), message)
            return
        if self._inbox is not None:  # the inbox checks the id as it places it
            await self._inbox.put(worker_id, message, msg_id=msg_id, timeout=timeout)
            return
        check_id(worker_id)
        await self._route(worker_id, "cast", {"id": worker_id, "m": message}, timeout)

    async def dead_letters(self) -> list[DeadLetter]:
        """Inbox messages parked because they could not be handled (cluster mode)."""
        return await self._require_inbox().dead_letters()

    async def replay(self, ids: list[str] | None = None) -> int:
        """Put parked messages (all, or ``ids``) back into the inbox; returns how many."""
        return await self._require_inbox().replay(ids)

    async def inbox_depth(self, *, owned: bool = False) -> int:
        """Messages stored in the inbox and not yet handled: cluster-wide, or (``owned``)
        only in the partitions this node consumes — its own backlog."""
        inbox = self._require_inbox()
        if not owned:
            return await inbox.depth()
        assert inbox.log is not None
        partitions = self._consumers.partitions if self._consumers is not None else set()
        return sum([await inbox.log.depth(partition) for partition in sorted(partitions)])

    @property
    def inbox(self) -> Inbox:
        """The manager's durable inbox (cluster mode with ``durable=True``): what sources
        and outside producers append to. :class:`NotRunningError` when there is none."""
        return self._require_inbox()

    def _require_inbox(self) -> Inbox:
        if self._inbox is None:
            raise NotRunningError(
                f"manager {self.manager_name} has no inbox: it needs a cluster and durable=True"
            )
        return self._inbox

    def owner_of(self, worker_id: Any) -> str:
        """The node that runs ``worker_id`` (this node's current view)."""
        if self.cluster is None:
            return "local"
        return self._placement_now().owner_of(worker_id)

    @classmethod
    def placement_group(cls) -> str:
        """The cluster group whose members run this manager (``cloister run`` joins it).

        When nodes of the cluster joined this group, workers are placed on its ring only,
        so a node that does not run the manager gets none of its workers. Nodes that run
        a manager should either all join its group, or none.
        """
        return f"manager.{cls.name or cls.__name__}"

    def _placement_for(self, topology: Topology) -> Placement:
        assert self.cluster is not None
        return topology.placement(
            self.cluster.node, self.partitions, self.placement_group(), strict=False
        )

    def _placement_now(self) -> Placement:
        cluster = self.cluster
        assert cluster is not None
        topology = cluster.topology
        if topology is None:
            raise NotOwnerError(f"node {cluster.node} has no topology yet")
        return self._placement_for(topology)

    # -- routing ------------------------------------------------------------------------------

    async def _route(
        self, worker_id: Any, verb: str, body: dict[str, Any], timeout: float | None
    ) -> Any:
        cluster = self.cluster
        if cluster is None:
            return await self._local(verb, body, timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else 10.0)
        delay = 0.01
        if verb in ("put", "delete") and self._table is not None:
            await self._record_spec(verb, body)
        if cluster.topology is None:
            await cluster.wait_ready(max(deadline - loop.time(), 0.0))
        while True:
            owner = self._placement_now().owner_of(worker_id)
            remaining = deadline - loop.time()
            try:
                if owner == cluster.node:
                    return await self._local(verb, body, remaining)
                result = await cluster.call(
                    owner,
                    f"cloister.manager.{self.manager_name}.{verb}",
                    body,
                    timeout=max(remaining, 0.01),
                )
                return result
            except (NotOwnerError, NoSuchNodeError) as exc:
                # The owner moved, is leaving, or is gone: our view of the ring is behind.
                # Retry with the ring we will have adopted by then, until the deadline.
                if loop.time() + delay > deadline:
                    raise RequestTimeoutError(
                        f"worker {worker_id!r}: ownership kept moving; "
                        f"no owner accepted the {verb} in time"
                    ) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.2)

    async def _record_spec(self, verb: str, body: dict[str, Any]) -> None:
        assert self._table is not None
        worker_id = body["id"]
        if verb == "put":
            await self._table.write(Stored(worker_id, body["spec"], None, False))
        else:
            await self._table.write(Stored(worker_id, None, None, False, deleted=True))

    async def _local(self, verb: str, body: dict[str, Any], timeout: float | None) -> Any:
        worker_id = body["id"]
        if verb == "call":
            return await self._local_call(worker_id, body["m"], timeout)
        if verb == "cast":
            self._local_cast(worker_id, body["m"])
            return None
        if verb == "put":
            return await self._local_put(worker_id, make_spec(worker_id, body["spec"]))
        return await self._local_delete(worker_id)

    def _check_owner(self, worker_id: Any) -> None:
        cluster = self.cluster
        if cluster is not None and (self._leaving or not self._placement_now().mine(worker_id)):
            raise NotOwnerError(
                f"node {cluster.node} does not own worker {worker_id!r} (epoch {cluster.epoch})"
            )

    async def _remote_call(self, body: Any) -> Any:
        return await self._local("call", body, None)

    async def _remote_cast(self, body: Any) -> Any:
        return await self._local("cast", body, None)

    async def _remote_put(self, body: Any) -> Any:
        return await self._local("put", body, None)

    async def _remote_delete(self, body: Any) -> Any:
        return await self._local("delete", body, None)

    async def _local_call(self, worker_id: Any, message: Any, timeout: float | None) -> Any:
        self._check_owner(worker_id)
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._deliver(worker_id, Message("call", message, reply))
        async with asyncio.timeout(timeout):
            return await reply

    def _local_cast(self, worker_id: Any, message: Any) -> None:
        self._check_owner(worker_id)
        self._deliver(worker_id, Message("cast", message))

    def _deliver(self, worker_id: Any, message: Message) -> None:
        worker = self._materialize(worker_id)
        if worker is None:
            if worker_id in self._specs and self.cluster is not None:
                # owned but not started yet (waiting for the handoff barrier): keep in order
                self._parked.setdefault(worker_id, []).append(message)
                return
            raise UnknownWorkerError(f"no worker with id {worker_id!r}; add it with put()")
        if worker.mailbox is None:
            worker.mailbox = deque()
        worker.mailbox.append(message)
        self._enqueue(worker)

    def _pick(self, message: Any) -> Any:
        """Pool mode: the id of a local worker, chosen by ``pickup``."""
        workers = self._workers
        if not workers:
            raise UnknownWorkerError("pool mode: no live worker on this node")
        if self.pickup == "hash":
            try:
                digest = key_hash(message)
            except TypeError:
                digest = key_hash(wire.encode(message))
            ids = list(workers)
            return ids[digest % len(ids)]
        free = (
            worker_id
            for worker_id, w in workers.items()
            if not isinstance(w, Worker) or (not w.busy_since and not w.mailbox)
        )
        if self.pickup == "first_free":
            chosen = next(free, None)
            if chosen is None:
                chosen = next(iter(workers))
        else:
            chosen = random.choice(list(free) or list(workers))
        return chosen

    async def _local_put(self, worker_id: Any, spec: Spec) -> None:
        self._check_owner(worker_id)
        if self.cluster is not None:
            self._specs[worker_id] = spec
        if worker_id in self._workers:
            await self._remove(worker_id, "replace")
        if not self._paused or self.cluster is None:
            await self._spawn(worker_id, spec, None, asyncio.get_running_loop().time())

    async def _local_delete(self, worker_id: Any) -> bool:
        existed = self._specs.pop(worker_id, None) is not None or worker_id in self._workers
        if worker_id in self._workers:
            await self._remove(worker_id, "delete")
        return existed

    # -- workers ------------------------------------------------------------------------------

    def _spec_of(self, worker_id: Any) -> Spec | None:
        entry = self._workers.get(worker_id)
        if entry is not None:
            return entry.spec if isinstance(entry, Worker) else entry
        return self._specs.get(worker_id)

    def _materialize(self, worker_id: Any) -> Worker | None:
        """The worker as a full :class:`Worker` (turning a bare Spec entry into one)."""
        entry = self._workers.get(worker_id)
        if entry is None or isinstance(entry, Worker):
            return entry
        worker = self._workers[worker_id] = Worker(worker_id, entry, entry.payload)
        return worker

    async def _spawn(
        self, worker_id: Any, spec: Spec, payload: Any, now: float, *, fresh: bool = True
    ) -> None:
        if payload is None:
            payload = spec.payload
        if self._has_init and fresh:
            value, rest = run_eagerly(self.init(worker_id, payload))
            payload = await rest if rest is not None else value
        self._spawn_now(worker_id, spec, payload, now)

    def _spawn_now(self, worker_id: Any, spec: Spec, payload: Any, now: float) -> None:
        parked = self._parked.pop(worker_id, None) if self._parked else None
        if payload is spec.payload and not spec.timeout and not spec.instant_perform and not parked:
            self._workers[worker_id] = spec  # idle: nothing but a dict entry
            return
        worker = Worker(worker_id, spec, payload)
        self._workers[worker_id] = worker
        if spec.instant_perform:
            worker.flags |= PERFORM_PENDING
            self._enqueue(worker)
        elif spec.timeout:
            self._timers.schedule(worker, now + spec.timeout)
            self._wake.set()  # the dispatcher may be asleep until a later due time
        if parked:
            worker.mailbox = deque(parked)
            self._enqueue(worker)

    async def _remove(self, worker_id: Any, reason: str) -> None:
        """Stop one live worker (after its running callback) and call ``terminate``."""
        entry = self._workers.pop(worker_id, None)
        if entry is None:
            return
        if not isinstance(entry, Worker):
            if self._has_terminate:
                await self._invoke_quietly(self.terminate, reason, worker_id, entry.payload)
            return
        worker: Worker = entry
        worker.flags |= GONE
        await self._wait_idle(worker)
        if worker.mailbox:
            for message in worker.mailbox:
                if message.reply is not None and not message.reply.done():
                    message.reply.set_exception(
                        UnknownWorkerError(f"worker {worker.id!r} stopped ({reason})")
                    )
            worker.mailbox = None
        if self._has_terminate:
            await self._invoke_quietly(self.terminate, reason, worker.id, worker.payload)

    async def _wait_idle(self, worker: Worker) -> None:
        task = self._running_tasks.get(worker)
        if task is not None:
            await asyncio.wait([task])

    async def _invoke_quietly(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            value, rest = run_eagerly(fn(*args))
            return await rest if rest is not None else value
        except Exception:
            self.counters["errors"] += 1
            log.exception(
                "%s.%s%r raised", self.manager_name, getattr(fn, "__name__", fn), args[:2]
            )
            return None

    def _enqueue(self, worker: Worker) -> None:
        if not worker.flags & QUEUED and not worker.busy_since:
            worker.flags |= QUEUED
            self._runnable.append(worker)
            self._wake.set()

    # -- the dispatcher -----------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        timers, runnable = self._timers, self._runnable
        budget = 2048  # callbacks between yields to the event loop
        while True:
            if not self._paused:
                now = loop.time()
                for worker in timers.pop_due(now):
                    worker.flags |= PERFORM_PENDING
                    if not worker.flags & QUEUED and not worker.busy_since:
                        worker.flags |= QUEUED
                        runnable.append(worker)
                done = 0
                while runnable and self._in_flight < self.concurrency and not self._paused:
                    worker = runnable.popleft()
                    worker.flags &= ~QUEUED
                    if worker.flags & GONE or worker.busy_since:
                        continue
                    self._step(worker, loop)
                    done += 1
                    if done >= budget:
                        break
                if done >= budget:
                    await asyncio.sleep(0)
                    continue
            self._wake.clear()
            next_due = None if self._paused else timers.next_due()
            delay = None if next_due is None else max(0.0, next_due - loop.time())
            if runnable and not self._paused and self._in_flight < self.concurrency:
                delay = 0.0
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _step(self, worker: Worker, loop: asyncio.AbstractEventLoop) -> None:
        """Run the worker's next piece of work: a message first, else a due perform."""
        mailbox = worker.mailbox
        if mailbox:
            message = mailbox.popleft()
            if message.kind == "call":
                self.counters["calls"] += 1
                self._run(worker, self.handle_call, message, loop)
            else:
                self._cast(worker, message, loop)
        elif worker.flags & PERFORM_PENDING:
            worker.flags &= ~PERFORM_PENDING
            self.counters["performs"] += 1
            self._run(worker, self.perform, None, loop)

    def _cast(self, worker: Worker, message: Message, loop: asyncio.AbstractEventLoop) -> None:
        self.counters["casts"] += 1
        if message.inbox is not None and message.inbox.record.sequence <= worker.watermark:
            self._duplicate(worker, message)  # redelivered after a handoff or crash
            return
        self._run(worker, self.handle_cast, message, loop)

    def _run(
        self,
        worker: Worker,
        callback: Callable[..., Any],
        message: Message | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        started = loop.time()
        try:
            if message is None:
                value, rest = run_eagerly(callback(worker.id, worker.payload))
            else:
                value, rest = run_eagerly(callback(message.body, worker.id, worker.payload))
        except Exception as exc:
            self._failed(worker, exc, message, started)
            return
        if rest is None:
            self._apply(worker, value, message, started)
            return
        worker.busy_since = started
        self._in_flight += 1
        task = self._supervisor.spawn(
            self._finish(worker, rest, message, started), f"worker {worker.id!r}"
        )
        self._running_tasks[worker] = task
        self._continuations[worker] = rest
        if message is None and worker.spec.timeout:
            threshold = worker.spec.lull * worker.spec.timeout
            handle = loop.call_later(threshold, self._slow, worker, started)
            task.add_done_callback(lambda _t: handle.cancel())

    async def _finish(
        self,
        worker: Worker,
        rest: Continuation,
        message: Message | None,
        started: float,
    ) -> None:
        try:
            value = await rest
        except Exception as exc:
            self._failed(worker, exc, message, started)
        else:
            self._apply(worker, value, message, started)
        finally:
            self._running_tasks.pop(worker, None)
            self._continuations.pop(worker, None)
            if worker.busy_since == started:  # else _failed holds it for a backoff
                worker.busy_since = 0.0
            self._in_flight -= 1
            if worker.has_work() and not worker.flags & GONE:
                self._enqueue(worker)
            self._wake.set()

    def _slow(self, worker: Worker, started: float) -> None:
        if worker.busy_since == started:
            self.counters["timeouts"] += 1
            info = self.get(worker.id)
            if info is not None:
                self._supervisor.spawn(
                    self._invoke_quietly(self.handle_timeout, info), "handle_timeout"
                )

    def _apply(
        self, worker: Worker, response: Any, message: Message | None, started: float
    ) -> None:
        """Carry out a callback's response."""
        worker.failures = 0
        if message is not None and message.inbox is not None:
            worker.watermark = message.inbox.record.sequence
            assert self._consumers is not None and self._table is not None
            # Ack only once payload and watermark are stored (see BeforeAck): a crash
            # then never loses the state a message produced, nor replays the message.
            self._consumers.ack(message.consumer, message.inbox.record, worker.id)
        if message is not None and message.reply is not None and not message.reply.done():
            message.reply.set_result(reply_of(response))
        next_timeout: float | None = None
        if isinstance(response, Replace):
            worker.payload = response.payload
            if response.rekeys and response.id != worker.id:
                self._supervisor.spawn(self._rekey(worker, response.id), f"rekey {worker.id!r}")
                return
        elif isinstance(response, Halt):
            self._specs.pop(worker.id, None)
            worker.flags |= GONE
            self._supervisor.spawn(self._halt(worker, response.reason), f"halt {worker.id!r}")
            return
        elif isinstance(response, Timeout):
            worker.last = response.result
            next_timeout = response.seconds
        elif isinstance(response, Ok):
            worker.last = response.result
        else:
            worker.last = response
        # Only a new payload is stored. A message that left the payload as it was needs no
        # write before its ack: were its ack lost, running it again changes nothing stored
        # (at-least-once, as for any side effect), and the payload stored last still
        # matches the watermark stored with it.
        if self._table is not None and isinstance(response, Replace):
            self._table.mark(
                Stored(worker.id, None, worker.payload, True, watermark=worker.watermark)
            )
        if message is None:
            self._reschedule(worker, started, next_timeout)
            return
        if next_timeout is not None:  # Timeout(s) from a call or cast: next perform in s
            self._timers.schedule(worker, asyncio.get_running_loop().time() + next_timeout)
        if worker.mailbox or worker.flags & PERFORM_PENDING:
            self._enqueue(worker)

    def _reschedule(self, worker: Worker, started: float, override: float | None) -> None:
        timeout = worker.spec.timeout if override is None else override
        if not timeout and override is None:
            if worker.mailbox:
                self._enqueue(worker)
            return
        if override is None:
            # Periodic performs keep to their grid (due, due + timeout, ...): a late perform
            # does not shift the ones after it, so a pause leaves no clump of workers due
            # together behind. Missed ticks coalesce: the ticks that passed before this
            # perform started are covered by it, and a tick that passed while it ran makes
            # the next one due at once — never a burst of catch-up performs.
            when = (worker.fired or started) + timeout
            if when <= started:
                when += timeout * ((started - when) // timeout + 1)
        else:
            when = asyncio.get_running_loop().time() + timeout
        worker.fired = 0.0
        self._timers.schedule(worker, when)
        if worker.mailbox:
            self._enqueue(worker)

    def _failed(
        self, worker: Worker, exc: Exception, message: Message | None, started: float
    ) -> None:
        self.counters["errors"] += 1
        worker.failures += 1
        what = "perform" if message is None else f"handle_{message.kind}"
        log.error(
            "%s: %s of worker %r raised %r", self.manager_name, what, worker.id, exc, exc_info=exc
        )
        if message is not None and message.reply is not None and not message.reply.done():
            message.reply.set_exception(
                RemoteError(f"{what} of worker {worker.id!r} raised {exc!r}")
            )
        if message is not None and message.inbox is not None and self._retry(worker, message, exc):
            return
        if self.on_error == "remove":
            self._specs.pop(worker.id, None)
            worker.flags |= GONE
            self._supervisor.spawn(self._halt(worker, "error"), f"remove {worker.id!r}")
        elif self.on_error == "restart":
            low, high = self.restart_backoff
            backoff = min(high, low * 2 ** (worker.failures - 1))
            worker.payload = worker.spec.payload
            loop = asyncio.get_running_loop()
            if worker.spec.timeout:
                self._timers.schedule(worker, loop.time() + backoff)
            else:  # never periodic: no perform, its messages wait for the backoff
                worker.busy_since = loop.time()
                loop.call_later(backoff, self._retry_due, worker)
            if self._has_init:
                self._supervisor.spawn(self._reinit(worker), f"reinit {worker.id!r}")
        elif message is None:
            self._reschedule(worker, started, None)
        elif worker.mailbox:
            self._enqueue(worker)

    def _retry(self, worker: Worker, message: Message, exc: Exception) -> bool:
        """A durable cast failed: retry it in place (the key waits) or park it."""
        message.attempts += 1
        if message.attempts >= self.max_attempts:
            assert self._consumers is not None
            self.counters["dead_letters"] += 1
            reason = f"handle_cast raised {exc!r} {message.attempts} times"
            self._supervisor.spawn(
                self._consumers.park(message.consumer, message.inbox, reason, message.attempts),
                f"park {worker.id!r}",
            )
            return False
        self.counters["retries"] += 1
        if worker.mailbox is None:
            worker.mailbox = deque()
        worker.mailbox.appendleft(message)  # first again: later messages keep their order
        low, high = self.retry_backoff
        loop = asyncio.get_running_loop()
        worker.busy_since = loop.time()  # holds the key during the backoff
        loop.call_later(min(high, low * 2 ** (message.attempts - 1)), self._retry_due, worker)
        return True

    def _retry_due(self, worker: Worker) -> None:
        worker.busy_since = 0.0
        if not worker.flags & GONE:
            self._enqueue(worker)

    def _duplicate(self, worker: Worker, message: Message) -> None:
        assert self._consumers is not None
        self.counters["duplicates"] += 1
        self._consumers.ack(message.consumer, message.inbox.record, None)
        if worker.has_work():
            self._enqueue(worker)

    def _deliver_record(self, message: InboxMessage, consumer: LogConsumer) -> None:
        """An inbox record arrived for one of our partitions: run it or queue it.

        A worker with nothing queued and nothing running handles it at once, here — the
        fetch loop is never inside a callback, and nothing can be ahead of the record in
        that worker's order. Otherwise it joins the worker's mailbox behind the rest.
        """
        cast = Message("cast", message.message, inbox=message, consumer=consumer)
        try:
            worker = self._materialize(message.key)
            if (
                worker is not None
                and not worker.mailbox
                and not worker.busy_since
                and not worker.flags  # not queued, no perform pending, not gone
                and not self._paused
                and self._in_flight < self.concurrency
            ):
                self._cast(worker, cast, asyncio.get_running_loop())
                return
            self._deliver(message.key, cast)
        except (UnknownWorkerError, TypeError) as exc:  # no such worker, or an unusable key
            assert self._consumers is not None
            self.counters["dead_letters"] += 1
            self._supervisor.spawn(self._consumers.park(consumer, message, str(exc), 0), "park")

    def _forget_inbox_messages(self, worker_ids: Any = None) -> None:
        """Drop delivered, unhandled inbox messages: their next consumer gets them again."""
        consumers = self._consumers
        if consumers is None:
            return
        ids = self._workers if worker_ids is None else worker_ids
        for worker_id in list(ids):
            worker = self._workers.get(worker_id)
            if isinstance(worker, Worker) and worker.mailbox:
                kept = deque(m for m in worker.mailbox if m.inbox is None)
                consumers.forget(len(worker.mailbox) - len(kept))
                worker.mailbox = kept
        for worker_id in list(self._parked) if worker_ids is None else list(worker_ids):
            parked = self._parked.get(worker_id)
            if parked:
                kept_parked = [m for m in parked if m.inbox is None]
                consumers.forget(len(parked) - len(kept_parked))
                self._parked[worker_id] = kept_parked

    async def _reinit(self, worker: Worker) -> None:
        worker.payload = await self._invoke_quietly(self.init, worker.id, worker.payload)

    async def _halt(self, worker: Worker, reason: str) -> None:
        # Only if still ours: a delete, put or stop in between already terminated it.
        # _remove also fails the calls still queued behind the halt.
        if self._workers.get(worker.id) is worker:
            await self._remove(worker.id, reason)
        if self._table is not None:
            await self._table.write(Stored(worker.id, None, None, False, deleted=True))

    async def _rekey(self, worker: Worker, new_id: Any) -> None:
        old_id = worker.id
        try:
            check_id(new_id)
        except TypeError as exc:  # the worker carries on under its old id
            self.counters["errors"] += 1
            log.error("%s: cannot re-key worker %r: %s", self.manager_name, old_id, exc)
            self._reschedule(worker, asyncio.get_running_loop().time(), None)
            self._wake.set()
            return
        spec = self._specs.pop(old_id, worker.spec)
        if self._workers.get(old_id) is worker:
            await self._remove(old_id, "rekey")
        if self._table is not None:
            await self._table.write(Stored(old_id, None, None, False, deleted=True))
        fields = spec.to_wire()
        fields["payload"] = worker.payload
        await self.put(new_id, **fields)

    async def _drain(self) -> None:
        """Wait until no callback is running."""
        while pending := [t for t in self._running_tasks.values() if not t.done()]:
            await asyncio.wait(pending)

    async def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        await self._invoke_quietly(self.handle_state_change, state)

    # -- following the cluster (TopologyHook) ----------------------------------------------------

    async def release(self, topology: Topology) -> None:
        """Before this node acknowledges ``topology``: stop and hand over what moved away."""
        async with self._topology_lock:
            await self._release(topology)

    async def settle(self, topology: Topology) -> None:
        """Every member acknowledged ``topology``: start what is ours, resume."""
        async with self._topology_lock:
            latest = self.cluster.topology if self.cluster is not None else None
            if latest is not None and latest.epoch > topology.epoch:
                return  # a newer epoch was adopted meanwhile; its settle comes next
            try:
                await self._settle(topology)
            except CloisterError as exc:
                # Taking workers over needs the latest stored state; without it, starting
                # them would resume from stale payloads. Nothing was started: try again.
                log.warning(
                    "manager %s: settling epoch %d postponed (%s); retrying",
                    self.manager_name,
                    topology.epoch,
                    exc,
                )
                self._supervisor.spawn(self._settle_later(topology), "settle retry")

    async def _settle_later(self, topology: Topology) -> None:
        await asyncio.sleep(1.0)
        if not self._leaving and self.state != "down":
            await self.settle(topology)

    async def _release(self, topology: Topology) -> None:
        """Before this node acknowledges ``topology``: stop and hand over what moved away."""
        cluster = self.cluster
        assert cluster is not None
        if self._leaving or self.state == "down":
            return  # stop() handed everything over already
        await self._set_state("rehashing")
        placement = self._placement_for(topology)
        leaving = [i for i in self._workers if not placement.mine(i)]
        moved = set()
        if self._consumers is not None:
            moved = self._consumers.held_or_wanted - placement.owned()
            self._consumers.stop_fetching(moved)
        lost = [i for i in self._parked if not placement.mine(i)]
        self._forget_inbox_messages(lost)
        for worker_id in lost:
            self._parked.pop(worker_id)  # their senders will retry with the new owner
        for worker_id in [i for i in self._handed if not placement.mine(i)]:
            self._handed.pop(worker_id)
        if leaving:
            await self._hand_over(leaving, placement.owner_of)
        if self._consumers is not None and moved:
            await self._consumers.release(moved)

    async def _settle(self, topology: Topology) -> None:
        cluster = self.cluster
        assert cluster is not None
        if self._leaving or self.state == "down":
            return  # a hook call already under way when stop() began: take nothing
        placement = self._placement_for(topology)
        now = asyncio.get_running_loop().time()
        if self._table is not None:
            # The latest stored payloads and runtime specs (crash takeover, put/delete);
            # a failure propagates: settle() retries rather than resume from stale state.
            await self._table.load()
        mirror = self._table.mirror if self._table is not None else {}
        self._merge_table()
        # A snapshot, with a yield every few thousand ids: a million specs take seconds,
        # and heartbeats (and the workers already running) must not wait for them.
        for count, (worker_id, spec) in enumerate(list(self._specs.items()), 1):
            if not count % _YIELD_EVERY:
                await asyncio.sleep(0)
                if self.state == "down":
                    return  # killed meanwhile: start nothing more
            if (
                worker_id in self._workers
                or self._specs.get(worker_id) is not spec  # deleted or replaced meanwhile
                or not placement.mine(worker_id)
            ):
                continue
            payload, fresh = None, True
            handed = self._handed.pop(worker_id, None)
            watermark = 0
            if handed is not None:
                payload, fresh, watermark = handed[0], False, handed[2]
                self._parked[worker_id] = [
                    Message("cast", m) for m in handed[1]
                ] + self._parked.get(worker_id, [])
            else:
                stored = mirror.get(worker_id)
                if stored is not None and stored.has_payload:
                    payload, fresh, watermark = stored.payload, False, stored.watermark
            self.counters["taken_over"] += 0 if fresh else 1
            await self._spawn(worker_id, spec, payload, now, fresh=fresh)
            if watermark:
                worker = self._materialize(worker_id)
                if worker is not None:
                    worker.watermark = watermark
        if self._consumers is not None:
            owned = placement.owned()
            await self._consumers.release(self._consumers.held_or_wanted - owned)
            await self._consumers.take(owned)
        self._paused = False
        self._wake.set()
        await self._set_state("up")

    async def suspend(self, reason: SuspendReason) -> None:
        """The node may not process now (lease lost, short of consensus, stopping)."""
        if self._leaving or self.state == "down":
            return
        if reason is SuspendReason.STOPPING:
            await self._hand_everything_over()
            return
        async with self._topology_lock:
            await self._suspend()

    async def _suspend(self) -> None:
        self._paused = True
        await self._drain()
        if self._consumers is not None:
            # Give the partitions up; whoever consumes them next (us again, or the node
            # that takes over) starts from the oldest unhandled message.
            self._forget_inbox_messages()
            await self._consumers.release(self._consumers.held_or_wanted)
            # While we were away the topology may change and our workers move and come
            # back: never resume them from what is in memory here. Unacknowledged state is
            # dropped (its messages are delivered again); the rest is in the state table.
            assert self._table is not None
            self._table.dirty.clear()
            for count, worker_id in enumerate(list(self._workers), 1):
                await self._remove(worker_id, "suspend")
                if not count % _YIELD_EVERY:
                    await asyncio.sleep(0)  # heartbeats go on while a million workers stop
        await self._set_state("rehashing")

    async def _hand_everything_over(self) -> None:
        async with self._topology_lock:
            await self._hand_all_over()

    async def _hand_all_over(self) -> None:
        cluster = self.cluster
        if cluster is None or self.state == "down" or cluster.topology is None:
            return
        placement = self._placement_now()
        self._leaving = True
        if self._consumers is not None:
            self._consumers.stop_fetching(self._consumers.partitions)
        # Hand over to the next preferred node that is still there: in a rolling stop the
        # ring may still name a node that left a moment ago (no epoch without it yet).
        if len(placement.ring) > 1:
            gone = [n for n in placement.ring.nodes if n not in cluster.members_seen]
            if all(n == cluster.node or n in gone for n in placement.ring.nodes):
                # The last one out: nobody to ship to, the stored payloads carry on.
                await self._hand_over(list(self._workers), lambda worker_id: None)
            else:
                await self._hand_over(
                    list(self._workers), lambda worker_id: placement.successor_of(worker_id, gone)
                )
        if self._consumers is not None:
            self._forget_inbox_messages()
            await self._consumers.release(self._consumers.held_or_wanted)
        self._paused = True

    async def _hand_over(self, leaving: list[Any], owner_of: Callable[[Any], str | None]) -> None:
        """Stop ``leaving`` workers and ship their payloads and queued casts to their owners
        (``owner_of`` None: nobody to ship to, store the payloads)."""
        cluster = self.cluster
        assert cluster is not None
        entries = [(i, self._workers.get(i)) for i in leaving]
        for _, entry in entries:
            if isinstance(entry, Worker):
                entry.flags |= GONE  # no new callbacks; the running ones finish first
        batches: dict[str, list[list[Any]]] = {}
        for worker_id, entry in entries:
            if entry is None:
                continue
            casts: list[Any] = []
            watermark = 0
            if isinstance(entry, Worker):
                await self._wait_idle(entry)
                for m in entry.mailbox or ():
                    if m.reply is not None and not m.reply.done():
                        m.reply.set_exception(NotOwnerError(f"worker {worker_id!r} moved; retry"))
                    elif m.inbox is not None:
                        self._consumers.forget()  # type: ignore[union-attr]  # redelivered there
                    elif m.kind == "cast":
                        casts.append(m.body)
                entry.mailbox = None
                watermark = entry.watermark
            stateful = isinstance(entry, Worker) and (
                entry.payload is not entry.spec.payload or watermark
            )
            payload = entry.payload
            await self._remove(worker_id, "handoff")
            if not (stateful or casts):  # the others restart from their spec: nothing to ship
                continue
            owner = owner_of(worker_id)
            if owner is not None:
                batches.setdefault(owner, []).append([worker_id, payload, casts, watermark])
            elif self._table is not None and stateful:
                self._table.mark(Stored(worker_id, None, payload, True, watermark=watermark))
        self.counters["handed_off"] += len(leaving)
        for owner, batch in batches.items():
            for start in range(0, len(batch), 5000):
                chunk = batch[start : start + 5000]
                try:
                    await cluster.call(
                        owner, f"cloister.manager.{self.manager_name}.handoff", chunk, timeout=10
                    )
                except CloisterError as exc:
                    log.warning(
                        "handoff of %d worker(s) to %s failed (%s); storing payloads instead",
                        len(chunk),
                        owner,
                        exc,
                    )
                    if self._table is not None:
                        for worker_id, payload, _casts, watermark in chunk:
                            self._table.mark(
                                Stored(worker_id, None, payload, True, watermark=watermark)
                            )
        if self._table is not None:
            await self._table.flush(leaving)

    async def _remote_handoff(self, batch: Any) -> int:
        for worker_id, payload, casts, watermark in batch:
            self._handed[worker_id] = (payload, list(casts), int(watermark))
        return len(batch)

    async def _flush_loop(self) -> None:
        assert self._table is not None
        while True:
            await asyncio.sleep(self.flush_interval)
            if self._table.dirty:
                try:
                    await self._table.flush()
                except CloisterError as exc:
                    log.warning("manager %s: payload flush postponed (%s)", self.manager_name, exc)
