"""``cloister demo``: the main job on the embedded backend, with a report at the end.

Starts a cluster in this process, runs a ``DynamicManager`` over ``--keys`` keys, streams
``--messages`` casts into it while one node leaves and a new one joins, and reports what
the workers themselves observed: handled, lost, duplicates, out-of-order, handoff pause,
throughput (see :mod:`cloister.demo`). Exits 0 only when nothing was lost and nothing
arrived out of order.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cloister.cli.options import EXIT_FAILURE, EXIT_OK, add_common, positive_int
from cloister.demo import Report, run_demo


def add_parser(commands: Any) -> None:
    """Register ``cloister demo``."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "demo",
        help="the main job in one process: keyed workers, a stream of messages, a node "
        "leaving and one joining, and a report (no server needed)",
        description="Start NODES nodes in this process, run a DynamicManager over KEYS keys, "
        "stream MESSAGES messages into it while one node leaves and a new one joins, then "
        "report messages handled, lost, duplicated and out of order, the handoff pause and "
        "the throughput. Exit status 0 means nothing was lost and nothing was out of order.",
    )
    parser.add_argument(
        "--nodes", type=_at_least_two, default=3, metavar="N", help="nodes to start (default 3)"
    )
    parser.add_argument(
        "--keys", type=positive_int, default=10_000, metavar="K", help="worker keys (default 10000)"
    )
    parser.add_argument(
        "--messages",
        type=positive_int,
        default=50_000,
        metavar="M",
        help="messages to stream (default 50000)",
    )
    parser.add_argument(
        "--backend",
        default="memory://demo",
        metavar="URL",
        help="where the nodes meet (default memory://demo; nats://host:port runs it on NATS)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (for logs and CI)"
    )
    add_common(parser)
    parser.set_defaults(run=run)


def _at_least_two(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError("the demo needs at least 2 nodes (one of them leaves)")
    return value


def run(args: argparse.Namespace) -> int:
    """Run the demo, print the report; 0 when nothing was lost or out of order."""
    console = Console()
    console.print(
        f"[bold]pycloister demo[/]: {args.nodes} nodes on {args.backend}, {args.keys:,} keys, "
        f"{args.messages:,} messages; one node leaves at 40%, one joins at 70%"
    )
    with Progress(
        TextColumn("{task.description:>8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=args.no_progress,
        transient=False,
    ) as progress:
        tasks = {what: progress.add_task(what, total=args.messages) for what in ("sent", "handled")}

        def advance(what: str, done: int, total: int) -> None:
            progress.update(tasks[what], completed=done, total=total)

        report = asyncio.run(
            run_demo(
                nodes=args.nodes,
                keys=args.keys,
                messages=args.messages,
                backend=args.backend,
                progress=advance,
            )
        )
    show(console, report)
    return EXIT_OK if report.ok else EXIT_FAILURE


def show(console: Console, report: Report) -> None:
    """Print the events and the figures."""
    for event in report.events:
        console.print(f"  {event}")
    table = Table(title="report", title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    good, bad = "[green]", "[bold red]"
    rows = [
        ("messages sent", f"{report.messages:,}"),
        ("handled", f"{report.handled:,}"),
        ("lost", f"{good if report.lost == 0 else bad}{report.lost}"),
        ("duplicates (dropped by the worker)", f"{report.duplicates}"),
        (
            "per-key order violations",
            f"{good if report.out_of_order == 0 else bad}{report.out_of_order}",
        ),
        ("handoff pause (worst moved key)", f"{report.handoff_pause * 1000:.0f} ms"),
        ("latency p99 (cast -> handled)", f"{report.latency_p99 * 1000:.1f} ms"),
        ("throughput", f"{report.throughput:,.0f} msg/s"),
        ("epochs", f"{report.epochs}"),
        ("elapsed", f"{report.seconds:.2f} s"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    verdict = (
        "[bold green]OK[/]: nothing lost, nothing out of order"
        if report.ok
        else "[bold red]FAILED[/]"
    )
    console.print(verdict)
