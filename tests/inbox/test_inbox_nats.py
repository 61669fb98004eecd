"""The durable inbox end to end on NATS: three nodes in one process, one leaves mid-stream.

Every message is handled, in order per key, exactly once (a graceful leave hands the
partitions over after their acks are applied), and no key runs on two nodes at once.
"""

from __future__ import annotations

import asyncio
import random
import time
from contextlib import AsyncExitStack

from cloister import CloisterError
from cloister.cluster import State
from cloister.testing import NatsServer, eventually
from tests._support.timing import NATS

from .support import Nodes

KEYS = [f"k{i}" for i in range(30)]
PER_KEY = 20


class NatsNodes(Nodes):
    """Three nodes of cluster ``inbox`` on one NATS server, and producers for them."""

    def __init__(self, url: str, stack: AsyncExitStack) -> None:
        super().__init__(stack, url, KEYS, timing=NATS, hold=0.001)
        self.sent: list[float] = []

    async def start_together(self, names: str) -> None:
        for node in names:
            await self.start(node)
        await eventually(
            lambda: all(
                c.state is State.READY and c.siblings() == tuple(sorted(names))
                for c in self.clusters.values()
            ),
            15,
            "the nodes ready together",
        )

    async def lane(self, key: str) -> None:
        """Cast 1..PER_KEY to ``key`` from random live nodes, in order, with message ids."""
        for sequence in range(1, PER_KEY + 1):
            while True:  # a node going down refuses the put (not acknowledged): retry
                sender = self.managers[random.choice(self.live_names())]
                try:
                    await sender.cast(key, sequence, msg_id=f"{key}-{sequence}")
                    break
                except CloisterError:
                    await asyncio.sleep(0.01)
            self.sent.append(time.monotonic())
            await asyncio.sleep(0.02)

    async def all_handled(self, timeout: float) -> None:
        handled = self.journal.handled
        await eventually(
            lambda: all(len(set(handled[k])) >= PER_KEY for k in KEYS),
            timeout,
            "every message handled",
        )

    async def assert_inbox_empties(self, node: str) -> None:
        depth = self.managers[node].inbox_depth
        deadline = time.monotonic() + 5
        while await depth() != 0:
            assert time.monotonic() < deadline, "acked messages should leave the inbox"
            await asyncio.sleep(0.05)


async def test_nothing_lost_or_doubled_when_a_node_leaves_mid_stream(
    nats_server: NatsServer,
) -> None:
    async with AsyncExitStack() as stack:
        nodes = NatsNodes(nats_server.url, stack)
        await nodes.start_together("abc")
        started = time.monotonic()
        producing = asyncio.ensure_future(asyncio.gather(*(nodes.lane(k) for k in KEYS)))
        await asyncio.sleep(0.15)
        left = time.monotonic()  # b leaves gracefully in the middle of the stream
        await nodes.managers["b"].stop()
        await nodes.clusters["b"].stop()
        await producing
        after = sum(t > left for t in nodes.sent)
        assert after > len(nodes.sent) // 4, f"only {after} casts after b left: not mid-stream"
        await nodes.all_handled(20)
        print(
            f"\ninbox on NATS, graceful leave: {len(KEYS) * PER_KEY} casts ({after} after b "
            f"left, {left - started:.2f}s in), all handled {time.monotonic() - started:.2f}s "
            "after the first"
        )
        await asyncio.sleep(0.3)  # room for a duplicate to show up
        nodes.assert_in_order_and_complete(PER_KEY)
        journal = nodes.journal
        assert all(len(journal.handled[k]) == PER_KEY for k in KEYS), "duplicates"
        moved = [k for k, by in journal.by_node.items() if "b" in by and set(by) - {"b"}]
        assert moved, "b's keys should have moved to the other nodes"
        await nodes.assert_inbox_empties("a")


async def test_nothing_lost_when_a_node_crashes_mid_stream(nats_server: NatsServer) -> None:
    """c dies without a goodbye: its claims stay until the new owners evict them after
    its membership expired; what it had not acknowledged is handled again elsewhere."""
    async with AsyncExitStack() as stack:
        nodes = NatsNodes(nats_server.url, stack)
        await nodes.start_together("abc")
        producing = asyncio.ensure_future(asyncio.gather(*(nodes.lane(k) for k in KEYS)))
        await asyncio.sleep(0.15)
        victim = nodes.clusters["c"]
        victim._on_closed()  # stop every callback now, as kill -9 would ...
        assert victim._backend is not None
        await victim._backend.close()  # ... and drop the connection, leaving nothing
        crashed = time.monotonic()
        await producing
        await nodes.all_handled(NATS.failure_timeout + 20)
        journal = nodes.journal
        duplicates = sum(len(journal.handled[k]) - PER_KEY for k in KEYS)
        print(
            f"\ninbox on NATS, crash: all handled {time.monotonic() - crashed:.2f}s after c "
            f"died ({duplicates} handled twice)"
        )
        nodes.assert_in_order_and_complete(PER_KEY)
        await nodes.assert_inbox_empties("a")
