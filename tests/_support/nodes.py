"""In-process cluster nodes for tests: one harness for clusters with or without managers."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from typing import Any, TypeVar

from cloister import Cluster, DynamicManager
from cloister.backends.memory import MemoryWorld, world
from cloister.cluster import ClusterInfo, State
from tests._support.timing import FAST, NATS, Timing

M = TypeVar("M", bound=DynamicManager)


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


class ClusterNodes:
    """Nodes of cluster ``cluster`` on one backend URL (memory or NATS), each optionally
    running a manager; all stopped when ``stack`` closes.

    ``timing`` defaults to :data:`NATS` on ``nats://`` and :data:`FAST` otherwise;
    ``record`` gives every node a :class:`Recorder` listener writing to ``events``.
    """

    def __init__(
        self,
        stack: AsyncExitStack,
        url: str,
        *,
        cluster: str = "test",
        timing: Timing | None = None,
        record: bool = False,
    ) -> None:
        self.stack = stack
        self.url = url
        self.cluster_name = cluster
        self.nats = url.startswith("nats://")
        self.timing = timing or (NATS if self.nats else FAST)
        self.record = record
        self.clusters: dict[str, Cluster] = {}
        self.managers: dict[str, Any] = {}
        self.events: list[tuple[Any, ...]] = []

    @property
    def heartbeat(self) -> float:
        return self.timing.heartbeat

    @property
    def failure_timeout(self) -> float:
        return self.timing.failure_timeout

    @property
    def world(self) -> MemoryWorld:
        """The memory world, for failure injection (crash, pause, partition)."""
        assert not self.nats, "failure injection needs the memory backend"
        return world(self.url.removeprefix("memory://"))

    @property
    def nodes(self) -> dict[str, Cluster]:
        return self.clusters

    async def start_cluster(self, node: str, **kwargs: Any) -> Cluster:
        """Start the cluster node ``node`` (stopped again when the stack closes)."""
        for option, value in self.timing.options().items():
            kwargs.setdefault(option, value)
        if self.record:
            kwargs.setdefault("listener", Recorder(node, self.events))
        cluster = Cluster(self.cluster_name, node, backend=self.url, **kwargs)
        await cluster.start()
        self.stack.push_async_callback(cluster.stop)
        self.clusters[node] = cluster
        return cluster

    async def start_manager(self, node: str, manager: type[M], **kwargs: Any) -> M:
        """Start node ``node`` (cluster options ``kwargs``) and ``manager`` on it."""
        cluster = await self.start_cluster(node, **kwargs)
        started = await manager.start(cluster)
        self.stack.push_async_callback(started.stop)
        self.managers[node] = started
        return started

    def live(self) -> list[Cluster]:
        """The nodes neither stopped nor crashed."""
        return [
            c
            for c in self.clusters.values()
            if c.state not in (State.STOPPED, State.STOPPING) and not c.crashed
        ]

    def live_names(self) -> list[str]:
        return [c.node for c in self.live()]

    def agreed(self, names: set[str]) -> bool:
        """Every live node is ready with exactly ``names`` as members, same epoch."""
        live = self.live()
        epochs = {c.epoch for c in live}
        return (
            all(c.state is State.READY and set(c.siblings()) == names for c in live)
            and len(epochs) == 1
            and len({c.ring.fingerprint for c in live}) == 1
        )


class Harness(ClusterNodes):
    """Cluster-only nodes on the memory world ``world_name``, recording listener calls."""

    def __init__(self, stack: AsyncExitStack, world_name: str) -> None:
        super().__init__(stack, f"memory://{world_name}", record=True)

    async def start(self, node: str, **kwargs: Any) -> Cluster:
        return await self.start_cluster(node, **kwargs)
