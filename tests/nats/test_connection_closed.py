"""A connection closed for good underneath a node (not by ``close()``) kills the node:
it says so at ERROR, reports ``crashed``, and its manager's tasks end with it — never a
live process that silently stopped following the cluster."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from cloister import Cluster, DynamicManager, Ok
from cloister.testing import NatsServer


class Ticker(DynamicManager):
    performs = 0

    def children_specs(self) -> dict[Any, Any]:
        return {"t": {"timeout": 0.01}}

    def perform(self, id: Any, payload: Any) -> Any:
        type(self).performs += 1
        return Ok(None)


async def test_a_connection_closed_underneath_stops_the_node(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = Cluster("closed", "a", backend=nats_server.url, heartbeat=0.2, failure_timeout=1.0)
    await cluster.start()
    manager = await Ticker.start(cluster)
    try:
        await cluster.wait_ready(10)
        deadline = time.monotonic() + 5
        while Ticker.performs < 5:
            assert time.monotonic() < deadline, "the worker never performed"
            await asyncio.sleep(0.01)
        backend: Any = cluster.backend
        with caplog.at_level(logging.ERROR, logger="cloister"):
            await backend._nc.close()  # closed for good, and not by the backend's close()
            deadline = time.monotonic() + 5
            while not cluster.crashed:
                assert time.monotonic() < deadline, "the node did not notice"
                await asyncio.sleep(0.01)
        assert any("for good" in r.getMessage() for r in caplog.records)
        await asyncio.sleep(0.05)
        performed = Ticker.performs
        await asyncio.sleep(0.2)
        assert Ticker.performs == performed, "a dead node's worker kept performing"
    finally:
        await manager.stop()
        await cluster.stop()
