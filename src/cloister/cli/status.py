"""``cloister status``: members, states, epoch, sentry, ring shares, workers of a cluster.

Nodes running an application (``cloister run``) also report their manager: the workers
live on that node and the manager's inbox depth (messages stored and not yet handled in the
partitions that node consumes); other nodes show ``-`` there. A member that found the
medium had lost its data says so in its note, and a red line under the table names the
last loss.

Connects as an :class:`~cloister.observer.Observer` (never as a member). ``--json``
prints one document with stable keys (see :meth:`ClusterStatus.to_json
<cloister.observer.ClusterStatus.to_json>`); ``--watch S`` refreshes every ``S`` seconds
until Ctrl-C (with ``--json``: one compact document per line). Without ``--watch`` the
exit code is 1 when the cluster has no member.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from cloister.cli.options import (
    EXIT_FAILURE,
    EXIT_OK,
    UsageError,
    add_common,
    add_connection,
    add_target,
    connection_options,
    positive_float,
    redact_url,
    resolve_target,
)
from cloister.observer import ClusterStatus, MemberStatus, Observer

_STATE_STYLES = {
    "ready": "green",
    "rehashing": "yellow",
    "assembling": "cyan",
    "stopping": "magenta",
    "unreachable": "red",
    "gone": "red",
}


def add_parser(commands: Any) -> None:
    """Register ``cloister status``."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "status",
        help="show the members, states, epoch, sentry, ring shares and workers of a cluster",
        description="Show a running cluster: one row per member with its state, adopted "
        "and acknowledged epoch, sentry, share of the ring, last heartbeat, and for nodes "
        "running an application (`cloister run`) its live workers and inbox depth. Connects "
        "as an observer, never as a member. Exit code 1 if the cluster has no member.",
    )
    add_target(parser)
    output = parser.add_argument_group("display")
    output.add_argument(
        "--json", action="store_true", help="print a machine-readable JSON document instead"
    )
    output.add_argument(
        "--watch",
        type=positive_float,
        metavar="SECONDS",
        help="refresh every SECONDS until Ctrl-C",
    )
    output.add_argument(
        "--timeout",
        type=positive_float,
        default=2.0,
        metavar="S",
        help="how long each member may take to answer (default 2)",
    )
    add_connection(parser)
    add_common(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Connect as an observer and print the cluster once, or until Ctrl-C with ``--watch``."""
    backend, cluster = resolve_target(args)
    if backend.startswith("memory://"):
        raise UsageError(
            "a memory:// cluster lives inside one process; status needs a shared backend "
            "such as nats://host:port"
        )
    observer = Observer(
        cluster,
        backend,
        request_timeout=args.timeout,
        backend_options=connection_options(args),
    )
    try:
        return asyncio.run(_show(observer, args))
    except KeyboardInterrupt:
        return EXIT_OK if args.watch else EXIT_FAILURE


async def _show(observer: Observer, args: argparse.Namespace) -> int:
    console = Console()
    async with observer:
        status = await observer.status()
        if args.watch is None:
            if args.json:
                print(json.dumps(status.to_json(), indent=2, sort_keys=True), flush=True)
            else:
                console.print(render(status))
            if not status.live:
                print(
                    f"cloister status: error: cluster {status.cluster!r} has no members on "
                    f"{redact_url(status.backend)}",
                    file=sys.stderr,
                )
                return EXIT_FAILURE
            return EXIT_OK
        if args.json:
            while True:
                print(json.dumps(status.to_json(), sort_keys=True), flush=True)
                await asyncio.sleep(args.watch)
                status = await observer.status()
        with Live(render(status), console=console, auto_refresh=False) as live:
            while True:
                await asyncio.sleep(args.watch)
                live.update(render(await observer.status()), refresh=True)


def render(status: ClusterStatus) -> Group:
    """The status as a rich renderable: a summary line and one table row per member."""
    epoch = status.epoch
    summary = Text.assemble(
        ("cluster ", "dim"),
        (status.cluster, "bold"),
        (" on ", "dim"),
        redact_url(status.backend),
        "\n",
        ("epoch ", "dim"),
        ("-" if epoch is None else str(epoch.epoch), "bold"),
        ("  sentry ", "dim"),
        ("-" if epoch is None else epoch.sentry, "bold"),
        ("  lease ", "dim"),
        status.sentry_lease or "-",
        ("  fingerprint ", "dim"),
        status.fingerprint or "-",
        ("  members ", "dim"),
        str(len(status.live)),
    )
    if not status.members:
        return Group(summary, Text("no members", style="bold red"))
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("node", "state"):
        table.add_column(column)
    for column in ("epoch", "acked", "sentry", "ring share", "heartbeat", "workers", "inbox"):
        table.add_column(column, justify="right")
    table.add_column("note", overflow="fold")
    published = None if epoch is None else epoch.epoch
    for member in status.members:
        table.add_row(*_row(member, published, None if epoch is None else epoch.sentry))
    parts: list[Any] = [summary, table]
    if (loss := status.data_loss) is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(loss.at))
        parts.append(
            Text(
                f"medium data loss at {when} (epoch {loss.epoch}): {loss.why}; stored worker "
                "state and unhandled inbox records of then are gone",
                style="bold red",
            )
        )
    for job in status.schedules:
        parts.append(
            Text.assemble(
                ("job ", "dim"),
                (job["name"], "bold"),
                f" {job['trigger']}",
                ("  next ", "dim"),
                _moment(job["next_run"]),
                ("  on ", "dim"),
                job["node"] or "-",
            )
        )
    parts += [Text(f"problem: {p}", style="red") for p in status.problems]
    return Group(*parts)


def _moment(moment: float | None) -> str:
    if moment is None:
        return "-"
    when = datetime.datetime.fromtimestamp(moment, tz=datetime.UTC)
    return when.isoformat(timespec="seconds")


def _row(member: MemberStatus, published: int | None, sentry: str | None) -> list[Text | str]:
    info, record, manager = member.info, member.record, member.manager
    state = member.state
    adopted = "-" if info is None else str(info.epoch)
    notes = [member.error] if member.error else []
    if info is None and record is not None:
        notes.append(f"last recorded state {record.state}")
    if not member.in_epoch and record is not None:
        notes.append("not in the published epoch yet")
    if info is not None and info.data_losses:
        notes.append(
            f"medium lost its data {info.data_losses}x"
            + ("; rebuilding" if info.rebuilding else "")
        )
    return [
        member.node,
        Text(state, style=_STATE_STYLES.get(state, "")),
        Text(adopted, style="" if info is None or info.epoch == published else "yellow"),
        "-" if record is None else str(record.acked),
        "●" if member.node == sentry else "",
        f"{member.share:.1%}" if member.in_epoch else "-",
        "-" if member.heartbeat_age is None else f"{member.heartbeat_age:.1f}s ago",
        "-" if manager is None else f"{manager.workers:,}",
        "-" if manager is None or manager.inbox_depth is None else f"{manager.inbox_depth:,}",
        "; ".join(notes),
    ]
