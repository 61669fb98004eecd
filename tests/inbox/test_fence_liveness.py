"""A fence or a suspension never leaves a node stuck or silent.

- A node cut off from the medium says so at once (its state leaves ``ready`` before it
  starts giving its partitions up, which on an unreachable medium takes timeouts).
- After a suspension, the in-flight count is re-derived: records lost on the way (a park
  that failed) cannot keep the node from fetching once it is ready again.
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from typing import Any

from cloister import Cluster, DynamicManager, Ok
from cloister.backends import open_backend
from cloister.backends.memory import MemoryWorld, world
from cloister.cluster import ClusterInfo, State
from cloister.manager.consumer import PartitionConsumers
from cloister.testing import eventually

HEARTBEAT, FAILURE_TIMEOUT = 0.05, 0.25
KEYS = [f"k{i}" for i in range(20)]


class Stamps:
    def __init__(self) -> None:
        self.left_ready: float | None = None
        self.suspended: list[float] = []


class Keeper(DynamicManager):
    stamps: Stamps
    partitions = 16

    def children_specs(self) -> dict[Any, Any]:
        return {k: {"payload": 0} for k in KEYS}

    def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        return Ok(None)

    def terminate(self, reason: str, id: Any, payload: Any) -> None:
        if reason == "suspend":
            self.stamps.suspended.append(time.monotonic())


class Listener:
    def __init__(self, stamps: Stamps) -> None:
        self.stamps = stamps

    def on_state_change(self, from_state: State, to_state: State, info: ClusterInfo) -> None:
        if from_state is State.READY and self.stamps.left_ready is None:
            self.stamps.left_ready = time.monotonic()


async def _node(
    stack: AsyncExitStack, url: str, name: str, stamps: Stamps, manager: type[Keeper]
) -> tuple[Cluster, Keeper]:
    cluster = Cluster(
        "fence",
        name,
        backend=url,
        heartbeat=HEARTBEAT,
        failure_timeout=FAILURE_TIMEOUT,
        listener=Listener(stamps) if name == "a" else None,
    )
    await cluster.start()
    stack.push_async_callback(cluster.stop)
    started = await manager.start(cluster)
    stack.push_async_callback(started.stop)
    return cluster, started


async def test_a_fenced_node_leaves_ready_before_it_gives_its_partitions_up() -> None:
    url = "memory://fence-says-so-first"
    medium: MemoryWorld = world("fence-says-so-first")
    stamps = Stamps()
    manager = type("K", (Keeper,), {"stamps": stamps, "name": "keeper"})
    async with AsyncExitStack() as stack:
        a, keeper_a = await _node(stack, url, "a", stamps, manager)
        b, _ = await _node(stack, url, "b", Stamps(), manager)
        await eventually(lambda: a.state is State.READY and b.state is State.READY)
        await eventually(lambda: len(a.siblings()) == 2 and bool(keeper_a.ids()))
        stamps.left_ready = None  # b's join took a through rehashing once already
        cut = time.monotonic()
        medium.partition(["a"])
        medium.delay("a", 0.5)  # every attempt on the unreachable medium takes a while
        await eventually(lambda: bool(stamps.suspended), timeout=10, what="a suspended")
        assert stamps.left_ready is not None, "a never left ready"
        assert stamps.left_ready < stamps.suspended[0], (
            f"a left ready {stamps.left_ready - cut:.2f}s after the cut, but stopped its "
            f"workers {stamps.suspended[0] - cut:.2f}s after it: readiness lagged the fence"
        )
        assert stamps.left_ready - cut < FAILURE_TIMEOUT + 2 * HEARTBEAT
        medium.delay("a", 0)
        medium.heal()
        await eventually(lambda: a.state is State.READY, timeout=10, what="a ready again")


async def test_a_suspension_rederives_the_in_flight_count() -> None:
    url = "memory://fence-in-flight"
    stamps = Stamps()
    manager = type("K", (Keeper,), {"stamps": stamps, "name": "keeper", "max_in_flight": 8})
    async with AsyncExitStack() as stack:
        a, keeper = await _node(stack, url, "a", stamps, manager)
        await eventually(lambda: a.state is State.READY)
        consumers = keeper._region.consumers if keeper._region else None
        assert isinstance(consumers, PartitionConsumers)
        # Records counted in flight that nobody will ever ack or forget (a park that failed,
        # say): the fetch loops would wait for room that never comes.
        consumers.in_flight = consumers.max_in_flight
        consumers._room.clear()
        medium = world("fence-in-flight")
        medium.partition(["a"])  # lease lost: the node suspends and gives everything up
        await eventually(lambda: bool(stamps.suspended), timeout=5, what="a suspended")
        medium.heal()
        await eventually(lambda: a.state is State.READY, timeout=5, what="a ready again")
        await eventually(lambda: bool(consumers.partitions), timeout=5)
        for key in KEYS:
            await keeper.cast(key, "hello")
        await eventually(
            lambda: keeper.counters.casts >= len(KEYS), timeout=5, what="casts handled"
        )
        assert consumers.in_flight <= consumers.max_in_flight


async def test_a_node_whose_record_expired_suspends_before_it_works_again() -> None:
    url = "memory://fence-expired"
    stamps = Stamps()
    manager = type("K", (Keeper,), {"stamps": stamps, "name": "keeper"})
    async with AsyncExitStack() as stack:
        a, keeper = await _node(stack, url, "a", stamps, manager)
        await eventually(lambda: a.state is State.READY and bool(keeper.ids()))
        intruder = open_backend(url, "fence", "intruder")
        await intruder.connect()
        stack.push_async_callback(intruder.close)
        members = await intruder.kv("members", ttl_keys=True)
        await members.delete("a")  # as if it expired while a was paused
        await eventually(lambda: bool(stamps.suspended), timeout=5, what="a suspended")
        assert a.counters.fenced >= 1
        await eventually(
            lambda: a.state is State.READY and len(keeper.ids()) == len(KEYS),
            timeout=5,
            what="a settled afresh",
        )
