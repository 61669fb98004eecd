"""The main job, end to end in one process: what ``cloister demo`` runs.

A cluster of ``nodes`` nodes runs a :class:`~cloister.DynamicManager` over ``keys`` keys.
Producers stream ``messages`` casts into it, each carrying its key's next sequence number,
from whichever node they pick. Mid-run one node leaves and a new one joins. Every worker
checks the sequence it receives, so at the end the report can say, without trusting the
library: how many messages were handled, how many were lost, how many were handled twice,
how many arrived out of order, how long moved keys paused, and the throughput.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cloister.cluster import Cluster, State
from cloister.manager import DynamicManager, Replace

CLUSTER = "demo"


@dataclass
class Ledger:
    """What the workers saw, shared by every node of the in-process demo."""

    handled: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    seen: dict[str, int] = field(default_factory=dict)  # key -> highest sequence handled
    handled_by: dict[str, str] = field(default_factory=dict)  # key -> last node
    moved_latency: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    sent_at: dict[tuple[str, int], float] = field(default_factory=dict)
    # Flow control for the producers: one slot per message sent and not yet handled.
    room: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2048))


class Orders(DynamicManager):
    """One worker per key; its payload is the last sequence number it handled."""

    name = "orders"
    ledger: Ledger
    key_count: int

    def children_specs(self) -> dict[str, Any]:
        return {f"key-{i}": {"payload": 0, "timeout": 0} for i in range(self.key_count)}

    async def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        # async def: it runs on the event loop (it never awaits, so at the cost of a call),
        # where the producers' flow-control semaphore lives.
        ledger = self.ledger
        sequence = int(message)
        ledger.room.release()
        if sequence <= payload:
            ledger.duplicates += 1
            return Replace(payload)
        if sequence != payload + 1:
            ledger.out_of_order += 1
        ledger.handled += 1
        ledger.seen[id] = sequence
        node = self.cluster.node if self.cluster is not None else "-"
        sent = ledger.sent_at.pop((id, sequence), None)
        if sent is not None:
            waited = time.monotonic() - sent
            ledger.latency.append(waited)
            if ledger.handled_by.get(id, node) != node:
                ledger.moved_latency.append(waited)
        ledger.handled_by[id] = node
        return Replace(sequence)


@dataclass
class Report:
    """The demo's outcome."""

    nodes_started: int
    messages: int
    handled: int
    lost: int
    duplicates: int
    out_of_order: int
    handoff_pause: float
    latency_p99: float
    throughput: float
    seconds: float
    epochs: int
    events: list[str]

    @property
    def ok(self) -> bool:
        """Nothing lost, nothing out of order."""
        return self.lost == 0 and self.out_of_order == 0


Progress = Callable[[str, int, int], None]
"""Called with (what, done, total) as the demo advances."""


class Demo:
    """Runs the scenario; see :func:`run_demo`."""

    def __init__(
        self, nodes: int, keys: int, messages: int, backend: str, progress: Progress
    ) -> None:
        self.node_count = nodes
        self.keys = [f"key-{i}" for i in range(keys)]
        self.messages = messages
        self.backend = backend
        self.progress = progress
        self.ledger = Ledger()
        self.clusters: dict[str, Cluster] = {}
        self.managers: dict[str, Orders] = {}
        self.events: list[str] = []
        self.started = time.monotonic()
        self.sent = 0
        self.memory = backend.startswith("memory://")
        self.manager_cls: type[Orders] = type(
            "Orders", (Orders,), {"ledger": self.ledger, "key_count": keys}
        )

    def note(self, text: str) -> None:
        self.events.append(f"{time.monotonic() - self.started:6.2f}s  {text}")

    async def start_node(self, name: str) -> None:
        # In memory all three nodes share one event loop with the producer, which keeps it
        # saturated: a short heartbeat keeps epochs quick, and the failure timeout leaves
        # renewals room (0.8 s) so that no node fences itself under that load. Nothing
        # crashes in the demo, so the failure timeout costs it no time.
        heartbeat, failure_timeout = (0.2, 1.0) if self.memory else (1.0, 3.0)
        cluster = Cluster(
            CLUSTER,
            name,
            backend=self.backend,
            heartbeat=heartbeat,
            failure_timeout=failure_timeout,
        )
        await cluster.start()
        self.clusters[name] = cluster
        self.managers[name] = await self.manager_cls.start(cluster)

    async def stop_node(self, name: str) -> None:
        cluster = self.clusters.pop(name)
        manager = self.managers.pop(name)
        await manager.stop()  # hands its workers (and their payloads) to their next owners
        await cluster.stop()  # graceful leave: the others see it go at once

    async def wait_settled(self) -> None:
        """Every node ready on one epoch, every key live on its owner."""
        while True:
            clusters = list(self.clusters.values())
            if (
                all(c.state is State.READY for c in clusters)
                and len({c.epoch for c in clusters}) == 1
                and sum(len(m) for m in self.managers.values()) == len(self.keys)
            ):
                return
            await asyncio.sleep(0.01)

    async def produce(self, lane: int, lanes: int) -> None:
        """Send this lane's share of messages; one lane owns a key, so per-key order holds."""
        keys = self.keys[lane::lanes]
        if not keys:
            return
        counters = dict.fromkeys(keys, 0)
        quota = self.messages // lanes + (1 if lane < self.messages % lanes else 0)
        sent_at = self.ledger.sent_at
        room = self.ledger.room
        for n in range(quota):
            await room.acquire()  # a steady stream, not one burst: bounded unhandled backlog
            key = keys[n % len(keys)]
            counters[key] += 1
            sequence = counters[key]
            manager = random.choice(list(self.managers.values()))
            sent_at[(key, sequence)] = time.monotonic()
            await manager.cast(key, sequence, timeout=30)
            self.sent += 1

    async def run(self) -> Report:
        names = [f"node-{i + 1}" for i in range(self.node_count)]
        for name in names:
            await self.start_node(name)
        await self.wait_settled()
        self.note(f"{len(names)} nodes ready, epoch {self.clusters[names[0]].epoch}")
        lanes = 32
        began = time.monotonic()
        producers: list[asyncio.Future[None]] = [
            asyncio.ensure_future(self.produce(lane, lanes)) for lane in range(lanes)
        ]
        try:
            await self.drive(names, producers)
        finally:
            for task in producers:
                task.cancel()
            await asyncio.gather(*producers, return_exceptions=True)
        await self.wait_handled()
        elapsed = time.monotonic() - began
        epochs = max(c.epoch for c in self.clusters.values())
        for name in list(self.clusters):
            await self.stop_node(name)
        return self.report(elapsed, epochs)

    async def drive(self, names: list[str], producers: list[asyncio.Future[None]]) -> None:
        """Report progress; make the topology change at 40% (leave) and 70% (join)."""
        left = joined = False
        while not all(p.done() for p in producers):
            self.progress("sent", self.sent, self.messages)
            self.progress("handled", self.ledger.handled, self.messages)
            if not left and self.ledger.handled >= self.messages * 0.4:
                left = True
                victim = names[1]
                self.note(f"{victim} leaves gracefully")
                await self.stop_node(victim)
                await self.wait_settled()
                self.note(f"epoch {max(c.epoch for c in self.clusters.values())}: {victim} gone")
            if not joined and self.ledger.handled >= self.messages * 0.7:
                joined = True
                newcomer = f"node-{len(names) + 1}"
                self.note(f"{newcomer} joins")
                await self.start_node(newcomer)
                await self.wait_settled()
                self.note(f"epoch {self.clusters[newcomer].epoch}: {newcomer} in")
            await asyncio.sleep(0.05)
        for producer in producers:
            producer.result()  # a failed producer is a failed demo: raise its error

    async def wait_handled(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while (
            self.ledger.handled + self.ledger.duplicates < self.sent and time.monotonic() < deadline
        ):
            self.progress("handled", self.ledger.handled, self.messages)
            await asyncio.sleep(0.02)
        self.progress("sent", self.sent, self.messages)
        self.progress("handled", self.ledger.handled, self.messages)

    def report(self, elapsed: float, epochs: int) -> Report:
        ledger = self.ledger
        handled_distinct = sum(ledger.seen.values())
        latencies = sorted(ledger.latency)
        p99 = latencies[int(len(latencies) * 0.99)] if latencies else 0.0
        return Report(
            nodes_started=self.node_count + 1,
            messages=self.sent,
            handled=ledger.handled,
            lost=self.sent - handled_distinct,
            duplicates=ledger.duplicates,
            out_of_order=ledger.out_of_order,
            handoff_pause=max(ledger.moved_latency, default=0.0),
            latency_p99=p99,
            throughput=ledger.handled / elapsed if elapsed else 0.0,
            seconds=elapsed,
            epochs=epochs,
            events=self.events,
        )


async def run_demo(
    *,
    nodes: int = 3,
    keys: int = 10_000,
    messages: int = 50_000,
    backend: str = "memory://demo",
    progress: Progress | None = None,
) -> Report:
    """Run the demo scenario and return its :class:`Report`."""
    demo = Demo(nodes, keys, messages, backend, progress or (lambda what, done, total: None))
    return await demo.run()
