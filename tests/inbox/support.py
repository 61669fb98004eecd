"""What the inbox tests share: a journal of what workers handled, a sink, and its nodes."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from contextlib import AsyncExitStack
from typing import Any, ClassVar

from cloister import DynamicManager, Replace
from tests._support.nodes import ClusterNodes
from tests._support.timing import Timing


class Journal:
    """What the workers handled, shared by the nodes of one test."""

    def __init__(self) -> None:
        self.handled: dict[Any, list[int]] = defaultdict(list)
        self.by_node: dict[Any, list[str]] = defaultdict(list)
        self.log: list[tuple[str, Any, float]] = []  # (node, key, monotonic) per handling
        self.active: dict[Any, str] = {}
        self.overlaps = 0
        self.fail: dict[Any, int] = {}  # key -> how many times handle_cast raises first
        self.poison: set[tuple[Any, Any]] = set()  # (key, message) that always raise


class Sink(DynamicManager):
    """handle_cast notes the message (a per-key sequence number) and keeps it as payload.

    It holds its key for ``hold`` seconds, so that two nodes handling one key at the same
    time would show up in ``journal.overlaps``.
    """

    journal: Journal
    keys: ClassVar[list[str]]
    hold: ClassVar[float] = 0.0
    partitions = 16
    retry_backoff = (0.01, 0.05)
    max_attempts = 3

    def children_specs(self) -> dict[Any, Any]:
        return {key: {"payload": 0, "timeout": 0} for key in self.keys}

    async def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        journal = self.journal
        if journal.fail.get(id, 0) > 0 or (id, message) in journal.poison:
            journal.fail[id] = max(0, journal.fail.get(id, 0) - 1)
            raise RuntimeError(f"failing on purpose for {id}")
        node = self.cluster.node  # type: ignore[union-attr]
        if journal.active.get(id) not in (None, node):
            journal.overlaps += 1
        journal.active[id] = node
        try:
            await asyncio.sleep(self.hold)
        finally:  # also when a crash cancels us: a dead node handles nothing any more
            journal.active.pop(id, None)
        journal.handled[id].append(message)
        journal.by_node[id].append(node)
        journal.log.append((node, id, time.monotonic()))
        return Replace(message)


class Nodes(ClusterNodes):
    """The nodes of cluster ``inbox`` on one backend, each running a :class:`Sink`."""

    def __init__(
        self,
        stack: AsyncExitStack,
        url: str,
        keys: list[str],
        *,
        timing: Timing,
        hold: float = 0.0,
    ) -> None:
        super().__init__(stack, url, cluster="inbox", timing=timing)
        self.keys = keys
        self.journal = Journal()
        attrs = {"journal": self.journal, "name": "sink", "keys": keys, "hold": hold}
        self.sink: type[Sink] = type("TestSink", (Sink,), attrs)
        self.managers: dict[str, Sink] = {}

    async def start(self, node: str, **kwargs: Any) -> Sink:
        """Start ``node`` (stopped again when the test ends)."""
        return await self.start_manager(node, self.sink, **kwargs)

    def assert_in_order_and_complete(self, per_key: int) -> None:
        """Every key saw 1..per_key in order (repeats allowed), and never two nodes at once."""
        for key in self.keys:
            seen = self.journal.handled[key]
            assert list(dict.fromkeys(seen)) == list(range(1, per_key + 1)), (key, seen)
        assert self.journal.overlaps == 0
