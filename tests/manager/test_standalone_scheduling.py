"""DynamicManager without a cluster: timers, one callback at a time, concurrency, scale."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from typing import Any

from cloister import DynamicManager, Ok
from cloister.manager import WorkerInfo
from cloister.manager.scheduler import phase

from ._standalone import Recorder, running, until


class Ticker(Recorder):
    """Records the loop time of every perform of every worker in ``ticks``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ticks: list[tuple[Any, float]] = []

    def perform(self, id: Any, payload: Any) -> Any:
        self.ticks.append((id, time.monotonic()))
        return Ok(None)

    def count(self, worker_id: Any = None, since: float = 0.0) -> int:
        return sum(1 for i, t in self.ticks if t >= since and (worker_id is None or i == worker_id))


async def test_periodic_performs_follow_the_timeout() -> None:
    class P(Ticker):
        SPECS = {"fast": {"timeout": 0.02}, "slow": {"timeout": 0.1}, "idle": {"timeout": 0}}

    async with running(P) as manager:
        await asyncio.sleep(0.5)
        fast, slow = manager.count("fast"), manager.count("slow")
    assert 10 <= fast <= 26, fast
    assert 3 <= slow <= 5, slow
    assert manager.count("idle") == 0  # timeout 0: never periodic


async def test_periodic_performs_keep_to_their_grid_after_a_late_one() -> None:
    """Performs are due at start + k x timeout: a late perform does not shift the next."""

    class P(Ticker):
        SPECS = {"a": {"timeout": 0.05}}

    async with running(P) as manager:
        await until(lambda: manager.count("a") >= 3)
        time.sleep(0.135)  # noqa: ASYNC251 - the next perform is 85 ms late
        blocked = len(manager.ticks)
        await until(lambda: manager.count("a") >= blocked + 6, timeout=3)
    times = [t for _, t in manager.ticks]
    first = times[0]
    assert times[blocked] - times[blocked - 1] > 0.13  # the late one
    # the ones after it are back on the grid of the first perform (the wheel rounds due
    # times up to 5 ms ticks); one interval after the late perform would be ~35 ms off
    offsets = sorted(min(d, 0.05 - d) for d in ((t - first) % 0.05 for t in times[blocked + 1 :]))
    assert offsets[len(offsets) // 2] < 0.012, offsets
    gaps = [b - a for a, b in itertools.pairwise(times[blocked:])]
    assert min(gaps) > 0.005, gaps  # and no burst: one perform per tick


async def test_first_perform_waits_its_phase_a_delay_or_nothing() -> None:
    """The first perform of a periodic worker falls at its id's phase of the period
    (``instant_perform`` False), at once (True), or after a delay in ms (an int)."""

    class P(Ticker):
        SPECS = {
            "x": {"timeout": 0.2},  # phase 0.17 s of 0.2 s
            "now": {"timeout": 0.2, "instant_perform": True},
            "once": {"timeout": 0, "instant_perform": True},
            "delayed": {"timeout": 0, "instant_perform": 120},
        }

    assert phase("x", 0.2) > 0.15
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with running(P) as manager:
        await until(lambda: manager.count("now") and manager.count("once"))
        assert manager.count("x") == 0
        await until(lambda: manager.count("x") and manager.count("delayed"))
        (first,) = [t for i, t in manager.ticks if i == "x"]
        assert first - started >= phase("x", 0.2)
        (delayed,) = [t for i, t in manager.ticks if i == "delayed"]
        assert delayed - started >= 0.12
        await asyncio.sleep(0.1)
        assert manager.count("once") == 1  # instant, then never again (timeout 0)
        assert manager.count("delayed") == 1  # after its delay, then never again
        second = [t for i, t in manager.ticks if i == "x"][1:2]
    assert not second or second[0] - first >= 0.19  # then one period after the first


def test_phases_are_fixed_per_id_and_spread_over_the_period() -> None:
    ids = [f"foo_{i}" for i in range(100_000)]
    phases = [phase(i, 5.0) for i in ids]
    assert phases == [phase(i, 5.0) for i in ids]  # deterministic
    assert all(0.0 < p <= 5.0 for p in phases)
    # evenly spread: each tenth of the period holds about a tenth of the ids
    counts = Counter(min(9, int(p / 0.5)) for p in phases)
    assert all(9_000 < counts[k] < 11_000 for k in range(10)), counts
    assert phase(("tenant", 7), 2.0) == phase(("tenant", 7), 4.0) / 2


async def test_missed_ticks_coalesce_after_the_loop_was_blocked() -> None:
    class P(Ticker):
        SPECS = {i: {"timeout": 0.05} for i in range(100)}

    loop = asyncio.get_running_loop()
    async with running(P) as manager:
        await until(lambda: all(manager.count(i) >= 2 for i in range(100)))
        blocked_at = loop.time()
        time.sleep(0.5)  # noqa: ASYNC251 - blocking the loop is the point: ~10 ticks missed
        unblocked_at = loop.time()
        await asyncio.sleep(0.03)  # less than one interval
        during = manager.count(since=blocked_at)
        # every worker performs once right after the pause — not ~10 times each; first due
        # times are spread over the period, so in those 30 ms (0.6 of it) up to ~60% of the
        # workers reach their next grid point too (and at most twice each, below)
        assert 100 <= during <= 200, during
        per_worker = Counter(i for i, t in manager.ticks if t >= blocked_at)
        assert max(per_worker.values()) <= 2, per_worker.most_common(3)
        assert all(t >= unblocked_at for i, t in manager.ticks if t >= blocked_at)
        # and then the normal rhythm resumes
        resumed = loop.time()
        await asyncio.sleep(0.25)
        assert 3 <= manager.count(0, since=resumed) <= 6


async def test_a_perform_slower_than_its_interval_is_not_followed_by_a_burst() -> None:
    class P(Ticker):
        SPECS = {"a": {"timeout": 0.05}}

        async def perform(self, id: Any, payload: Any) -> Any:
            super().perform(id, payload)
            if len(self.ticks) == 2:
                await asyncio.sleep(0.5)  # 10 intervals
                self.events.append(("slow done", asyncio.get_running_loop().time()))
            return Ok(None)

    async with running(P) as manager:
        await until(lambda: manager.of("slow done"), timeout=3)
        ((done,),) = manager.of("slow done")
        await asyncio.sleep(0.04)
        # the ticks missed while it ran make one perform, at once; then the grid resumes
        assert 1 <= manager.count(since=done) <= 2
        assert min(t for _, t in manager.ticks if t >= done) - done < 0.02


async def test_handle_timeout_when_a_perform_runs_longer_than_lull_times_timeout() -> None:
    class P(Recorder):
        SPECS = {
            "slow": {"timeout": 0.05, "lull": 2.0},  # threshold 0.1 s
            "fine": {"timeout": 0.05, "lull": 2.0},
        }

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.infos: list[WorkerInfo] = []

        async def perform(self, id: Any, payload: Any) -> Any:
            if id == "slow" and not self.of("exit"):
                await asyncio.sleep(0.3)
                self.events.append(("exit", id))
            else:
                await asyncio.sleep(0.01)
            return Ok(id)

        async def handle_timeout(self, info: WorkerInfo) -> None:
            await asyncio.sleep(0)
            self.infos.append(info)

    loop = asyncio.get_running_loop()
    async with running(P) as manager:
        await until(lambda: manager.infos, timeout=3)
        (info,) = manager.infos
        assert info.id == "slow"
        assert info.busy_since is not None and loop.time() - info.busy_since >= 0.1
        assert manager.counters["timeouts"] == 1
        assert not manager.of("exit")  # reported while still running: not cancelled
        await until(lambda: manager.of("exit"))
        await asyncio.sleep(0.2)
        assert len(manager.infos) == 1  # the later, quick performs are not slow
        assert manager.get("slow").last_result == "slow"


async def test_one_callback_at_a_time_per_worker() -> None:
    """A slow handle_cast, performs and calls of one id never overlap."""

    class P(Recorder):
        SPECS = {i: {"timeout": 0.004} for i in range(8)}

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.active: set[Any] = set()
            self.overlaps: list[tuple[str, Any]] = []
            self.intervals: dict[Any, list[tuple[float, float, str]]] = {}

        async def _occupy(self, what: str, id: Any, seconds: float) -> None:
            loop = asyncio.get_running_loop()
            if id in self.active:
                self.overlaps.append((what, id))
            self.active.add(id)
            entered = loop.time()
            await asyncio.sleep(seconds)
            self.active.discard(id)
            self.intervals.setdefault(id, []).append((entered, loop.time(), what))

        async def perform(self, id: Any, payload: Any) -> Any:
            await self._occupy("perform", id, 0.003)

        async def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
            await self._occupy("cast", id, 0.02)

        async def handle_call(self, message: Any, id: Any, payload: Any) -> Any:
            await self._occupy("call", id, 0.001)
            return message

    async with running(P) as manager:
        for round_ in range(5):
            for worker_id in range(8):
                await manager.cast(worker_id, round_)
            assert await manager.call(round_, "ping") == "ping"
            await asyncio.sleep(0.01)
        await until(lambda: manager.counters["casts"] == 40, timeout=5)
    assert manager.overlaps == []
    for worker_id, intervals in manager.intervals.items():
        kinds = {what for _, _, what in intervals}
        assert {"perform", "cast"} <= kinds, (worker_id, kinds)
        intervals.sort()
        for (_, end, _), (start, _, _) in itertools.pairwise(intervals):
            assert start >= end, (worker_id, intervals)


async def test_sync_callback_and_suspended_perform_never_overlap() -> None:
    """A sync handle_cast arriving while an async perform is suspended waits for it."""

    class P(Recorder):
        SPECS = {"a": {"timeout": 0, "instant_perform": True}}

        async def perform(self, id: Any, payload: Any) -> Any:
            self.events.append(("perform enter",))
            await asyncio.sleep(0.05)
            self.events.append(("perform exit",))

        def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
            self.events.append(("cast", message))

    async with running(P) as manager:
        await until(lambda: manager.of("perform enter"))
        await manager.cast("a", 1)
        await manager.cast("a", 2)
        await until(lambda: len(manager.of("cast")) == 2)
        kinds = [e[0] for e in manager.events if e[0] != "state"]
        assert kinds == ["perform enter", "perform exit", "cast", "cast"]


async def test_concurrency_limit_bounds_suspended_callbacks() -> None:
    class P(Recorder):
        SPECS = {i: {"timeout": 0.01, "instant_perform": True} for i in range(10)}

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.now = self.peak = 0
            self.done: Counter[Any] = Counter()

        async def perform(self, id: Any, payload: Any) -> Any:
            self.now += 1
            self.peak = max(self.peak, self.now)
            await asyncio.sleep(0.02)
            self.now -= 1
            self.done[id] += 1

        async def handle_call(self, message: Any, id: Any, payload: Any) -> Any:
            return await self.perform(id, payload)

    async with running(P, concurrency=2) as manager:
        await until(lambda: len(manager.done) == 10, timeout=5)  # everyone gets a turn
        assert await manager.call(3, "also limited", timeout=5) is None
        await asyncio.sleep(0.1)
        assert manager.peak == 2
        assert manager._engine.in_flight <= 2
    assert min(manager.done.values()) >= 1


async def test_default_concurrency_runs_suspended_callbacks_side_by_side() -> None:
    class P(Recorder):
        SPECS = {i: {"timeout": 0, "instant_perform": True} for i in range(50)}

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.now = self.peak = 0

        async def perform(self, id: Any, payload: Any) -> Any:
            self.now += 1
            self.peak = max(self.peak, self.now)
            await asyncio.sleep(0.05)
            self.now -= 1
            self.events.append(("done", id))

    loop = asyncio.get_running_loop()
    started = loop.time()
    async with running(P) as manager:
        await until(lambda: len(manager.of("done")) == 50)
        assert loop.time() - started < 1.0  # not 50 x 0.05 s
    assert manager.peak == 50


async def test_hundred_thousand_idle_workers_start_and_stop_quickly() -> None:
    n = 100_000

    class P(DynamicManager):
        def children_specs(self) -> dict[Any, Any]:
            idle = {"timeout": 0}
            return {f"w{i}": idle for i in range(n)}

        def handle_call(self, message: Any, id: Any, payload: Any) -> Any:
            return (id, message)

    began = time.perf_counter()
    manager = await P.start()
    started = time.perf_counter() - began
    try:
        assert len(manager) == n
        assert manager.get("w99999") is not None and manager.get(f"w{n}") is None
        assert await manager.call("w12345", "hi") == ("w12345", "hi")
        await manager.put("extra", timeout=0.01)
        assert len(manager) == n + 1
        await until(lambda: manager.counters["performs"] >= 2)
    finally:
        began = time.perf_counter()
        await manager.stop()
        stopped = time.perf_counter() - began
    assert len(manager) == 0
    assert started < 3.0, started  # ~0.1 s when the machine is idle
    assert stopped < 3.0, stopped


async def test_hundred_thousand_idle_workers_each_get_terminate() -> None:
    n = 100_000

    class P(DynamicManager):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.terminated: Counter[str] = Counter()

        def children_specs(self) -> dict[Any, Any]:
            idle = {"timeout": 0}  # one shared spec dict, as a large manager would
            return {i: idle for i in range(n)}

        def terminate(self, reason: str, id: Any, payload: Any) -> None:
            self.terminated[reason] += 1

    manager = await P.start()
    assert len(manager) == n
    await manager.stop()
    assert manager.terminated == {"shutdown": n}


async def test_ten_thousand_periodic_workers_all_perform() -> None:
    n = 10_000

    class P(DynamicManager):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.seen: Counter[Any] = Counter()

        def children_specs(self) -> dict[Any, Any]:
            spec = {"timeout": 0.05}
            return {i: spec for i in range(n)}

        def perform(self, id: Any, payload: Any) -> Any:
            self.seen[id] += 1

    async with running(P) as manager:
        await until(lambda: len(manager.seen) == n and min(manager.seen.values()) >= 3, timeout=10)
    # Once stopped (performs on the thread pool have all come back): every one counted.
    assert manager.counters["performs"] == sum(manager.seen.values())


async def test_a_worker_put_at_runtime_performs_even_if_the_next_timer_is_far_away() -> None:
    class P(Ticker):
        SPECS = {"far": {"timeout": 60.0}}

    async with running(P) as manager:
        await asyncio.sleep(0.02)  # the dispatcher now sleeps until "far" is due (60 s)
        await manager.put("near", timeout=0.01)
        await until(lambda: manager.count("near") >= 3, timeout=2)
        await manager.put("instant", timeout=0, instant_perform=True)
        await until(lambda: manager.count("instant") == 1, timeout=2)


async def test_starting_many_workers_lets_other_tasks_run() -> None:
    """A node's heartbeat must not wait for a million ids to start (it would fence)."""
    n = 200_000

    class P(DynamicManager):
        def children_specs(self) -> dict[Any, Any]:
            idle = {"timeout": 0}
            return {i: idle for i in range(n)}

    turns = 0

    async def other_task() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(other_task())
    await asyncio.sleep(0)
    before = turns
    manager = await P.start()
    during = turns - before
    task.cancel()
    await manager.stop()
    assert len(manager) == 0
    assert during >= 10, during  # it yields every 10,000 ids
