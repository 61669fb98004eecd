"""One answer to "who owns this key" on a real nats-server: for every id, the node that
runs the worker is what ``whois``, ``mine`` and ``owner_of`` say on every node — before
and after a node joins."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from typing import Any

from cloister import Cluster, DynamicManager
from cloister.cluster import State
from cloister.testing import NatsServer

IDS = [f"order-{i}" for i in range(300)]


class Orders(DynamicManager):
    name = "orders"
    partitions = 16  # not the default: whois(key) alone would be the wrong question

    def children_specs(self) -> dict[Any, Any]:
        return {i: {} for i in IDS}


async def _until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} not true within {timeout}s"
        await asyncio.sleep(0.05)


def _agree(clusters: dict[str, Cluster], managers: dict[str, Orders]) -> None:
    runs_on: dict[Any, list[str]] = {}
    for node, manager in managers.items():
        for worker_id in manager.ids():
            runs_on.setdefault(worker_id, []).append(node)
    assert sorted(runs_on) == sorted(IDS)
    assert all(len(nodes) == 1 for nodes in runs_on.values()), "an id lives on two nodes"
    for node, cluster in clusters.items():
        for worker_id, (owner,) in runs_on.items():
            assert cluster.whois(worker_id, manager=Orders) == owner
            assert cluster.whois(worker_id, manager=managers[node]) == owner
            assert cluster.mine(worker_id, manager=Orders) is (owner == node)
            assert managers[node].owner_of(worker_id) == owner


async def test_whois_mine_and_owner_of_name_the_node_that_runs_each_id(
    nats_server: NatsServer,
) -> None:
    async with AsyncExitStack() as stack:
        clusters: dict[str, Cluster] = {}
        managers: dict[str, Orders] = {}

        async def start(node: str) -> None:
            cluster = Cluster(
                "placement", node, backend=nats_server.url, heartbeat=0.5, failure_timeout=2.0
            )
            await cluster.start()
            stack.push_async_callback(cluster.stop)
            managers[node] = await Orders.start(cluster)
            stack.push_async_callback(managers[node].stop)
            clusters[node] = cluster

        def settled() -> bool:
            return all(
                c.state is State.READY and set(c.siblings()) == set(clusters)
                for c in clusters.values()
            ) and sum(len(m.ids()) for m in managers.values()) == len(IDS)

        for node in "abc":
            await start(node)
        await _until(settled, 20, "three nodes settled")
        _agree(clusters, managers)
        await start("d")
        await _until(settled, 20, "four nodes settled")
        _agree(clusters, managers)
        assert all(managers[n].ids() for n in "abcd"), "every node runs some ids"
