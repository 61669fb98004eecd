"""Fencing at the medium: a node that lost a partition cannot overwrite its new owner's
state, however stale its view — the medium refuses the write, the node drops its copy of
the partition's workers, stops consuming it, counts and logs the refusal."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import pytest

from cloister import DynamicManager, Replace
from cloister.backends import Guard, KeyValue, open_backend
from cloister.cluster import State
from cloister.errors import FencedError
from cloister.manager.claims import Claims, claim_key
from cloister.manager.ownership import ShardRegion
from cloister.manager.state import Stored, storage_key
from tests._support.nodes import ClusterNodes
from tests._support.timing import MEMORY

from ._standalone import until

IDS = [f"k{i}" for i in range(16)]


class Tally(DynamicManager):
    """Each cast appends to the payload: a stale write is visible at once."""

    name = "tally"

    def children_specs(self) -> dict[Any, Any]:
        return {i: {"payload": []} for i in IDS}

    def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        return Replace([*payload, message])


class Direct(Tally):
    """Casts straight to the owner (no inbox): payloads go out by the flush loop."""

    name = "direct"
    durable = False


@pytest.fixture
async def nodes() -> AsyncIterator[ClusterNodes]:
    async with AsyncExitStack() as stack:
        url = f"memory://fencing-{time.monotonic_ns()}"
        yield ClusterNodes(stack, url, cluster="fencing", timing=MEMORY)


def region_of(manager: DynamicManager) -> ShardRegion:
    region = manager._region  # the test looks inside: no affordance on the manager
    assert region is not None and region.claims is not None and region.table is not None
    return region


async def stored(kv: KeyValue, worker_id: Any) -> Any:
    entry = await kv.get(storage_key(worker_id), consistent=True)
    return None if entry is None else Stored.decode(entry.value).payload


async def test_a_zombie_flush_is_refused_and_the_new_owner_payload_stays_exact(
    nodes: ClusterNodes,
) -> None:
    a = await nodes.start_manager("a", Tally)
    b = await nodes.start_manager("b", Tally)
    await until(lambda: nodes.agreed({"a", "b"}) and a.state == "up" and b.state == "up")
    key = next(i for i in IDS if a.owner_of(i) == "a")
    kv = await nodes.clusters["b"].backend.kv("mgr-tally")
    for n in (1, 2, 3):
        await a.cast(key, n)
    await until(lambda: a.get(key) is not None and a.get(key).payload == [1, 2, 3])  # type: ignore[union-attr]
    await until_stored(kv, key, [1, 2, 3])
    zombie = region_of(a)
    partition = zombie.placement_now().partition_of(key)
    token = zombie.claims.tokens[partition]  # type: ignore[union-attr]

    nodes.world.partition(["a"])  # a stops hearing the medium: b takes its keys over
    await until(lambda: b.owner_of(key) == "b" and b.get(key) is not None, timeout=10)
    for n in (4, 5):
        await b.cast(key, n)
    await until_stored(kv, key, [1, 2, 3, 4, 5])
    assert region_of(b).claims.tokens[partition] > token  # type: ignore[union-attr]

    # a wakes up as a zombie: it still believes it holds the partition and flushes the
    # payload it had (what a process paused past its lease does before it notices).
    zombie.claims._tokens[partition] = Guard(claim_key(partition), token)  # type: ignore[union-attr]
    nodes.world.heal(["a"])
    zombie.table.mark(Stored(key, None, [1, 2, 3, "stale"], True, watermark=3))  # type: ignore[union-attr]
    with pytest.raises(FencedError, match="refused"):
        await zombie.table.flush([key])  # type: ignore[union-attr]
    assert await stored(kv, key) == [1, 2, 3, 4, 5]  # the medium kept b's, exactly
    assert a.counters.fenced_writes == 1
    assert zombie.claims.guard(partition) is None  # type: ignore[union-attr]
    assert key not in zombie.table.dirty  # type: ignore[union-attr]  # dropped, never retried


async def until_stored(kv: KeyValue, key: Any, payload: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (found := await stored(kv, key)) != payload:
        assert time.monotonic() < deadline, f"stored {found!r}, expected {payload!r}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("manager", [Tally, Direct], ids=["inbox-acks", "flush-loop"])
async def test_a_refused_write_drops_the_partition_and_its_records_stay_unacked(
    nodes: ClusterNodes, manager: type[Tally], caplog: pytest.LogCaptureFixture
) -> None:
    a = await nodes.start_manager("a", manager)
    await until(lambda: nodes.clusters["a"].state is State.READY and a.state == "up")
    region = region_of(a)
    key = IDS[0]
    partition = region.placement_now().partition_of(key)
    neighbours = [i for i in IDS if region.placement_now().partition_of(i) == partition]
    others = [i for i in IDS if i not in neighbours]
    await a.cast(key, 1)
    kv = await nodes.clusters["a"].backend.kv(f"mgr-{manager.name}")
    await until_stored(kv, key, [1])

    # Another node claims the partition at a newer epoch and writes its own payload.
    intruder = open_backend(nodes.url, "fencing", "intruder")
    await intruder.connect()
    theirs = Claims(await intruder.kv(f"mgr-{manager.name}"), "intruder")
    assert await theirs.claim({partition}, epoch=a.fence + 1) == set()
    await kv.put(
        storage_key(key),
        Stored(key, None, ["theirs"], True).encode(),
        guard=theirs.guard(partition),
    )

    await a.cast(key, 2)  # handled here (a does not know yet), its payload is refused
    await until(lambda: a.counters.fenced_writes >= 1)
    await until(lambda: all(a.get(i) is None for i in neighbours))  # the copy is dropped
    assert all(a.get(i) is not None for i in others)  # the other partitions go on
    assert await stored(kv, key) == ["theirs"]
    assert "refused" in caplog.text and f"partition {partition}" in caplog.text
    assert caplog.text.count("lost it to another claimant") == 1  # logged once
    # The claim names a newer epoch: settling again, a takes nothing of the partition.
    await until(lambda: region.lock.locked() is False)
    assert region.claims.guard(partition) is None  # type: ignore[union-attr]
    assert a.get(key) is None
    if region.consumers is not None:
        assert partition not in region.consumers.held_or_wanted
        assert region.inbox is not None and region.inbox.log is not None
        # the refused cast was not acked: the partition's real owner gets it
        assert await region.inbox.log.depth(partition) == 1
    await a.cast(others[0], 7)  # and the node keeps working its other partitions
    await until_stored(kv, others[0], [7])
    await intruder.close()
