"""Helpers for cluster tests on the memory backend: a harness, a recorder, eventually()."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

from cloister import Cluster
from cloister.backends.memory import MemoryWorld, world
from cloister.cluster import ClusterInfo, State

HEARTBEAT = 0.05
FAILURE_TIMEOUT = 0.2


async def eventually(predicate: Callable[[], bool], timeout: float = 3.0, what: str = "") -> float:
    """Wait until ``predicate()`` holds; returns how long it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not true after {timeout}s: {what or predicate}")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


class Recorder:
    """A listener that records every call, with the receiving node."""

    def __init__(self, node: str, sink: list[tuple[Any, ...]], fail: bool = False) -> None:
        self.node = node
        self.sink = sink
        self.fail = fail

    async def on_state_change(self, from_state: State, to_state: State, info: ClusterInfo) -> None:
        self.sink.append(("state", self.node, from_state, to_state, info.epoch, time.monotonic()))
        if self.fail:
            raise RuntimeError("listener failure on purpose")

    def on_sentry_change(self, old: str | None, new: str | None, info: ClusterInfo) -> None:
        self.sink.append(("sentry", self.node, old, new, info.epoch, time.monotonic()))


class Harness:
    """Starts nodes on one memory world and stops them all at the end."""

    def __init__(self, stack: AsyncExitStack, world_name: str) -> None:
        self.stack = stack
        self.url = f"memory://{world_name}"
        self.world: MemoryWorld = world(world_name)
        self.nodes: dict[str, Cluster] = {}
        self.events: list[tuple[Any, ...]] = []

    async def start(self, node: str, **kwargs: Any) -> Cluster:
        kwargs.setdefault("heartbeat", HEARTBEAT)
        kwargs.setdefault("failure_timeout", FAILURE_TIMEOUT)
        kwargs.setdefault("listener", Recorder(node, self.events))
        cluster = Cluster("test", node, backend=self.url, **kwargs)
        await cluster.start()
        self.stack.push_async_callback(cluster.stop)
        self.nodes[node] = cluster
        return cluster

    def live(self) -> list[Cluster]:
        return [
            c
            for c in self.nodes.values()
            if c.state not in (State.STOPPED, State.STOPPING) and not c._crashed
        ]

    def agreed(self, names: set[str]) -> bool:
        """Every live node is ready with exactly ``names`` as members, same epoch."""
        live = self.live()
        epochs = {c.epoch for c in live}
        return (
            all(c.state is State.READY and set(c.siblings()) == names for c in live)
            and len(epochs) == 1
            and len({c.ring.fingerprint for c in live}) == 1
        )
