"""``DynamicManager``: many keyed workers, one process or a whole cluster.

Subclass it, implement ``children_specs()`` and the callbacks you need, and start it::

    class Processor(DynamicManager):
        def children_specs(self):
            return {f"foo_{i}": {"timeout": 1.0} for i in range(1_000)}

        async def perform(self, id, payload):
            return Ok(None)

    manager = await Processor.start()          # standalone
    manager = await Processor.start(cluster)   # distributed: only owned ids run here

The class is a facade over rooms that own their state: the :class:`~.engine.Engine`
(workers, timers, dispatcher), the :class:`~.routing.Router` (who gets a request), the
:class:`~.ownership.ShardRegion` (topology hooks, handoff, inbox partitions, state table)
and the :class:`~.lifecycle.Lifecycle` (one phase enum).

How it runs: one dispatcher task per manager pops due workers from a timer wheel and runs
their callbacks eagerly (see :mod:`.worker`); a worker runs one callback at a time, and
messages wait in its mailbox, in order. In a cluster the manager follows ownership through
the cluster's topology hooks: ids that moved away are stopped (``terminate("handoff")``)
and their state handed to the new owner *before* this node acknowledges the epoch; ids
that moved here start only once every member acknowledged it — never on two nodes at once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

from cloister._tasks import Supervisor
from cloister.cluster.core import SuspendReason
from cloister.errors import CloisterError, ConfigurationError, NotRunningError
from cloister.manager.consumer import PartitionConsumers
from cloister.manager.engine import Callbacks, Engine, Options, Ports, UnknownWorkerError
from cloister.manager.lifecycle import Lifecycle, ManagerState, Phase
from cloister.manager.ownership import YIELD_EVERY, RegionOptions, ShardRegion
from cloister.manager.processes import ProcessCalls, class_path
from cloister.manager.responses import Ok
from cloister.manager.routing import Router
from cloister.manager.spec import check_defaults, check_id, make_spec
from cloister.manager.types import (
    EXECUTORS,
    ON_ERROR,
    ON_HANDLER_TIMEOUT,
    PICKUP,
    Executor,
    Key,
    ManagerCounters,
    ManagerTimings,
    OnError,
    OnHandlerTimeout,
    Pickup,
    Reason,
)
from cloister.manager.worker import WorkerInfo
from cloister.store.inbox import DeadLetter, Inbox

if TYPE_CHECKING:
    from cloister.cluster import Cluster, Topology

__all__ = ["DynamicManager", "UnknownWorkerError"]

log = logging.getLogger("cloister.manager")

F = TypeVar("F", bound=Callable[..., Any])

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
    "executor",
    "pool_size",
    "handler_timeout",
    "on_handler_timeout",
    "defaults",
)


def _inline(callback: F) -> F:
    """Mark a default callback that does nothing: it runs on the loop, never a thread."""
    callback.__cloister_inline__ = True  # type: ignore[attr-defined]
    return callback


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
    - ``executor``: where sync callbacks run — ``"thread"`` (default: a pool of
      ``pool_size`` threads, so a callback that blocks never holds the node's lease
      renewals), ``"process"`` (``pool_size`` child processes, for CPU-bound callbacks:
      the class must be importable, arguments and responses are wire values, and a child
      has its own instance — see :mod:`cloister.manager.processes`) or ``"loop"`` (on the
      event loop: for tiny callbacks that never block). Either way a worker runs one
      callback at a time, in order. ``async def`` callbacks always run on the loop (they
      must not block it); so do ``init`` and ``terminate``.
    - ``defaults``: spec fields every worker gets unless its own spec sets them
      (Tarearbol's ``use DynamicManager, defaults: [...]``): ``{"timeout": 0}`` makes
      every worker idle unless its spec gives a period. Precedence, field by field: the
      worker's spec, then ``start(..., defaults=...)``, then the class attribute, then
      the library defaults (``timeout`` 1.0 s, ``lull`` 1.1, ``instant_perform`` False).
      ``start(defaults=...)`` is merged over the class's, not instead of it.
    - ``handler_timeout``: seconds after which a running callback is reported to
      ``handle_timeout`` (None: never). With ``on_handler_timeout="abandon"`` the attempt
      is also given up: an inbox message is retried and parked after ``max_attempts``, a
      call fails, a perform is rescheduled; a late result is discarded.
    """

    name: ClassVar[str | None] = None
    concurrency: ClassVar[int] = 10_000
    on_error: ClassVar[OnError] = "continue"
    pickup: ClassVar[Pickup] = "random"
    flush_interval: ClassVar[float] = 0.25
    restart_backoff: ClassVar[tuple[float, float]] = (0.05, 5.0)
    durable: ClassVar[bool] = True
    partitions: ClassVar[int] = 128
    max_attempts: ClassVar[int] = 5
    retry_backoff: ClassVar[tuple[float, float]] = (0.05, 2.0)
    max_in_flight: ClassVar[int] = 4096
    executor: ClassVar[Executor] = "thread"
    pool_size: ClassVar[int] = 8
    handler_timeout: ClassVar[float | None] = None
    on_handler_timeout: ClassVar[OnHandlerTimeout] = "report"
    defaults: ClassVar[Mapping[str, Any]] = {}

    # -- callbacks to override ---------------------------------------------------------------

    def children_specs(self) -> Mapping[Any, Any]:
        """The workers to start: id -> spec (``payload``, ``timeout``, ``lull``,
        ``instant_perform``; ``{}`` or None for defaults)."""
        return {}

    def init(self, id: Any, payload: Any) -> Any:
        """Build a worker's payload lazily when it starts (default: the spec's payload)."""
        return payload

    @_inline
    def perform(self, id: Any, payload: Any) -> Any:
        """The periodic work of one worker. Return a response (see :mod:`.responses`)."""
        return Ok(None)

    @_inline
    def handle_call(self, message: Any, id: Any, payload: Any) -> Any:
        """Answer ``manager.call(id, message)``; the response's result is the reply."""
        return Ok(None)

    @_inline
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
        # start(defaults=) over the class's defaults, field by field (not instead of them).
        self.spec_defaults = {
            **check_defaults(type(self).defaults, f"{type(self).__name__}.defaults"),
            **check_defaults(options.get("defaults", {}), "defaults"),
        }
        if self.on_error not in ON_ERROR:
            raise ConfigurationError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        if self.pickup not in PICKUP:
            raise ConfigurationError(f"pickup must be one of {PICKUP}, got {self.pickup!r}")
        if not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise ConfigurationError(f"concurrency must be an int >= 1, got {self.concurrency!r}")
        if self.executor not in EXECUTORS:
            raise ConfigurationError(f"executor must be one of {EXECUTORS}, got {self.executor!r}")
        size = self.pool_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ConfigurationError(f"pool_size must be an int >= 1, got {size!r}")
        timeout = self.handler_timeout
        if timeout is not None and (
            not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0
        ):
            raise ConfigurationError(
                f"handler_timeout must be a number of seconds > 0 or None, got {timeout!r}"
            )
        if self.on_handler_timeout not in ON_HANDLER_TIMEOUT:
            raise ConfigurationError(
                f"on_handler_timeout must be one of {ON_HANDLER_TIMEOUT}, "
                f"got {self.on_handler_timeout!r}"
            )
        self.manager_name = self.name or type(self).__name__
        self.cluster = cluster
        self.counters = ManagerCounters()
        self.timings = ManagerTimings()
        """Histograms of callback durations, cast latency and handoff phases (metrics)."""
        # On a node, the manager's tasks die with the node (see Cluster.supervisor).
        self._supervisor = (
            Supervisor(f"manager {self.manager_name}")
            if cluster is None
            else cluster.supervisor.child(f"manager {self.manager_name}")
        )
        cls = type(self)
        # executor="process": the sync callbacks the class defines run in child processes.
        self._processes = ProcessCalls(class_path(cls)) if self.executor == "process" else None
        self._engine = Engine(
            Callbacks(
                perform=self._in_child(self.perform),
                handle_call=self._in_child(self.handle_call),
                handle_cast=self._in_child(self.handle_cast),
                handle_timeout=self.handle_timeout,
                init=self.init if cls.init is not DynamicManager.init else None,
                terminate=self.terminate if cls.terminate is not DynamicManager.terminate else None,
            ),
            Options(
                name=self.manager_name,
                concurrency=self.concurrency,
                on_error=self.on_error,
                restart_backoff=self.restart_backoff,
                max_attempts=self.max_attempts,
                retry_backoff=self.retry_backoff,
                executor=self.executor,
                pool_size=self.pool_size,
                handler_timeout=self.handler_timeout,
                on_handler_timeout=self.on_handler_timeout,
            ),
            self._supervisor,
            Ports(put=self._put_fields if cluster is not None else None),
            self.counters,
            self.timings,
        )
        if self._processes is not None:
            self._engine.on_abandon = self._processes.kill_overdue
        self._lifecycle = Lifecycle(Phase.DOWN, self._engine.set_paused, self._notify_state)
        self._region = (
            None
            if cluster is None
            else ShardRegion(
                cluster,
                self._engine,
                self._lifecycle,
                RegionOptions(
                    name=self.manager_name,
                    group=self.placement_group(),
                    partitions=self.partitions,
                    durable=self.durable,
                    max_in_flight=self.max_in_flight,
                    flush_interval=self.flush_interval,
                ),
                self.counters,
                self.timings,
            )
        )
        self._router = Router(
            self._engine, self._lifecycle, self.manager_name, self.pickup, cluster, self._region
        )

    def _in_child(self, callback: Callable[..., Any]) -> Callable[..., Any]:
        """``callback``, or (``executor="process"``) its stand-in that runs it in a child
        process — for a sync callback the class defines; the others stay as they are."""
        processes = self._processes
        if (
            processes is None
            or inspect.iscoroutinefunction(callback)
            or getattr(callback, "__cloister_inline__", False)
        ):
            return callback
        return processes.callback(callback.__name__)

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
            manager._engine.close()
            if manager._processes is not None:
                manager._processes.close()
            await manager._lifecycle.enter(Phase.DOWN)
            raise
        return manager

    async def _start(self) -> None:
        engine, region = self._engine, self._region
        await self._lifecycle.enter(Phase.STARTING if region is None else Phase.JOINING)
        specs = self.children_specs()
        if not isinstance(specs, Mapping):
            raise ConfigurationError(
                f"children_specs() must return a mapping id -> spec, got {type(specs).__name__}"
            )
        engine.start()
        defaults = self.spec_defaults
        # A million ids take seconds: yield now and then, or the node's heartbeat (and
        # everything else on this loop) would wait, and a cluster node fence itself.
        if region is None:
            now = asyncio.get_running_loop().time()
            spawn, spawn_now = engine.spawn, engine.spawn_now
            has_init = engine.callbacks.init is not None
            for n, (worker_id, fields) in enumerate(specs.items(), 1):
                check_id(worker_id)
                spec = make_spec(worker_id, fields, defaults)
                if has_init:
                    await spawn(worker_id, spec, None, now)
                else:
                    spawn_now(worker_id, spec, spec.payload, now)
                if not n % YIELD_EVERY:
                    await asyncio.sleep(0)
            await self._lifecycle.enter(Phase.UP)
            return
        add = engine.specs.__setitem__
        for n, (worker_id, fields) in enumerate(specs.items(), 1):
            check_id(worker_id)
            add(worker_id, make_spec(worker_id, fields, defaults))
            if not n % YIELD_EVERY:
                await asyncio.sleep(0)
        self._router.register()
        await region.join(self)

    async def stop(self) -> None:
        """Terminate every worker (``terminate("shutdown")``) and return when all are done."""
        if self._lifecycle.down:
            return
        engine, region, lifecycle = self._engine, self._region, self._lifecycle
        if self.cluster is not None and region is not None:
            self.cluster.remove_hook(self)
            if not self.cluster.crashed:
                await region.hand_everything_over()
        if not lifecycle.leaving:
            lifecycle.move(Phase.STOPPING)
        await engine.drain()
        remove, reason = engine.remove, Reason.SHUTDOWN  # a million of them, maybe
        for worker_id in list(engine.workers):
            await remove(worker_id, reason)
        if region is not None and region.table is not None and region.reachable():
            try:
                await region.table.flush()
            except CloisterError as exc:
                log.warning(
                    "manager %s could not flush payloads on stop: %s", self.manager_name, exc
                )
        await self._supervisor.close()
        engine.close()
        if self._processes is not None:
            self._processes.close()
        await lifecycle.enter(Phase.DOWN)

    async def restart(self) -> None:
        """Terminate every live worker and start it again from its spec."""
        engine = self._engine
        engine.paused = True  # held while the workers restart, whatever the phase
        await engine.drain()
        now = asyncio.get_running_loop().time()
        for worker_id in list(engine.workers):
            spec = engine.spec_of(worker_id)
            await engine.remove(worker_id, Reason.RESTART)
            if spec is not None:
                await engine.spawn(worker_id, spec, None, now)
        engine.paused = self.cluster is not None and self.state != "up"
        engine.wake.set()

    async def _notify_state(self, state: ManagerState) -> None:
        await self._engine.invoke_quietly(self.handle_state_change, state)

    @property
    def state(self) -> ManagerState:
        """``down``, ``starting``, ``up`` or ``rehashing`` (a ``StrEnum``)."""
        return self._lifecycle.state

    # -- runtime management ------------------------------------------------------------------

    def ids(self) -> list[Key]:
        """The ids of the workers live on this node."""
        return list(self._engine.workers)

    def get(self, worker_id: Key) -> WorkerInfo | None:
        """A snapshot of a live worker, or None."""
        return self._engine.info(worker_id)

    def __len__(self) -> int:
        return len(self._engine.workers)

    async def put(self, worker_id: Key, **spec: Any) -> None:
        """Add a worker, or replace it (terminated, then started from the new spec)."""
        check_id(worker_id)
        fields = make_spec(worker_id, spec, self.spec_defaults)
        await self._router.route(
            worker_id, "put", {"id": worker_id, "spec": fields.to_wire()}, None
        )

    async def _put_fields(self, worker_id: Key, fields: dict[str, Any]) -> None:
        await self.put(worker_id, **fields)  # a re-key: the new id may live elsewhere

    async def put_new(self, worker_id: Key, **spec: Any) -> bool:
        """Add a worker unless the id exists; True when added."""
        check_id(worker_id)
        if self._engine.spec_of(worker_id) is not None:
            return False
        await self.put(worker_id, **spec)
        return True

    async def delete(self, worker_id: Key) -> bool:
        """Remove a worker (``terminate("delete")``); True when it existed."""
        check_id(worker_id)
        existed = self._engine.spec_of(worker_id) is not None
        await self._router.route(worker_id, "delete", {"id": worker_id}, None)
        return existed

    async def call(self, worker_id: Key | None, message: Any, *, timeout: float = 5.0) -> Any:
        """Ask worker ``worker_id`` (anywhere in the cluster) and wait for its reply.

        ``worker_id`` None = pool mode: a free local worker chosen by ``pickup``.
        """
        router = self._router
        if worker_id is None:
            return await router.local_call(router.pick(message), message, timeout)
        check_id(worker_id)
        return await router.route(worker_id, "call", {"id": worker_id, "m": message}, timeout)

    async def cast(
        self,
        worker_id: Key | None,
        message: Any,
        *,
        msg_id: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        """Send ``message`` to worker ``worker_id`` (anywhere in the cluster).

        In a cluster it returns once the message is durably stored in the inbox (with
        ``msg_id``, a duplicate within the dedup window is dropped); standalone, once the
        worker's mailbox has it. ``worker_id`` None = pool mode (a local worker).
        """
        router = self._router
        if worker_id is None:
            router.local_cast(router.pick(message), message)
            return
        inbox = self._inbox
        if inbox is not None:  # the inbox checks the id as it places it
            await inbox.put(worker_id, message, msg_id=msg_id, timeout=timeout)
            return
        check_id(worker_id)
        await router.route(worker_id, "cast", {"id": worker_id, "m": message}, timeout)

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
        consumers = self._consumers
        partitions = consumers.partitions if consumers is not None else set()
        return sum([await inbox.log.depth(partition) for partition in sorted(partitions)])

    @property
    def inbox(self) -> Inbox:
        """The manager's durable inbox (cluster mode with ``durable=True``): what sources
        and outside producers append to. :class:`NotRunningError` when there is none."""
        return self._require_inbox()

    def _require_inbox(self) -> Inbox:
        inbox = self._inbox
        if inbox is None:
            raise NotRunningError(
                f"manager {self.manager_name} has no inbox: it needs a cluster and durable=True"
            )
        return inbox

    @property
    def fence(self) -> int:
        """The fencing token of this node's work: the epoch it last settled on (0 before,
        and standalone). Every owner of a key settles on a later epoch than the owner
        before it, so an outside store that keeps the highest token it saw per key
        (``UPDATE ... SET fence = $token WHERE key = $k AND fence <= $token``) refuses the
        writes of a node that lost the key and does not know it yet (a paused process)."""
        return 0 if self._region is None else self._region.fence

    @property
    def stalled(self) -> bool:
        """True while the stall watchdog finds this manager up, with records waiting in
        its partitions, and nothing in flight or handled (it heals, and logs the stall
        once; ``counters.stalls`` counts the looks that found one)."""
        region = self._region
        return region is not None and region.watchdog is not None and region.watchdog.stalled

    def owner_of(self, worker_id: Key) -> str:
        """The node that runs ``worker_id`` (this node's current view)."""
        if self._region is None:
            return "local"
        return self._region.placement_now().owner_of(worker_id)

    @classmethod
    def placement_group(cls) -> str:
        """The cluster group whose members run this manager (``cloister run`` joins it).

        When nodes of the cluster joined this group, workers are placed on its ring only,
        so a node that does not run the manager gets none of its workers. Nodes that run
        a manager should either all join its group, or none.
        """
        return f"manager.{cls.name or cls.__name__}"

    # -- following the cluster (TopologyHook; the work is the shard region's) ---------------

    async def release(self, topology: Topology) -> None:
        """Before this node acknowledges ``topology``: stop and hand over what moved away."""
        if self._region is not None:
            await self._region.release(topology)

    async def settle(self, topology: Topology) -> None:
        """Every member acknowledged ``topology``: start what is ours, resume."""
        if self._region is not None:
            await self._region.settle(topology)

    async def suspend(self, reason: SuspendReason) -> None:
        """The node may not process now (lease lost, short of consensus, stopping)."""
        if self._region is not None:
            await self._region.suspend(reason)

    # -- the rooms' parts the facade reads ----------------------------------------------------

    @property
    def _inbox(self) -> Inbox | None:
        return self._region.inbox if self._region is not None else None

    @property
    def _consumers(self) -> PartitionConsumers | None:
        return self._region.consumers if self._region is not None else None
