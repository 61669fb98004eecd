"""Helpers shared by the backend tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from cloister.backends import KeyValue, KVEvent
from cloister.backends.nats import NatsBackend


class Events:
    """Reads a watch in a background task, so that waiting with a timeout never cancels
    the watch's iterator (cancelling an async generator mid-step closes it for good)."""

    def __init__(self, events: AsyncIterator[KVEvent]) -> None:
        self.queue: asyncio.Queue[KVEvent | BaseException] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._pump(events))

    async def _pump(self, events: AsyncIterator[KVEvent]) -> None:
        try:
            async for event in events:
                self.queue.put_nowait(event)
        except Exception as exc:
            self.queue.put_nowait(exc)

    async def next(self, timeout: float = 3.0) -> KVEvent:
        item = await asyncio.wait_for(self.queue.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    async def none(self, within: float = 0.3) -> None:
        await asyncio.sleep(within)
        assert self.queue.empty(), f"unexpected event {self.queue.get_nowait()}"

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@contextlib.asynccontextmanager
async def watching(kv: KeyValue, prefix: str = "") -> AsyncIterator[Events]:
    async with kv.watch(prefix=prefix) as events:
        reader = Events(events)
        try:
            yield reader
        finally:
            await reader.stop()


@contextlib.asynccontextmanager
async def connected(
    url: str, cluster: str = "t", node: str = "n1", **options: Any
) -> AsyncIterator[NatsBackend]:
    """A connected NATS backend, closed on exit."""
    backend = NatsBackend(url, cluster, node, **options)
    await backend.connect()
    try:
        yield backend
    finally:
        await backend.close()
