"""Helpers for table tests: nodes of one cluster, and a watch read in the background."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

from cloister import Cluster
from cloister.store import Table, TableEvent
from tests._support.nodes import ClusterNodes


class Nodes(ClusterNodes):
    """Starts nodes of the cluster ``test`` on one backend URL; stops them all on exit.

    Timings: :data:`~tests._support.timing.NATS` on NATS (TTLs are whole seconds),
    :data:`~tests._support.timing.FAST` on memory.
    """

    def __init__(self, url: str) -> None:
        super().__init__(AsyncExitStack(), url)

    async def __aenter__(self) -> Nodes:
        await self.stack.__aenter__()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stack.__aexit__(kind, exc, tb)

    async def start(self, name: str, **kwargs: Any) -> Cluster:
        return await self.start_cluster(name, **kwargs)

    async def tables(self, table: str, *names: str) -> list[Table]:
        """Start nodes ``names`` (those not started yet) and open ``table`` on each."""
        opened = []
        for name in names:
            cluster = self.clusters.get(name) or await self.start(name)
            opened.append(await cluster.table(table))
        return opened


class Events:
    """Reads a table watch from a background task, so that a timed-out wait never cancels
    the watch's iterator (cancelling an async generator mid-step closes it for good)."""

    def __init__(self, events: AsyncIterator[TableEvent]) -> None:
        self.queue: asyncio.Queue[TableEvent | BaseException] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._pump(events))

    async def _pump(self, events: AsyncIterator[TableEvent]) -> None:
        try:
            async for event in events:
                self.queue.put_nowait(event)
        except Exception as exc:
            self.queue.put_nowait(exc)

    async def next(self, timeout: float = 5.0) -> TableEvent:
        item = await asyncio.wait_for(self.queue.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    async def take(self, count: int, timeout: float = 5.0) -> list[TableEvent]:
        return [await self.next(timeout) for _ in range(count)]

    async def none(self, within: float = 0.3) -> None:
        await asyncio.sleep(within)
        assert self.queue.empty(), f"unexpected event {self.queue.get_nowait()}"

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
