"""One node process of the scheduler's process-level test: ``python _schedule_node.py
URL NODE LOG``. Joins cluster ``sched`` and schedules the job ``beat`` every second; each
run appends ``start <tick> <node> <fence> <time>`` and then ``end ...`` to LOG (its own
file), flushed and synced, so that a kill -9 loses no line written before it."""

from __future__ import annotations

import asyncio
import os
import sys
import time

from cloister import Cluster
from cloister.cluster import Tick


def record(log: str, what: str, tick: Tick) -> None:
    with open(log, "a") as out:
        out.write(f"{what} {tick.scheduled!r} {tick.node} {tick.fence} {time.time()!r}\n")
        out.flush()
        os.fsync(out.fileno())


async def main(url: str, node: str, log: str) -> None:
    async with Cluster("sched", node, backend=url, heartbeat=0.5) as cluster:

        async def beat(tick: Tick) -> None:
            record(log, "start", tick)
            await asyncio.sleep(0.3)  # long enough that two runs at once would overlap
            record(log, "end", tick)

        # grace: a crash failover on a loaded 2-core machine may take several seconds;
        # ticks missed by less than that are run late, each once.
        await cluster.schedule("beat", 1, beat, grace=15)
        print(f"scheduled {node}", flush=True)
        await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
