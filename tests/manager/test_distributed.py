"""DynamicManager over a cluster (memory backend): routing, handoff, fencing, state handoff."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from typing import Any

import pytest

from cloister import Cluster, DynamicManager
from cloister.cluster import State
from cloister.testing import eventually

from ._distributed import FAILURE_TIMEOUT, HEARTBEAT, IDS, Ledger, Nodes


@pytest.fixture
async def nodes(request: pytest.FixtureRequest) -> Any:
    async with AsyncExitStack() as stack:
        yield Nodes(stack, f"mgr-{request.node.name}", Ledger())


async def test_only_owned_ids_run_and_calls_are_routed(nodes: Nodes) -> None:
    for name in "abc":
        await nodes.start(name)
    await eventually(nodes.settled, what="every id live on its owner")
    a = nodes.managers["a"]
    sizes = [len(m.ids()) for m in nodes.managers.values()]
    assert sum(sizes) == len(IDS) and min(sizes) > 0
    for worker_id in IDS[:30]:
        reply = await a.call(worker_id, "ping")
        assert reply["node"] == a.owner_of(worker_id)
        assert reply["id"] == worker_id and reply["m"] == "ping"
    # casts from any node reach the owner, in order
    remote = next(i for i in IDS if a.owner_of(i) != "a")
    before = (await a.call(remote, None))["payload"]
    for _ in range(5):
        await a.cast(remote, 1000)
    await eventually(
        lambda: nodes.managers[a.owner_of(remote)].get(remote).payload >= before + 5000
    )  # type: ignore[union-attr]


async def test_handoff_on_join_leave_and_crash_never_runs_a_key_twice(nodes: Nodes) -> None:
    for name in "abc":
        await nodes.start(name)
    await eventually(nodes.settled)
    await asyncio.sleep(0.1)
    assert {node for node, _, _ in nodes.ledger.performs} == {"a", "b", "c"}, {
        k: (
            len(m.ids()),
            m.state,
            m._engine.paused,
            len(m._engine.timers),
            m._engine.in_flight,
            len(m._engine.runnable),
        )
        for k, m in nodes.managers.items()
    }
    await nodes.start("d")
    await eventually(nodes.settled, what="after join")
    await nodes.clusters["b"].stop()
    left_at = time.monotonic()  # b has left: stop() returned
    await eventually(nodes.settled, what="after graceful leave")
    nodes.world.crash("c")
    crashed_at = time.monotonic()  # no await since the crash: c can have started nothing since
    await eventually(nodes.settled, what="after crash", timeout=5)
    await asyncio.sleep(0.1)
    assert nodes.ledger.overlaps == []
    performed_by = {node for node, _, _ in nodes.ledger.performs}
    assert performed_by == {"a", "b", "c", "d"}
    # after b left and c died, nothing performed there any more
    after = {"b": left_at, "c": crashed_at}
    late = [p for p in nodes.ledger.performs if p[0] in after and p[2] >= after[p[0]]]
    assert not late, (after, late)


async def test_graceful_leave_hands_over_replaced_payloads(nodes: Nodes) -> None:
    for name in "ab":
        await nodes.start(name)
    await eventually(nodes.settled)
    await asyncio.sleep(0.3)  # let the payloads count up
    leaving = nodes.managers["b"]
    moved = set(leaving.ids())
    assert moved
    await nodes.clusters["b"].stop()
    final = {i: nodes.ledger.terminated[i] for i in moved}
    assert all(reason == "handoff" and node == "b" for node, reason, _ in final.values())
    await eventually(nodes.settled)
    survivor = nodes.managers["a"]
    for worker_id in moved:
        info = survivor.get(worker_id)
        assert info is not None
        assert info.payload >= final[worker_id][2] > 0  # continued, not restarted from 0


async def test_rolling_stop_hands_over_to_nodes_still_there(
    nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    for name in "abc":
        await nodes.start(name, heartbeat=0.5, failure_timeout=2.5)  # epochs come slowly
    await eventually(nodes.settled, timeout=10)
    await asyncio.sleep(0.3)  # let the payloads count up
    epoch = nodes.clusters["a"].epoch
    moved = set(nodes.managers["b"].ids()) | set(nodes.managers["c"].ids())
    for name in "cb":  # c goes, then b at once, then a last
        await nodes.managers[name].stop()
        await nodes.clusters[name].stop()
        if name == "c":  # b's ring still names c: no epoch without it yet
            assert nodes.clusters["b"].epoch == epoch and "c" in nodes.clusters["b"].ring
    assert "failed" not in caplog.text  # b handed its workers to a, not to c (gone)
    await eventually(nodes.settled, timeout=10)
    survivor = nodes.managers["a"]
    for worker_id in moved:
        info = survivor.get(worker_id)
        assert info is not None and info.payload >= nodes.ledger.terminated[worker_id][2] > 0
    await survivor.stop()  # the last one out stores the payloads: nobody to ship to
    await nodes.clusters["a"].stop()
    assert "failed" not in caplog.text
    last = {i: nodes.ledger.terminated[i][2] for i in IDS}
    fresh = await nodes.start("d", heartbeat=0.5, failure_timeout=2.5)
    await eventually(lambda: len(fresh) == len(IDS), timeout=10)
    for worker_id in IDS:  # a cluster started again continues from them
        info = fresh.get(worker_id)
        assert info is not None and info.payload >= last[worker_id] > 0


async def test_no_worker_performs_while_short_of_consensus(nodes: Nodes) -> None:
    for name in "ab":
        await nodes.start(name, consensus=2)
    await eventually(nodes.settled)
    nodes.world.crash("b")
    await eventually(
        lambda: (
            nodes.clusters["a"].state is State.REHASHING
            and nodes.managers["a"].state == "rehashing"
        )
    )
    await asyncio.sleep(0.05)
    count = sum(1 for p in nodes.ledger.performs if p[0] == "a")
    await asyncio.sleep(0.3)
    assert sum(1 for p in nodes.ledger.performs if p[0] == "a") == count
    await nodes.start("c", consensus=2)
    await eventually(nodes.settled)
    await eventually(lambda: sum(1 for p in nodes.ledger.performs if p[0] == "a") > count)


async def test_runtime_put_and_delete_reach_the_owner_from_any_node(nodes: Nodes) -> None:
    for name in "abc":
        await nodes.start(name)
    await eventually(nodes.settled)
    a = nodes.managers["a"]
    new_ids = [("extra", n) for n in range(12)]
    for worker_id in new_ids:
        await a.put(worker_id, payload=100, timeout=0)
    for worker_id in new_ids:
        owner = a.owner_of(worker_id)
        info = nodes.managers[owner].get(worker_id)
        assert info is not None and info.payload == 100
        assert (await a.call(worker_id, "x"))["node"] == owner
    await a.delete(new_ids[0])
    owner = a.owner_of(new_ids[0])
    assert nodes.managers[owner].get(new_ids[0]) is None
    # a node that joins later knows about the runtime workers it comes to own
    await nodes.start("d")
    await eventually(lambda: nodes.clusters["d"].state is State.READY)
    d_owned = [i for i in new_ids[1:] if nodes.managers["d"].owner_of(i) == "d"]
    await eventually(lambda: all(nodes.managers["d"].get(i) is not None for i in d_owned))


class Many(DynamicManager):
    """25,000 idle workers; ``init`` notes how far a ticker task had got."""

    name = "many"
    ticks = 0
    seen: list[int]

    def children_specs(self) -> dict[Any, Any]:
        return {f"w{i}": {"timeout": 0, "payload": 0} for i in range(25_000)}

    def init(self, id: Any, payload: Any) -> Any:
        self.seen.append(Many.ticks)
        return payload


async def test_taking_over_many_workers_lets_the_event_loop_run() -> None:
    async def ticker() -> None:
        while True:
            Many.ticks += 1
            await asyncio.sleep(0)

    ticking = asyncio.ensure_future(ticker())
    url = "memory://manager-many"
    try:
        async with AsyncExitStack() as stack:
            managers = []
            for node in ("a", "b"):
                cluster = Cluster("many", node, backend=url, heartbeat=0.1, failure_timeout=0.5)
                await cluster.start()
                stack.push_async_callback(cluster.stop)
                manager_cls = type("M", (Many,), {"seen": []})
                managers.append(await manager_cls.start(cluster))
                stack.push_async_callback(managers[-1].stop)
            await eventually(
                lambda: all(len(m) for m in managers) and sum(len(m) for m in managers) == 25_000,
                timeout=20,
            )
            for manager in managers:
                seen = manager.seen
                assert len(seen) >= 10_000
                # Heartbeats and running workers were not held up while it took them over.
                assert seen[-1] > seen[0]
    finally:
        ticking.cancel()


async def test_whois_and_mine_give_the_node_that_runs_each_worker(nodes: Nodes) -> None:
    for name in "abc":
        await nodes.start(name)
    await eventually(nodes.settled, what="every id live on its owner")
    for node, cluster in nodes.clusters.items():
        manager = nodes.managers[node]
        for worker_id in IDS:
            runs_on = next(n for n, m in nodes.managers.items() if worker_id in m.ids())
            assert cluster.whois(worker_id, manager=manager) == runs_on
            assert cluster.whois(worker_id, manager=type(manager)) == runs_on
            assert manager.owner_of(worker_id) == runs_on
            assert cluster.mine(worker_id, manager=manager) is (runs_on == node)
            # a manager with default partitions and no group of its own: plain whois/mine
            assert cluster.whois(worker_id) == runs_on
            assert cluster.mine(worker_id) is (runs_on == node)


async def test_whois_follows_a_managers_own_partitions_and_group(nodes: Nodes) -> None:
    class Wide(DynamicManager):
        name = "wide"
        partitions = 7

        def children_specs(self) -> dict[Any, Any]:
            return {i: {} for i in IDS}

    managers = {}
    for name in "abc":
        cluster = Cluster(
            "mgr",
            name,
            backend=nodes.url,
            heartbeat=HEARTBEAT,
            failure_timeout=FAILURE_TIMEOUT,
            groups=[Wide.placement_group()] if name != "c" else [],
        )
        await cluster.start()
        nodes.stack.push_async_callback(cluster.stop)
        nodes.clusters[name] = cluster
        managers[name] = await Wide.start(cluster)
        nodes.stack.push_async_callback(managers[name].stop)
    await eventually(
        lambda: (
            all(c.state is State.READY and len(c.siblings()) == 3 for c in nodes.clusters.values())
            and sum(len(m.ids()) for m in managers.values()) == len(IDS)
        )
    )
    assert managers["c"].ids() == []  # not in the manager's group: runs none of its workers
    c = nodes.clusters["c"]
    for worker_id in IDS:
        runs_on = next(n for n, m in managers.items() if worker_id in m.ids())
        assert c.whois(worker_id, manager=Wide) == runs_on
        assert managers["c"].owner_of(worker_id) == runs_on
    assert len({c.whois(i, manager=Wide) for i in IDS}) == 2


async def test_a_node_that_only_gives_partitions_up_does_not_reload_the_state(
    nodes: Nodes,
) -> None:
    a = await nodes.start("a")
    await eventually(nodes.settled, what="every id live on a")
    region = a._region
    assert region is not None and region.table is not None
    loads = 0
    load = region.table.load

    async def counted(**how: Any) -> Any:
        nonlocal loads
        loads += 1
        return await load(**how)

    region.table.load = counted  # type: ignore[method-assign]
    await nodes.start("b")  # a only loses partitions to b: its mirror is all it needs
    await eventually(nodes.settled, what="every id live on its owner")
    assert len(b_ids := nodes.managers["b"].ids()) > 0 and set(b_ids).isdisjoint(a.ids())
    assert loads == 0
    nodes.world.crash("b")  # now partitions come back to a: their state is read again
    await eventually(lambda: len(a.ids()) == len(IDS), what="a took b's workers over")
    assert loads >= 1
