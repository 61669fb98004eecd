"""Availability through a medium's leader election (issue 12, item 4): renewals that fail
for less than the medium's failover time pause the work, they do not release it — every
key and partition stays where it was, and work resumes as soon as a renewal lands on the
record the node held. A medium that never elects (failover time 0) fences at once, as
before; a record that expired meanwhile makes the node suspend and settle afresh."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from typing import Any

import pytest

from cloister import DynamicManager, Replace
from cloister.cluster import State
from tests._support.nodes import ClusterNodes
from tests._support.timing import Timing
from tests.manager._standalone import until

TIMING = Timing(heartbeat=0.05, failure_timeout=0.25)
ELECTION = 4 * TIMING.failure_timeout  # writes fail for four failure timeouts


class Ledger(DynamicManager):
    name = "ledger"
    partitions = 16

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.suspended: list[Any] = []

    def children_specs(self) -> dict[Any, Any]:
        return {f"k{i}": {"payload": 0} for i in range(30)}

    def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        return Replace(payload + message)

    def terminate(self, reason: str, id: Any, payload: Any) -> None:
        if reason == "suspend":
            self.suspended.append(id)


async def _three(stack: AsyncExitStack, name: str, failover: float) -> ClusterNodes:
    nodes = ClusterNodes(stack, f"memory://{name}", cluster=name, timing=TIMING)
    nodes.world.failover_time = failover
    for node in "abc":
        await nodes.start_manager(node, Ledger, consensus=3)
    clusters = list(nodes.clusters.values())
    await until(lambda: all(c.state is State.READY and len(c.siblings()) == 3 for c in clusters))
    return nodes


async def test_an_election_shorter_than_the_failover_time_pauses_and_releases_nothing() -> None:
    async with AsyncExitStack() as stack:
        nodes = await _three(stack, "election-pause", failover=10 * TIMING.failure_timeout)
        clusters, managers = nodes.clusters, nodes.managers
        for n in range(30):
            await managers["a"].cast(f"k{n}", 1)
        await until(lambda: sum(m.counters.casts for m in managers.values()) == 30)
        epoch = clusters["a"].epoch
        held = {n: set(m._region.consumers.partitions) for n, m in managers.items()}
        began = time.monotonic()
        nodes.world.elect(ELECTION)
        # Each node stops saying it is ready once its lease lapses...
        await until(lambda: all(c.state is not State.READY for c in clusters.values()))
        await asyncio.sleep(ELECTION - (time.monotonic() - began))
        # ...and is ready again soon after the new leader takes the renewals.
        resumed = await until(lambda: all(c.state is State.READY for c in clusters.values()))
        assert resumed < 1.0 + TIMING.failure_timeout
        assert all(c.epoch == epoch for c in clusters.values())  # nobody was expelled
        assert all(m.suspended == [] for m in managers.values())  # no worker was dropped
        assert {n: set(m._region.consumers.partitions) for n, m in managers.items()} == held
        assert all(c.counters.fenced >= 1 for c in clusters.values())  # it was noticed
        for n in range(30):
            await managers["b"].cast(f"k{n}", 1)
        await until(lambda: sum(m.counters.casts for m in managers.values()) == 60)
        await until(lambda: _total_now(nodes) == 60)


async def test_acks_waiting_when_the_lease_lapses_go_out_once_it_is_renewed() -> None:
    """The casts' acks are on their way when the election begins: storing their state
    fails (unavailable), then the lease lapses. They wait through the pause and are sent
    once a renewal lands — never dropped, which would leave their records pending until a
    new consumer took the partition (and handled them again)."""
    async with AsyncExitStack() as stack:
        nodes = await _three(stack, "election-acks", failover=10 * TIMING.failure_timeout)
        clusters, managers = nodes.clusters, nodes.managers
        for n in range(30):
            await managers["a"].cast(f"k{n}", 1)
        nodes.world.elect(ELECTION)  # at once: the acks of those casts are not out yet
        await until(lambda: all(c.paused for c in clusters.values()))
        await until(lambda: all(c.state is State.READY for c in clusters.values()), timeout=10)
        assert all(m.suspended == [] for m in managers.values())  # paused, not suspended
        depth = -1

        async def drained() -> bool:
            nonlocal depth
            depth = await managers["a"].inbox_depth()
            return depth == 0

        deadline = time.monotonic() + 3.0
        while not await drained() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert depth == 0, f"{depth} record(s) still pending after the pause"
        assert _total_now(nodes) == 30
        assert sum(m.counters.duplicates for m in managers.values()) == 0


def _total_now(nodes: ClusterNodes) -> int:
    return sum(
        info.payload
        for manager in nodes.managers.values()
        for worker_id in list(manager._engine.workers)
        if (info := manager.get(worker_id)) is not None
    )


@pytest.mark.parametrize("failover", [0.0, 2 * TIMING.failure_timeout])
async def test_a_medium_that_never_elects_or_an_outage_longer_than_that_suspends(
    failover: float,
) -> None:
    async with AsyncExitStack() as stack:
        nodes = await _three(stack, f"election-long-{int(failover * 100)}", failover=failover)
        managers = nodes.managers
        nodes.world.elect(ELECTION)
        await until(lambda: all(m.suspended for m in managers.values()), timeout=ELECTION + 2)
        clusters = list(nodes.clusters.values())
        await until(lambda: all(c.state is State.READY for c in clusters), timeout=10)
        for n in range(30):
            await managers["c"].cast(f"k{n}", 1)
        await until(lambda: _total_now(nodes) == 30)
