"""``cloister demo``: a cluster forming, splitting keys and changing shape, in one process.

For now a tour of the cluster layer on the embedded backend (no server needed): start
``--nodes`` nodes, wait until they are ready, show who owns a few keys, have one node
leave and a new one join, and show the epochs they went through. The steps are separate
functions over one :class:`Tour`, so the full ``DynamicManager`` demo can replace
:func:`tour` (and add its options in :func:`add_parser`) without touching the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from cloister.cli.options import EXIT_OK, add_common, positive_int
from cloister.cluster import Cluster, State

KEYS = ("order-1", "order-2", "order-3", "user-42", "user-43", "cart-7", "cart-8", "invoice-9")
_CLUSTER = "demo"
_WAIT = 20.0


def add_parser(commands: Any) -> None:
    """Register ``cloister demo``."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "demo",
        help="watch a cluster form, split keys, lose a node and gain one (no server needed)",
        description="Start a cluster of NODES nodes in this process on the embedded "
        "backend, show who owns a few keys, have one node leave and a new one join, and "
        "show the epochs the cluster went through.",
    )
    parser.add_argument(
        "--nodes", type=_at_least_two, default=3, metavar="N", help="nodes to start (default 3)"
    )
    parser.add_argument(
        "--backend",
        default="memory://demo",
        metavar="URL",
        help="where the nodes meet (default memory://demo; nats://... works too)",
    )
    add_common(parser)
    parser.set_defaults(run=run)


def _at_least_two(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError("the demo needs at least 2 nodes")
    return value


def run(args: argparse.Namespace) -> int:
    """Run the tour; exit 0 when every step converged."""
    asyncio.run(tour(Console(), args.nodes, args.backend))
    return EXIT_OK


@dataclass
class Tour:
    """The running nodes and what happened to them."""

    console: Console
    backend: str
    consensus: int
    nodes: dict[str, Cluster] = field(default_factory=dict)
    history: list[tuple[str, int, str, str, float]] = field(default_factory=list)
    owned: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    async def start(self, name: str) -> None:
        heartbeat = 0.2 if self.backend.startswith("memory://") else 1.0
        node = Cluster(
            _CLUSTER, name, backend=self.backend, consensus=self.consensus, heartbeat=heartbeat
        )
        await node.start()
        self.nodes[name] = node

    async def stop(self, name: str) -> None:
        await self.nodes.pop(name).stop()

    async def settle(self, step: str) -> None:
        """Wait until every node is ready on one epoch listing exactly the running nodes."""
        with self.console.status(f"{step}: waiting for the cluster to agree..."):
            deadline = time.monotonic() + _WAIT
            while not self._agreed():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{step}: the nodes did not agree within {_WAIT:g}s")
                await asyncio.sleep(0.01)
        first = next(iter(self.nodes.values()))
        self.history.append(
            (
                step,
                first.epoch,
                ",".join(first.siblings()),
                first.sentry or "-",
                time.monotonic() - self.started,
            )
        )
        self.console.print(
            f"[bold]{step}[/]: epoch [bold]{first.epoch}[/], members "
            f"{', '.join(first.siblings())}, sentry {first.sentry}"
        )

    def _agreed(self) -> bool:
        names = tuple(sorted(self.nodes))
        return (
            len({node.epoch for node in self.nodes.values()}) == 1
            and all(node.state is State.READY for node in self.nodes.values())
            and all(node.siblings() == names for node in self.nodes.values())
        )

    def owners(self, title: str) -> None:
        first = next(iter(self.nodes.values()))
        table = Table(title=title, title_justify="left")
        table.add_column("key")
        table.add_column("owner", style="cyan")
        for key in KEYS:
            owner, before = first.whois(key), self.owned.get(key)
            moved = before is not None and before != owner
            table.add_row(key, f"[yellow]{owner}[/] (was {before})" if moved else owner)
            self.owned[key] = owner
        self.console.print(table)

    def epochs(self) -> None:
        table = Table(title="epochs", title_justify="left")
        for column in ("step", "epoch", "members", "sentry", "at"):
            table.add_column(column)
        for step, epoch, members, sentry, at in self.history:
            table.add_row(step, str(epoch), members, sentry, f"{at:.2f}s")
        self.console.print(table)

    async def close(self) -> None:
        await asyncio.gather(*(node.stop() for node in self.nodes.values()))
        self.nodes.clear()


async def tour(console: Console, count: int, backend: str) -> None:
    """Form a cluster of ``count`` nodes, show ownership, one leave, one join, the epochs."""
    tour = Tour(console, backend, consensus=count - 1)
    names = [f"node{i}" for i in range(1, count + 1)]
    try:
        await asyncio.gather(*(tour.start(name) for name in names))
        await tour.settle(f"{count} nodes started")
        tour.owners("who owns what")
        await tour.stop(names[-1])
        await tour.settle(f"{names[-1]} left")
        tour.owners(f"after {names[-1]} left")
        await tour.start(f"node{count + 1}")
        await tour.settle(f"node{count + 1} joined")
        tour.owners(f"after node{count + 1} joined")
        tour.epochs()
    finally:
        await tour.close()
