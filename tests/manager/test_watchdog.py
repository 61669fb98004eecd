"""The stall watchdog (issue 12, item 6): a manager that is up, with records waiting in its
partitions and nothing in flight or handled, is reported and healed — never left wedged."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloister import DynamicManager, Replace
from cloister.cluster import State
from cloister.manager import watchdog
from cloister.manager.watchdog import Sample, Verdict, verdict
from tests._support.nodes import ClusterNodes
from tests._support.timing import FAST

from ._standalone import until

samples = st.builds(
    Sample,
    up=st.booleans(),
    progress=st.integers(0, 5),
    partitions=st.integers(0, 3),
    counted_in_flight=st.integers(0, 5),
    really_in_flight=st.none() | st.integers(0, 5),
    backlog=st.none() | st.integers(0, 5),
)


@given(samples, samples)
def test_a_stall_is_only_ever_up_unmoving_with_a_backlog_and_nothing_in_flight(
    previous: Sample, now: Sample
) -> None:
    found = verdict(previous, now)
    if found is Verdict.STALLED:
        assert now.up and now.partitions and now.progress == previous.progress
        assert now.really_in_flight == 0 and now.backlog is not None and now.backlog > 0
    if now.progress != previous.progress or not now.up or not now.partitions:
        assert found is Verdict.WORKING


def test_the_first_look_and_a_closer_look() -> None:
    quiet = Sample(up=True, progress=7, partitions=2, counted_in_flight=4096)
    assert verdict(None, quiet) is Verdict.WORKING  # nothing to compare with yet
    assert verdict(quiet, quiet) is Verdict.LOOK_CLOSER
    idle = Sample(True, 7, 2, 0, really_in_flight=0, backlog=0)
    assert verdict(quiet, idle) is Verdict.WORKING  # nothing to do is not a stall
    busy = Sample(True, 7, 2, 3, really_in_flight=3, backlog=10)
    assert verdict(quiet, busy) is Verdict.WORKING  # a long callback holds them
    wedged = Sample(True, 7, 2, 4096, really_in_flight=0, backlog=10)
    assert verdict(quiet, wedged) is Verdict.STALLED


async def test_a_drifted_in_flight_count_is_found_reported_and_healed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(watchdog, "CHECK_INTERVAL", 0.2)
    handled: list[Any] = []

    class Counted(DynamicManager):
        name = "counted"
        partitions = 4

        def children_specs(self) -> dict[Any, Any]:
            return {f"k{i}": {"payload": 0} for i in range(10)}

        def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
            handled.append((id, message))
            return Replace(payload + 1)

    async with AsyncExitStack() as stack:
        nodes = ClusterNodes(stack, "memory://watchdog", cluster="watchdog", timing=FAST)
        manager = await nodes.start_manager("a", Counted)
        await until(lambda: nodes.clusters["a"].state is State.READY)
        await manager.cast("k0", 0)
        await until(lambda: handled == [("k0", 0)])
        # The wedge of issue 12: the count says the node is full, nothing is in flight.
        consumers = manager._region.consumers  # type: ignore[union-attr]
        assert consumers is not None
        consumers.in_flight = consumers.max_in_flight
        consumers._room.clear()
        await asyncio.sleep(1.2)  # a fetch under way (1 s long poll) ends; the next waits
        with caplog.at_level(logging.WARNING, logger="cloister.manager.watchdog"):
            for n in range(1, 21):
                await manager.cast(f"k{n % 10}", n)
            await until(lambda: manager.counters.stalls >= 1, timeout=3)
            await until(lambda: len(handled) == 21, timeout=3)
        assert any("stalled" in r.getMessage() for r in caplog.records)
        assert sorted(m for _, m in handled) == list(range(21))
        await until(lambda: not manager.stalled, timeout=3)
        assert consumers.in_flight < consumers.max_in_flight
