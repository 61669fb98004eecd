"""Cluster-wide scheduled jobs: triggers (pure), then each tick once on a memory cluster.

The process-level run on NATS (3 node processes, a kill -9, a join) is
``tests/cluster/test_schedules_processes.py``.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import time
from collections import Counter
from contextlib import AsyncExitStack
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloister import wire
from cloister.cluster import Cron, Every, Tick
from cloister.cluster.schedules import BUCKET, ScheduleInfo, trigger_of
from cloister.errors import ConfigurationError
from cloister.testing import eventually
from tests._support.nodes import ClusterNodes
from tests._support.timing import MEMORY

# -- triggers ---------------------------------------------------------------------------------


@given(
    st.floats(min_value=0.01, max_value=10_000, allow_nan=False),
    st.floats(min_value=0, max_value=4e9, allow_nan=False),
)
def test_interval_ticks_are_multiples_and_a_tick_is_never_its_own_successor(
    seconds: float, moment: float
) -> None:
    every = Every(seconds)
    last, following = every.last_until(moment), every.next_after(moment)
    assert last <= moment + seconds * 1e-3 and following > moment  # a tick may start early
    assert following - last == pytest.approx(seconds, abs=1e-5)  # floats of Unix times
    successor = every.next_after(last)  # a tick read back from a record
    assert successor > last and successor == pytest.approx(last + seconds, abs=1e-5)
    assert every.last_until(last) == last
    assert every.next_after(successor - seconds) == successor  # however it was rounded


def test_cron_ticks_in_utc_and_counts_what_it_missed() -> None:
    cron = Cron("*/5 * * * *")
    noon = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC).timestamp()
    assert cron.next_after(noon) == noon + 300
    assert cron.last_until(noon) == noon
    assert cron.last_until(noon + 299) == noon
    assert cron.count_between(noon, noon + 3600) == 13
    assert Cron("* * * * * */2").next_after(noon) == noon + 2  # 6 fields: seconds last
    with pytest.raises(ConfigurationError, match="invalid cron expression"):
        Cron("every day")
    assert trigger_of(datetime.timedelta(minutes=5)) == Every(300.0)
    assert trigger_of("0 3 * * *") == Cron("0 3 * * *")
    for bad in (0, -1, 0.001, float("inf"), True):
        with pytest.raises(ConfigurationError, match="interval"):
            Every(bad)


def test_schedule_info_crosses_the_wire() -> None:
    info = ScheduleInfo("job", "every 1s", 10.0, 9.0, True, 3, 1, 0)
    assert ScheduleInfo.from_wire(wire.decode(wire.encode(info.to_wire()))) == info


# -- on a memory cluster ------------------------------------------------------------------------


class Runs:
    """Every run of every node, shared: (tick, node, started, ended)."""

    def __init__(self) -> None:
        self.runs: list[tuple[float, str, float, float]] = []
        self.ticks: list[Tick] = []

    def job(self, node: str, hold: float = 0.02) -> Any:
        async def run(tick: Tick) -> None:
            started = time.monotonic()
            self.ticks.append(tick)
            await asyncio.sleep(hold)
            self.runs.append((tick.scheduled, node, started, time.monotonic()))

        return run

    def check_once_each(self, every: float, *, allowed_missing: int = 0) -> None:
        """Every tick from the first to the last ran once; runs never overlapped."""
        counts = Counter(tick for tick, *_ in self.runs)
        assert all(n == 1 for n in counts.values()), [t for t, n in counts.items() if n > 1]
        ticks = sorted(counts)
        expected = round((ticks[-1] - ticks[0]) / every) + 1
        assert expected - len(ticks) <= allowed_missing, (expected, len(ticks))
        spans = sorted((start, end) for _, _, start, end in self.runs)
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end, "two runs of the job overlapped"
        fences = [tick.fence for tick in sorted(self.ticks, key=lambda t: t.scheduled)]
        assert fences == sorted(fences) and len(set(fences)) == len(fences)


@pytest.fixture
async def nodes(request: pytest.FixtureRequest) -> Any:
    async with AsyncExitStack() as stack:
        yield ClusterNodes(
            stack, f"memory://sched-{request.node.name}-{time.monotonic_ns()}", timing=MEMORY
        )


async def test_each_tick_runs_once_across_nodes_while_the_owner_crashes(
    nodes: ClusterNodes,
) -> None:
    runs = Runs()
    for name in "abc":
        cluster = await nodes.start_cluster(name)
        await cluster.schedule("beat", 0.1, runs.job(name))
    await eventually(lambda: len(runs.runs) >= 5, what="the first runs")
    owner = nodes.clusters["a"].whois("beat")
    assert {node for _, node, *_ in runs.runs} == {owner}
    info = {job.name: job for job in nodes.clusters[owner].info.schedules}["beat"]
    assert info.runs_here and info.next_run is not None and info.next_run > time.time() - 1
    nodes.world.crash(owner)
    before = len(runs.runs)
    await eventually(lambda: len(runs.runs) >= before + 10, what="runs after the crash", timeout=5)
    survivors = {node for _, node, *_ in runs.runs[before:]}
    assert owner not in survivors and len(survivors) == 1
    runs.check_once_each(0.1, allowed_missing=1)  # the crashed node's tick in flight


async def test_ticks_missed_past_the_grace_run_once_or_are_skipped(nodes: ClusterNodes) -> None:
    a = await nodes.start_cluster("a")
    await a.wait_ready()
    kv = await a.backend.kv(BUCKET)
    long_ago = time.time() - 50
    for name in ("once", "skip"):
        record = {"tick": Every(0.5).last_until(long_ago), "node": "gone", "at": long_ago}
        await kv.put(f"job.{name}", wire.encode(record))
    once, skip = Runs(), Runs()
    await a.schedule("once", 0.5, once.job("a"), grace=1.0)
    await a.schedule("skip", 0.5, skip.job("a"), missed="skip", grace=1.0)
    await eventually(lambda: len(once.ticks) >= 2 and len(skip.ticks) >= 1)
    first = once.ticks[0]
    assert 95 <= first.missed <= 101  # a hundred ticks in 50 s, run as one
    assert first.scheduled > time.time() - 1.5  # the latest of them
    assert all(tick.missed == 0 for tick in skip.ticks)
    assert skip.ticks[0].scheduled > time.time() - 1.0  # the next tick, not an old one
    assert a.schedules["skip"].skipped >= 95


async def test_a_graceful_stop_lets_the_running_tick_finish(nodes: ClusterNodes) -> None:
    runs = Runs()
    a = await nodes.start_cluster("a")
    b = await nodes.start_cluster("b")
    for cluster in (a, b):
        await cluster.schedule("slow", 0.2, runs.job(cluster.node, hold=0.15))
    await eventually(lambda: len(runs.ticks) >= 2)
    owner = nodes.clusters[a.whois("slow")]
    await eventually(lambda: len(runs.ticks) > len(runs.runs), what="a run in progress")
    await owner.stop()
    assert len(runs.ticks) == len(runs.runs)  # the run in progress finished before the stop
    count = len(runs.runs)
    await eventually(lambda: len(runs.runs) >= count + 3, what="the other node takes over")
    runs.check_once_each(0.2)


async def test_bad_schedules_are_refused(nodes: ClusterNodes) -> None:
    a = await nodes.start_cluster("a")
    job = await a.schedule("ok", 60, lambda tick: None)
    assert a.schedules == {"ok": job}
    with pytest.raises(ConfigurationError, match="already scheduled"):
        await a.schedule("ok", 60, lambda tick: None)
    with pytest.raises(ConfigurationError, match="invalid job name"):
        await a.schedule("no spaces", 60, lambda tick: None)
    with pytest.raises(ConfigurationError, match="missed must be"):
        await a.schedule("m", 60, lambda tick: None, missed="all")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="callable"):
        await a.schedule("c", 60, "not a function")  # type: ignore[arg-type]
    assert await a.unschedule("ok") and not await a.unschedule("ok")
    assert a.info.schedules == ()
