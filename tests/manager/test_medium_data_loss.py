"""A medium that lost its data (memory double): reported, and the cluster rebuilds itself.

``MemoryWorld.lose_data`` plays a nats-server restarted with an empty store: every bucket
and log is empty, revisions count from 1, consumers are gone. The cluster must say so
(log, counter, ``info``), publish a new epoch, settle, and handle new casts — never stay
wedged on compare-and-sets over records that no longer exist.
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from typing import Any

import pytest

from cloister.cluster import State
from cloister.testing import eventually
from tests._support import counter
from tests._support.nodes import ClusterNodes
from tests._support.timing import MEMORY

KEYS = [f"k{i}" for i in range(40)]


class Counter(counter.Counter):
    keys = tuple(KEYS)


@pytest.fixture
async def nodes(request: pytest.FixtureRequest) -> Any:
    async with AsyncExitStack() as stack:
        yield ClusterNodes(stack, f"memory://loss-{request.node.name}", timing=MEMORY)


async def counts(manager: Counter) -> dict[str, int]:
    return {key: await manager.call(key, None) for key in KEYS}


def all_ready(nodes: ClusterNodes, above: int) -> bool:
    live = nodes.live()
    return all(c.state is State.READY and c.epoch > above for c in live) and (
        len({c.epoch for c in live}) == 1
    )


async def test_a_medium_that_lost_its_data_is_reported_and_rebuilt(
    nodes: ClusterNodes, caplog: pytest.LogCaptureFixture
) -> None:
    for name in "abc":
        await nodes.start_manager(name, Counter, consensus=3)
    for cluster in nodes.clusters.values():
        await cluster.wait_ready(5)
    a = nodes.managers["a"]
    for key in KEYS:
        await a.cast(key, 1)
    await eventually(lambda: _all_equal(nodes, 1), what="every cast handled")
    before = max(c.epoch for c in nodes.clusters.values())

    with caplog.at_level(logging.INFO, logger="cloister"):
        nodes.world.lose_data()
        await eventually(lambda: all_ready(nodes, before), what="a new epoch, every node ready")

    # Reported: once per node at ERROR, counted, in the node's info.
    losses = [r for r in caplog.records if "lost its data" in r.getMessage()]
    assert {r.levelno for r in losses} == {logging.ERROR}
    assert sorted(r.getMessage().split(":")[0] for r in losses) == [
        "node a",
        "node b",
        "node c",
    ]
    for cluster in nodes.clusters.values():
        assert cluster.counters.medium_data_loss == 1
        info = cluster.info
        assert info.data_losses == 1 and not info.rebuilding
        assert info.last_data_loss is not None and info.last_data_loss.epoch == before
    # The stored state of every key was lost, and reported by the node that took it.
    lost = sum(m.counters.state_lost for m in nodes.managers.values())
    assert lost == len(KEYS)
    assert any("lost the stored state" in r.getMessage() for r in caplog.records)

    # The cluster works again: partitions claimed anew, consumers created anew.
    for key in KEYS:
        await a.cast(key, 10)
    await eventually(lambda: _all_equal(nodes, 10), what="casts after the loss handled")
    assert set((await counts(a)).values()) == {10}  # from the spec, plus the new cast


async def test_a_node_that_joins_after_the_loss_becomes_ready(nodes: ClusterNodes) -> None:
    for name in "ab":
        await nodes.start_manager(name, Counter)
    await eventually(lambda: nodes.agreed({"a", "b"}))
    before = nodes.clusters["a"].epoch
    nodes.world.lose_data()
    await eventually(lambda: all_ready(nodes, before), what="rebuilt")
    await nodes.start_manager("c", Counter)
    await eventually(lambda: nodes.agreed({"a", "b", "c"}), what="the newcomer is ready")
    assert nodes.clusters["c"].counters.medium_data_loss == 0  # it never knew the old data


def _all_equal(nodes: ClusterNodes, value: int) -> bool:
    seen = {}
    for manager in nodes.managers.values():
        for key in manager.ids():
            worker = manager.get(key)
            if worker is not None:
                seen[key] = worker.payload
    return len(seen) == len(KEYS) and set(seen.values()) == {value}
