"""The durable inbox on the memory backend: nothing lost, order kept, dedup, dead letters."""

from __future__ import annotations

import asyncio
import random
import time
from contextlib import AsyncExitStack
from typing import Any

import pytest

from cloister import CloisterError, Cluster, DynamicManager, Replace
from cloister.backends.memory import world
from cloister.cluster import State
from cloister.errors import BackendUnavailableError
from cloister.store.inbox import BackPressureError, Inbox
from cloister.testing import eventually
from tests._support.timing import MEMORY

from .support import Nodes

KEYS = [f"k{i}" for i in range(50)]


@pytest.fixture
async def nodes(request: pytest.FixtureRequest) -> Any:
    async with AsyncExitStack() as stack:
        url = f"memory://inbox-{request.node.name}"
        yield Nodes(stack, url, KEYS, timing=MEMORY)


async def produce(nodes: Nodes, per_key: int, *, pause: float = 0.0, msg_ids: bool = False) -> int:
    """Send 1..per_key to every key, each key's sequence from one sender, in order."""

    async def lane(key: str) -> None:
        for sequence in range(1, per_key + 1):
            msg_id = f"{key}-{sequence}" if msg_ids else None
            while True:  # a sender going down refuses the put (not acknowledged): try another
                sender = nodes.managers[random.choice(nodes.live_names())]
                try:
                    await sender.cast(key, sequence, msg_id=msg_id)
                    break
                except CloisterError:
                    await asyncio.sleep(0.001)
            if pause:
                await asyncio.sleep(pause)

    await asyncio.gather(*(lane(k) for k in KEYS))
    return per_key * len(KEYS)


def all_handled(nodes: Nodes, per_key: int) -> bool:
    return all(len(set(nodes.journal.handled[k])) == per_key for k in KEYS)


async def test_cast_is_durable_and_handled_in_order(nodes: Nodes) -> None:
    for name in "abc":
        await nodes.start(name)
    await eventually(lambda: all(c.state is State.READY for c in nodes.clusters.values()))
    await produce(nodes, 20)
    await eventually(lambda: all_handled(nodes, 20))
    nodes.assert_in_order_and_complete(20)
    assert sum(len(v) for v in nodes.journal.handled.values()) == 20 * len(KEYS)  # no duplicate
    depth = nodes.managers["a"].inbox_depth
    for _ in range(100):  # acks are sent right after handling, by a background task
        if await depth() == 0:
            break
        await asyncio.sleep(0.01)
    assert await depth() == 0  # acked ones are gone


async def test_nothing_lost_and_order_kept_through_leave_join_and_crash(nodes: Nodes) -> None:
    for name in "abc":
        await nodes.start(name)
    await eventually(lambda: all(c.state is State.READY for c in nodes.clusters.values()))
    per_key = 40
    producing = asyncio.ensure_future(produce(nodes, per_key, pause=0.003))
    await asyncio.sleep(0.03)
    await nodes.start("d")
    await asyncio.sleep(0.03)
    await nodes.managers["b"].stop()
    await nodes.clusters["b"].stop()
    await asyncio.sleep(0.03)
    world(nodes.url.removeprefix("memory://")).crash("c")  # kill -9 in the middle of the stream
    crashed_at = time.monotonic()  # no await since the crash: c can have handled nothing since
    await producing
    await eventually(lambda: all_handled(nodes, per_key), timeout=10)
    nodes.assert_in_order_and_complete(per_key)
    assert nodes.journal.overlaps == 0
    # keys really moved between nodes, and nothing was handled by c after it died
    assert any(len(set(n)) > 1 for n in nodes.journal.by_node.values())
    assert any(node == "c" for node, _, _ in nodes.journal.log)  # c did handle, before
    late = [entry for entry in nodes.journal.log if entry[0] == "c" and entry[2] >= crashed_at]
    assert not late, (crashed_at, late)


async def test_msg_id_drops_duplicates(nodes: Nodes) -> None:
    a = await nodes.start("a")
    await a.cluster.wait_ready(2)  # type: ignore[union-attr]
    for _ in range(3):  # a producer retrying the same messages
        for sequence in (1, 2, 3):
            await a.cast("k1", sequence, msg_id=f"k1-{sequence}")
    await eventually(lambda: len(nodes.journal.handled["k1"]) >= 3)
    await asyncio.sleep(0.05)
    assert nodes.journal.handled["k1"] == [1, 2, 3]
    # without ids, the same content is delivered again (at-least-once)
    await a.cast("k1", 4)
    await a.cast("k1", 4)
    await eventually(lambda: nodes.journal.handled["k1"][3:] == [4, 4])


async def test_failing_message_is_retried_then_parked_and_can_be_replayed(nodes: Nodes) -> None:
    a = await nodes.start("a")
    await a.cluster.wait_ready(2)  # type: ignore[union-attr]
    nodes.journal.fail["k2"] = 1  # fails once, then succeeds
    await a.cast("k2", 1)
    await eventually(lambda: nodes.journal.handled["k2"] == [1])
    assert a.counters["retries"] == 1
    nodes.journal.poison.add(("k3", 1))  # keeps failing: parked after max_attempts
    await a.cast("k3", 1)
    await a.cast("k3", 2)  # the key is not blocked for good
    await eventually(lambda: nodes.journal.handled["k3"] == [2])
    letters = await a.dead_letters()
    assert len(letters) == 1 and letters[0].key == "k3" and letters[0].message == 1
    assert "failing on purpose" in letters[0].reason and letters[0].attempts == 3
    nodes.journal.poison.clear()
    assert await a.replay() == 1
    await eventually(lambda: nodes.journal.handled["k3"] == [2, 1])
    assert await a.dead_letters() == []


async def test_unknown_key_and_malformed_records_are_parked_not_fatal(nodes: Nodes) -> None:
    a = await nodes.start("a")
    await a.cluster.wait_ready(2)  # type: ignore[union-attr]
    await a.cast("nobody", 1)
    inbox = a.inbox
    assert inbox is not None and inbox.log is not None
    await inbox.log.append(3, b"\xc1 not msgpack")
    await a.cast("k4", 7)
    await eventually(lambda: nodes.journal.handled["k4"] == [7])
    await eventually(lambda: a.counters["dead_letters"] >= 1)
    for _ in range(300):  # both are parked by background tasks: wait for the two letters
        reasons = [letter.reason for letter in await a.dead_letters()]
        if len(reasons) >= 2:
            break
        await asyncio.sleep(0.01)
    assert any("no worker with id 'nobody'" in r for r in reasons)
    assert any("undecodable" in r for r in reasons)


async def test_producers_feel_back_pressure() -> None:
    backend_world = world("inbox-backpressure")
    from cloister.backends.memory import MemoryBackend

    backend = MemoryBackend(backend_world.name, "bp", "p")
    await backend.connect()
    backend_world.delay("p", 0.05)  # a slow medium
    inbox = Inbox(backend, "bp", partitions=4, max_in_flight=2)
    await inbox.open()
    results = await asyncio.gather(
        *(inbox.put("k", i, timeout=0.06) for i in range(6)), return_exceptions=True
    )
    assert any(isinstance(r, BackPressureError) for r in results)
    assert any(isinstance(r, int) for r in results)
    message = str(next(r for r in results if isinstance(r, BackPressureError)))
    assert "not keeping up" in message
    await backend.close()


class Counter(DynamicManager):
    """Counts casts of "+" in its payload; any other message leaves the payload alone."""

    name = "counter"
    partitions = 4

    def children_specs(self) -> dict[Any, Any]:
        return {"c": {"payload": 0, "timeout": 0}}

    def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        return Replace(payload + 1) if message == "+" else None


async def test_only_new_payloads_are_stored_and_a_crash_keeps_them() -> None:
    url = "memory://inbox-stored-payloads"
    async with AsyncExitStack() as stack:
        managers = {}
        for node in ("a", "b"):
            cluster = Cluster("counting", node, backend=url, **MEMORY.options())
            await cluster.start()
            stack.push_async_callback(cluster.stop)
            managers[node] = await Counter.start(cluster)
            stack.push_async_callback(managers[node].stop)
        a = managers["a"]
        await a.cluster.wait_ready(2)  # type: ignore[union-attr]
        bucket = world("inbox-stored-payloads").bucket("counting", "mgr-counter")

        def stored() -> dict[str, int]:
            return {key: item.revision for key, item in bucket.items.items()}

        before = stored()

        for _ in range(20):  # leave the payload alone: nothing to store before the acks
            await a.cast("c", "noop")
        await eventually(lambda: sum(m.counters["casts"] for m in managers.values()) == 20)
        await _drained(a)
        assert stored() == before

        for _ in range(5):
            await a.cast("c", "+")
        owner = a.owner_of("c")
        # (the owner may still be settling the epoch b joined in: no worker "c" yet)
        await eventually(lambda: (managers[owner].get("c") or _NoInfo()).payload == 5)
        await _drained(a)
        assert stored() != before  # the new payload is stored before its ack

        world("inbox-stored-payloads").crash(owner)  # kill -9: the survivor takes over
        survivor = managers["b" if owner == "a" else "a"]
        await eventually(lambda: survivor.owner_of("c") == survivor.cluster.node, timeout=5)  # type: ignore[union-attr]
        await survivor.cast("c", "+")
        await eventually(lambda: (survivor.get("c") or _NoInfo()).payload == 6, timeout=5)


class _NoInfo:
    payload = None


async def _drained(manager: DynamicManager) -> None:
    for _ in range(300):
        if await manager.inbox_depth() == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the inbox was not drained")


async def test_acks_refused_while_the_medium_is_away_are_sent_again(nodes: Nodes) -> None:
    a = await nodes.start("a")
    await a.cluster.wait_ready(2)  # type: ignore[union-attr]
    consumers = a._region.consumers if a._region else None
    assert consumers is not None
    await eventually(lambda: len(consumers.partitions) == a.partitions)
    refused = []
    for consumer in consumers._consumers.values():
        real = consumer.ack_many

        async def flaky(records: Any, real: Any = real) -> None:
            if len(refused) < 3:  # the medium is away for the first few batches
                refused.append(len(records))
                raise BackendUnavailableError("away for a moment")
            await real(records)

        consumer.ack_many = flaky  # type: ignore[method-assign]
    for sequence in range(1, 11):
        await a.cast("k1", sequence)
    await eventually(lambda: nodes.journal.handled["k1"] == list(range(1, 11)))
    assert refused
    await _drained(a)  # acked after all: nothing left pending in the inbox
    assert consumers.in_flight == 0
