"""The distributed manager tests' workers and nodes: a ledger of performs, a counter."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from contextlib import AsyncExitStack
from typing import Any

from cloister import DynamicManager, Ok, Replace
from cloister.cluster import State
from tests._support.nodes import ClusterNodes
from tests._support.timing import MEMORY
from tests._support.timing import MEMORY_FAILURE_TIMEOUT as FAILURE_TIMEOUT
from tests._support.timing import MEMORY_HEARTBEAT as HEARTBEAT

__all__ = ["FAILURE_TIMEOUT", "HEARTBEAT", "IDS", "Counter", "Ledger", "Nodes"]

IDS = [f"key_{i}" for i in range(120)]


class Ledger:
    """Shared by every node of a test: who is performing what, right now and ever."""

    def __init__(self) -> None:
        self.active: dict[Any, set[str]] = defaultdict(set)
        self.overlaps: list[tuple[Any, set[str]]] = []
        self.performs: list[tuple[str, Any, float]] = []
        self.terminated: dict[Any, tuple[str, str, Any]] = {}


class Counter(DynamicManager):
    """Each perform holds the key for a moment and counts up its payload."""

    ledger: Ledger

    def children_specs(self) -> dict[Any, Any]:
        return {i: {"timeout": 0.02, "payload": 0} for i in IDS}

    async def perform(self, id: Any, payload: Any) -> Any:
        node = self.cluster.node  # type: ignore[union-attr]
        holders = self.ledger.active[id]
        if holders:
            self.ledger.overlaps.append((id, {*holders, node}))
        holders.add(node)
        self.ledger.performs.append((node, id, time.monotonic()))
        try:
            await asyncio.sleep(0.004)
        finally:
            holders.discard(node)
        return Replace(payload + 1)

    def handle_call(self, message: Any, id: Any, payload: Any) -> Any:
        return Ok({"node": self.cluster.node, "id": id, "payload": payload, "m": message})  # type: ignore[union-attr]

    def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        return Replace(payload + message)

    def terminate(self, reason: str, id: Any, payload: Any) -> None:
        self.ledger.terminated[id] = (self.cluster.node, reason, payload)  # type: ignore[union-attr]


class Nodes(ClusterNodes):
    """Nodes of cluster ``mgr`` on the memory world ``name``, each running a Counter."""

    def __init__(self, stack: AsyncExitStack, name: str, ledger: Ledger) -> None:
        super().__init__(stack, f"memory://{name}", cluster="mgr", timing=MEMORY)
        self.ledger = ledger
        self.managers: dict[str, Counter] = {}

    async def start(self, node: str, **kwargs: Any) -> Counter:
        manager_cls = type("C", (Counter,), {"ledger": self.ledger, "name": "counter"})
        return await self.start_manager(node, manager_cls, **kwargs)

    def live_managers(self) -> dict[str, Counter]:
        """The managers of the nodes neither stopped nor crashed."""
        return {c.node: self.managers[c.node] for c in self.live() if c.node in self.managers}

    def settled(self) -> bool:
        """Every id is live on exactly one live node, its owner, and every node is ready."""
        live = self.live_managers()
        if not all(self.clusters[n].state is State.READY for n in live):
            return False
        owners: dict[Any, list[str]] = defaultdict(list)
        for node, manager in live.items():
            for worker_id in manager.ids():
                owners[worker_id].append(node)
        some = next(iter(live))
        return set(owners) == set(IDS) and all(
            nodes == [live[some].owner_of(i)] for i, nodes in owners.items()
        )
