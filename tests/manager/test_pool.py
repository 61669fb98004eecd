"""Pool mode (Tarearbol.Pool): ``call(None, msg)`` / ``cast(None, msg)`` pick a worker."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from cloister.manager import UnknownWorkerError

from ._standalone import Recorder, running, until

WORKERS = [f"w{i}" for i in range(8)]


class Pool(Recorder):
    SPECS = {i: {"payload": i, "timeout": 0} for i in WORKERS}

    async def handle_call(self, message: Any, id: Any, payload: Any) -> Any:
        if message == "slow":
            await asyncio.sleep(0.2)
        return id

    def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        self.events.append(("cast", message, id))


@pytest.mark.parametrize("pickup", ["random", "first_free", "hash"])
async def test_pool_call_and_cast_reach_a_worker(pickup: str) -> None:
    async with running(Pool, pickup=pickup) as manager:
        assert await manager.call(None, "who") in WORKERS
        assert await manager.cast(None, "hello") is None
        await until(lambda: manager.of("cast"))
        ((message, worker_id),) = manager.of("cast")
        assert message == "hello" and worker_id in WORKERS


async def test_random_pickup_spreads_over_the_workers() -> None:
    async with running(Pool, pickup="random") as manager:
        chosen = Counter([await manager.call(None, n) for n in range(200)])
    assert len(chosen) >= 6  # 8 workers, 200 picks: all but astronomically unlikely


async def test_random_pickup_prefers_free_workers() -> None:
    async with running(Pool, pickup="random") as manager:
        busy = [asyncio.create_task(manager.call(None, "slow")) for _ in range(7)]
        await until(lambda: sum(bool(manager.get(i).busy_since) for i in WORKERS) == 7)
        busy_ids = {i for i in WORKERS if manager.get(i).busy_since}
        (free,) = set(WORKERS) - busy_ids
        assert {await manager.call(None, "quick") for _ in range(10)} == {free}
        assert set(await asyncio.gather(*busy)) == busy_ids


async def test_first_free_pickup_takes_the_first_idle_worker() -> None:
    async with running(Pool, pickup="first_free") as manager:
        assert [await manager.call(None, "quick") for _ in range(3)] == ["w0"] * 3
        slow0 = asyncio.create_task(manager.call(None, "slow"))
        await until(lambda: manager.get("w0").busy_since)
        assert await manager.call(None, "quick") == "w1"
        slow1 = asyncio.create_task(manager.call(None, "slow"))
        await until(lambda: manager.get("w1").busy_since)
        assert await manager.call(None, "quick") == "w2"
        assert await asyncio.gather(slow0, slow1) == ["w0", "w1"]
        assert await manager.call(None, "quick") == "w0"


async def test_first_free_pickup_queues_on_the_first_worker_when_all_are_busy() -> None:
    async with running(Pool, pickup="first_free") as manager:
        busy = [asyncio.create_task(manager.call(None, "slow")) for _ in WORKERS]
        await until(lambda: all(manager.get(i).busy_since for i in WORKERS))
        assert sorted(await asyncio.gather(*busy)) == WORKERS
        # a cast while every worker was busy lands somewhere; nothing is lost
        await manager.cast(None, "late")
        await until(lambda: manager.of("cast") == [("late", "w0")])


async def test_hash_pickup_is_deterministic_per_message() -> None:
    async with running(Pool, pickup="hash") as manager:
        first = {m: await manager.call(None, m) for m in range(50)}
        again = {m: await manager.call(None, m) for m in range(50)}
        assert first == again
        assert len(set(first.values())) >= 5  # different messages spread
        # unhashable messages (dicts) are hashed by their encoding
        a = await manager.call(None, {"k": [1, 2]})
        assert a == await manager.call(None, {"k": [1, 2]})
        for message in ("text", b"bytes", ("t", 1)):
            assert await manager.call(None, message) == await manager.call(None, message)
            await manager.cast(None, message)
        await until(lambda: len(manager.of("cast")) == 3)
        for message, worker_id in manager.of("cast"):
            assert worker_id == await manager.call(None, message)


async def test_hash_pickup_gives_the_same_worker_in_another_manager() -> None:
    picks = []
    for _ in range(2):
        async with running(Pool, pickup="hash") as manager:
            picks.append([await manager.call(None, f"m{n}") for n in range(20)])
    assert picks[0] == picks[1]


@pytest.mark.parametrize("pickup", ["random", "first_free", "hash"])
async def test_pool_mode_without_workers_raises(pickup: str) -> None:
    async with running(Recorder, pickup=pickup) as manager:
        with pytest.raises(UnknownWorkerError, match="no live worker"):
            await manager.call(None, "m")
        with pytest.raises(UnknownWorkerError, match="no live worker"):
            await manager.cast(None, "m")
