"""A callback that blocks the event loop is measured and named: the lag, a stall count,
and one warning that says which code held the loop."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from cloister import Cluster, DynamicManager, Ok
from cloister.cluster import State
from cloister.testing import eventually


class Sleepy(DynamicManager):
    executor = "loop"  # the opt-in for tiny callbacks; this one is not tiny

    def children_specs(self) -> dict[Any, Any]:
        return {"k": {}}

    def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        time.sleep(message)  # the classic: a sync handler that blocks
        return Ok(None)


async def test_a_blocking_handler_is_measured_and_named(caplog: pytest.LogCaptureFixture) -> None:
    cluster = Cluster("loopwatch", "a", backend="memory://loopwatch", heartbeat=0.5)
    await cluster.start()
    manager = await Sleepy.start(cluster)
    try:
        await eventually(lambda: cluster.state is State.READY)
        watch = cluster.loop_watch
        assert watch is not None and watch.running
        await asyncio.sleep(0.2)
        assert watch.stalls == 0
        with caplog.at_level(logging.WARNING, logger="cloister.loopwatch"):
            await manager.cast("k", 0.6)
            await eventually(lambda: watch.stalls == 1, what="the stall counted")
            await eventually(lambda: any("blocked" in r.getMessage() for r in caplog.records))
        assert watch.max_lag >= 0.4
        assert watch.last_culprit is not None and "handle_cast" in watch.last_culprit
        assert "test_loopwatch.py" in watch.last_culprit
        (warning,) = [r.getMessage() for r in caplog.records if "blocked" in r.getMessage()]
        assert "handle_cast" in warning
    finally:
        await manager.stop()
        await cluster.stop()
    assert cluster.loop_watch is None


async def test_with_the_default_executor_a_blocking_sync_handler_leaves_the_loop_alone() -> None:
    cluster = Cluster("loopwatch-pool", "a", backend="memory://loopwatch-pool", heartbeat=0.5)
    await cluster.start()
    manager = await Sleepy.start(cluster, executor="thread")
    try:
        await eventually(lambda: cluster.state is State.READY)
        watch = cluster.loop_watch
        assert watch is not None
        await manager.cast("k", 0.6)
        # (casts counts handled casts: wait for the handler to start, not to end)
        await eventually(lambda: getattr(manager.get("k"), "busy_since", None) is not None)
        await asyncio.sleep(0.5)  # the handler sleeps in its thread meanwhile
        await eventually(lambda: manager.counters.casts == 1)
        assert watch.stalls == 0 and watch.max_lag < 0.25
    finally:
        await manager.stop()
        await cluster.stop()
