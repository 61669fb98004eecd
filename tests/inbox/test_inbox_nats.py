"""The durable inbox end to end on NATS: three nodes in one process, one leaves mid-stream.

Every message is handled, in order per key, exactly once (a graceful leave hands the
partitions over after their acks are applied), and no key runs on two nodes at once.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from contextlib import AsyncExitStack
from typing import Any

from cloister import CloisterError, Cluster, DynamicManager, Replace
from cloister.cluster import State
from cloister.testing import NatsServer

HEARTBEAT = 0.5
FAILURE_TIMEOUT = 2.0
KEYS = [f"k{i}" for i in range(30)]
PER_KEY = 20


class Journal:
    """What the workers handled, shared by the nodes of the test."""

    def __init__(self) -> None:
        self.handled: dict[str, list[int]] = defaultdict(list)
        self.by_node: dict[str, list[str]] = defaultdict(list)
        self.active: dict[str, str] = {}
        self.overlaps = 0


class Sink(DynamicManager):
    """handle_cast records the message (a per-key sequence number) and keeps it."""

    journal: Journal
    partitions = 16

    def children_specs(self) -> dict[Any, Any]:
        return {key: {"payload": 0, "timeout": 0} for key in KEYS}

    async def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        journal = self.journal
        node = self.cluster.node  # type: ignore[union-attr]
        if journal.active.get(id) not in (None, node):
            journal.overlaps += 1
        journal.active[id] = node
        try:
            await asyncio.sleep(0.001)
        finally:
            journal.active.pop(id, None)
        journal.handled[id].append(message)
        journal.by_node[id].append(node)
        return Replace(message)


async def until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout}s"
        await asyncio.sleep(0.05)


class Nodes:
    """Three nodes of cluster ``inbox`` on one NATS server, and what they handled."""

    def __init__(self, url: str, stack: AsyncExitStack) -> None:
        self.url = url
        self.stack = stack
        self.journal = Journal()
        self.sink: type[Sink] = type("NatsSink", (Sink,), {"journal": self.journal, "name": "sink"})
        self.clusters: dict[str, Cluster] = {}
        self.managers: dict[str, Sink] = {}
        self.live: list[str] = []
        self.sent: list[float] = []

    async def start(self, names: str) -> None:
        for node in names:
            cluster = Cluster(
                "inbox",
                node,
                backend=self.url,
                heartbeat=HEARTBEAT,
                failure_timeout=FAILURE_TIMEOUT,
            )
            await cluster.start()
            self.stack.push_async_callback(cluster.stop)
            manager = await self.sink.start(cluster)
            self.stack.push_async_callback(manager.stop)
            self.clusters[node], self.managers[node] = cluster, manager
            self.live.append(node)
        await until(
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
                sender = self.managers[random.choice(self.live)]
                try:
                    await sender.cast(key, sequence, msg_id=f"{key}-{sequence}")
                    break
                except CloisterError:
                    await asyncio.sleep(0.01)
            self.sent.append(time.monotonic())
            await asyncio.sleep(0.02)

    async def all_handled(self, timeout: float) -> None:
        handled = self.journal.handled
        await until(
            lambda: all(len(set(handled[k])) >= PER_KEY for k in KEYS),
            timeout,
            "every message handled",
        )

    def assert_in_order(self) -> None:
        for key in KEYS:
            distinct = list(dict.fromkeys(self.journal.handled[key]))
            assert distinct == list(range(1, PER_KEY + 1)), (key, self.journal.handled[key])
        assert self.journal.overlaps == 0

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
        nodes = Nodes(nats_server.url, stack)
        await nodes.start("abc")
        started = time.monotonic()
        producing = asyncio.ensure_future(asyncio.gather(*(nodes.lane(k) for k in KEYS)))
        await asyncio.sleep(0.15)
        nodes.live.remove("b")  # b leaves gracefully in the middle of the stream
        left = time.monotonic()  # from here on the leave is under way
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
        nodes.assert_in_order()
        journal = nodes.journal
        assert all(len(journal.handled[k]) == PER_KEY for k in KEYS), "duplicates"
        moved = [k for k, by in journal.by_node.items() if "b" in by and set(by) - {"b"}]
        assert moved, "b's keys should have moved to the other nodes"
        await nodes.assert_inbox_empties("a")


async def test_nothing_lost_when_a_node_crashes_mid_stream(nats_server: NatsServer) -> None:
    """c dies without a goodbye: its claims stay until the new owners evict them after
    its membership expired; what it had not acknowledged is handled again elsewhere."""
    async with AsyncExitStack() as stack:
        nodes = Nodes(nats_server.url, stack)
        await nodes.start("abc")
        producing = asyncio.ensure_future(asyncio.gather(*(nodes.lane(k) for k in KEYS)))
        await asyncio.sleep(0.15)
        nodes.live.remove("c")
        victim = nodes.clusters["c"]
        victim._on_crash()  # stop every callback now, as kill -9 would ...
        assert victim._backend is not None
        await victim._backend.close()  # ... and drop the connection, leaving nothing
        crashed = time.monotonic()
        await producing
        await nodes.all_handled(FAILURE_TIMEOUT + 20)
        journal = nodes.journal
        duplicates = sum(len(journal.handled[k]) - PER_KEY for k in KEYS)
        print(
            f"\ninbox on NATS, crash: all handled {time.monotonic() - crashed:.2f}s after c "
            f"died ({duplicates} handled twice)"
        )
        nodes.assert_in_order()
        await nodes.assert_inbox_empties("a")
