"""Reloading the state table (every settle does) never holds the event loop for long."""

from __future__ import annotations

import asyncio

from cloister.backends import open_backend
from cloister.manager.state import StateTable, Stored, storage_key


async def test_a_large_reload_lets_the_event_loop_run() -> None:
    backend = open_backend("memory://state-load", "c", "n")
    await backend.connect()
    try:
        kv = await backend.kv("mgr-x")
        await kv.put_many(
            {storage_key(f"w{i}"): Stored(f"w{i}", None, i, True).encode() for i in range(10_000)}
        )
        table = StateTable(kv)
        ticks = 0
        loading = True

        async def ticker() -> None:  # stands for the heartbeat
            nonlocal ticks
            while loading:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        before = ticks
        await table.load()
        loading = False
        await task
        assert len(table.mirror) == 10_000 and table.mirror["w7"].payload == 7
        assert ticks - before >= 4, "the reload held the event loop the whole time"
    finally:
        await backend.close()
