"""``cloister node``: run one bare cluster node until SIGTERM or SIGINT (graceful leave).

This module also holds what ``cloister run`` shares with it: the node options
(:func:`add_node_options`), building the :class:`Cluster` from flags and environment
(:func:`make_cluster`), the signal-driven lifecycle (:func:`serve`) and the event lines.

The node prints one line per event to stdout, flushed at once, ``<kind> <fields> t=<T>``
where ``T`` is ``time.monotonic()`` (one clock for every process of a machine, so event
logs of several nodes can be merged). Fields are ``key=value`` without spaces; ``-`` stands
for "none"; member lists are comma-separated. The kinds:

``node <name> pid=<pid> starting cluster=<c> backend=<url> consensus=<k> groups=<g,h>``
    before connecting.
``metrics port=<p>``
    the Prometheus endpoint listens (``--metrics-port``), before connecting.
``node <name> pid=<pid> started cluster=<c>``
    joined (connected, member record written).
``state <from> -> <to> epoch=<n> members=<a,b,c> sentry=<s> fingerprint=<fp>``
    every state transition (``down -> assembling -> rehashing -> ready`` ...).
``sentry <old> -> <new> epoch=<n>``
    the epoch this node adopted names another sentry.
``epoch <n> members=<a,b,c> sentry=<s> fingerprint=<fp>``
    this node adopted epoch ``n`` (printed before it acknowledges it).
``lease acquired epoch=<n>`` / ``lease lost epoch=<n>``
    this node starts / stops being the sentry holding the lease (checked every 50 ms).
``suspended reason=<why>``
    this node stopped claiming keys (``lease_lost``, ``short_of_consensus``, ``stopping``).
``paused reason=lease_lapsed epoch=<n>`` / ``resumed epoch=<n>``
    renewals fail for less than the medium's failover time: this node starts no work
    but keeps its keys, until a renewal lands (``resumed``) or it suspends (checked every
    50 ms).
``manager <name> started class=<module:Class>`` (``cloister run`` only)
    the application's manager started (its workers start once the node is ready).
``manager up workers=<n> epoch=<e>`` (``cloister run`` only)
    the manager runs the ``n`` workers this node owns in epoch ``e`` (after each settle).
``manager stopped handed_off=<n>`` (``cloister run`` only)
    the manager handed its workers over and stopped, before the node leaves.
``node <name> pid=<pid> leaving`` then ``node <name> pid=<pid> stopped``
    graceful leave after a signal; the exit code is then 0.

:func:`parse_event` reads such a line back (tests and benchmarks use it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from typing import IO, Any

from cloister.cli.options import (
    EXIT_OK,
    UsageError,
    add_common,
    add_connection,
    add_target,
    connection_options,
    from_env,
    groups,
    positive_float,
    positive_int,
    redact_url,
    resolve_target,
)
from cloister.cluster import Cluster, ClusterInfo, State, SuspendReason, Topology
from cloister.metrics import (
    MetricsUnavailableError,
    NodeMetrics,
    require_prometheus,
    serve_metrics,
)

log = logging.getLogger("cloister.cli")

_LEASE_POLL = 0.05
_EVENT = re.compile(
    r"^(node|state|sentry|epoch|lease|suspended|paused|resumed|manager|metrics) (.*) "
    r"t=(\d+(?:\.\d+)?)$"
)


def add_parser(commands: Any) -> None:
    """Register ``cloister node``."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "node",
        help="run one bare cluster node until SIGTERM/SIGINT",
        description="Run one bare node of a cluster until SIGTERM or SIGINT, then leave "
        "gracefully (exit 0). Prints one line per state change, sentry change and adopted "
        "epoch to stdout (see `pydoc cloister.cli.node` for the format).",
    )
    add_target(parser)
    add_node_options(parser)
    add_connection(parser)
    add_common(parser)
    parser.set_defaults(run=run)


def add_node_options(parser: argparse.ArgumentParser) -> None:
    """The options of one node (``node`` and ``run``): name, consensus, groups, timing."""
    node = parser.add_argument_group("node")
    node.add_argument("--name", help="this node's name (default $CLOISTER_NODE, or generated)")
    node.add_argument(
        "--consensus",
        type=positive_int,
        metavar="K",
        help="members needed before any node is ready (default $CLOISTER_CONSENSUS, or 1)",
    )
    node.add_argument(
        "--group",
        action="append",
        metavar="G",
        help="a named ring this node also joins; repeat for several "
        "(default $CLOISTER_GROUPS, comma-separated)",
    )
    node.add_argument(
        "--heartbeat", type=positive_float, metavar="S", help="seconds between renewals (1.0)"
    )
    node.add_argument(
        "--failure-timeout",
        type=positive_float,
        metavar="S",
        help="seconds after which a silent member is removed (3 heartbeats)",
    )
    node.add_argument(
        "--weight", type=positive_float, metavar="W", help="share of the ring, relative (1.0)"
    )
    node.add_argument(
        "--max-concurrent-requests",
        type=positive_int,
        metavar="N",
        help="requests from other nodes run at once; more are refused busy "
        "(default $CLOISTER_MAX_CONCURRENT_REQUESTS, or 256)",
    )
    node.add_argument(
        "--metrics-port",
        type=port_number,
        metavar="PORT",
        help="serve Prometheus metrics on http://0.0.0.0:PORT/metrics (default "
        "$CLOISTER_METRICS_PORT; needs pip install 'pycloister[metrics]')",
    )


def port_number(text: str) -> int:
    """An argparse ``type``: a TCP port, 0 (any free port) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {value}")
    return value


def make_cluster(
    args: argparse.Namespace, events: NodeEvents, extra_groups: tuple[str, ...] = ()
) -> Cluster:
    """The node ``args`` and the environment describe, reporting to ``events``.

    Also checks ``--metrics-port`` (``args.metrics_port`` is set from the environment),
    so that a missing ``prometheus_client`` fails before anything connects.

    Raises:
        UsageError: a flag or variable is invalid (exit 2).
    """
    backend, name = resolve_target(args)
    from_env(args, "name", "CLOISTER_NODE")
    from_env(args, "consensus", "CLOISTER_CONSENSUS", positive_int)
    from_env(args, "group", "CLOISTER_GROUPS", groups)
    from_env(args, "max_concurrent_requests", "CLOISTER_MAX_CONCURRENT_REQUESTS", positive_int)
    if from_env(args, "metrics_port", "CLOISTER_METRICS_PORT", port_number) is not None:
        try:
            require_prometheus()
        except MetricsUnavailableError as exc:
            raise UsageError(f"--metrics-port: {exc}") from None
    settings: dict[str, Any] = {
        "heartbeat": args.heartbeat,
        "failure_timeout": args.failure_timeout,
        "weight": args.weight,
        "consensus": args.consensus,
        "max_concurrent_requests": args.max_concurrent_requests,
    }
    return Cluster(
        name,
        args.name,
        backend=backend,
        listener=events,
        groups=(*(args.group or ()), *extra_groups),
        backend_options=connection_options(args),
        **{key: value for key, value in settings.items() if value is not None},
    )


def run(args: argparse.Namespace) -> int:
    """Build the node from ``args`` and the environment, run it until a signal."""
    events = NodeEvents()
    cluster = make_cluster(args, events)
    return asyncio.run(serve(cluster, events, metrics_port=args.metrics_port))


@dataclass(frozen=True, slots=True)
class Node:
    """What an application attached to a running node may use (see :func:`serve`)."""

    cluster: Cluster
    events: NodeEvents
    metrics: NodeMetrics | None


Attach = Callable[[Node], AbstractAsyncContextManager[object]]
"""Runs an application on a joined node: entered once joined, left when the node leaves
(before the cluster stops), e.g. start a manager, and stop it with handoff on exit."""


async def serve(
    cluster: Cluster,
    events: NodeEvents,
    *,
    attach: Attach | None = None,
    metrics_port: int | None = None,
) -> int:
    """Start ``cluster``, follow it until SIGTERM/SIGINT, leave gracefully; exit code.

    ``attach`` runs an application while the node is up (``cloister run``'s manager);
    ``metrics_port`` serves Prometheus metrics from before joining until the end. When
    the application fails to start, the node still leaves gracefully before the error
    is raised. A second signal while leaving cancels the leave (the node then expires
    instead).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    main = asyncio.current_task()
    assert main is not None

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.warning("%s again: node %s stops without leaving", sig.name, cluster.node)
            main.cancel()
        else:
            log.info("%s: node %s leaves cluster %s", sig.name, cluster.node, cluster.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    me = f"{cluster.node} pid={os.getpid()}"
    try:
        async with AsyncExitStack() as outer:
            metrics = None
            if metrics_port is not None:
                metrics = await outer.enter_async_context(serve_metrics(cluster, port=metrics_port))
                events.state_watchers.append(metrics.collector.state_changed)
                events.emit(f"metrics port={metrics.port}")
            events.emit(
                f"node {me} starting cluster={cluster.name} "
                f"backend={redact_url(cluster.backend_url)} consensus={cluster.consensus} "
                f"groups={_names(cluster.groups)}"
            )
            cluster.add_hook(events)
            if not await _join(cluster, stop):
                events.emit(f"node {me} stopped before joining")
                return EXIT_OK
            events.emit(f"node {me} started cluster={cluster.name}")
            try:
                async with AsyncExitStack() as running:
                    await running.enter_async_context(_lease_watch(cluster, events))
                    if attach is not None:
                        await running.enter_async_context(attach(Node(cluster, events, metrics)))
                    await _until_stopped_or_dead(cluster, stop)
                    events.emit(f"node {me} leaving")
            except Exception:
                await _leave_quietly(cluster)
                raise
            await cluster.stop()
            events.emit(f"node {me} stopped")
            return EXIT_OK
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _race(task: asyncio.Future[Any], stop: asyncio.Event) -> None:
    """Wait until ``task`` is done or ``stop`` is set, whichever comes first."""
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()


async def _join(cluster: Cluster, stop: asyncio.Event) -> bool:
    """Start ``cluster`` unless ``stop`` comes first; False if it did (nothing joined)."""
    starting = asyncio.ensure_future(cluster.start())
    await _race(starting, stop)
    if not starting.done():  # a signal came before we had joined
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        return False
    starting.result()  # raises the start failure (wrong credentials, unreachable...)
    return True


async def _until_stopped_or_dead(cluster: Cluster, stop: asyncio.Event) -> None:
    """Return when asked to stop; raise the node's failure (exit 1) if it died first."""
    dying = asyncio.ensure_future(cluster.wait_dead())
    try:
        await _race(dying, stop)
    finally:
        dying.cancel()
    if cluster.failure is not None:
        raise cluster.failure


async def _leave_quietly(cluster: Cluster) -> None:
    """Leave after a failure, so the others need not wait for the record to expire."""
    try:
        await cluster.stop()
    except Exception as exc:
        log.warning("node %s could not leave cleanly after a failure: %s", cluster.node, exc)


@contextlib.asynccontextmanager
async def _lease_watch(cluster: Cluster, events: NodeEvents) -> AsyncIterator[None]:
    """Print ``lease acquired/lost`` whenever ``cluster.is_sentry`` flips, and
    ``paused``/``resumed`` whenever ``cluster.paused`` does, while inside."""

    async def watch() -> None:
        held = paused = False
        while True:
            now = cluster.is_sentry
            if now != held:
                held = now
                events.emit(f"lease {'acquired' if held else 'lost'} epoch={cluster.epoch}")
            if cluster.paused != paused:
                paused = cluster.paused
                if paused:
                    events.emit(f"paused reason=lease_lapsed epoch={cluster.epoch}")
                else:
                    events.emit(f"resumed epoch={cluster.epoch}")
            await asyncio.sleep(_LEASE_POLL)

    task = asyncio.get_running_loop().create_task(watch(), name="cloister node lease watch")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _names(names: Any) -> str:
    return ",".join(names) or "-"


class NodeEvents:
    """The node's listener and topology hook: prints the event lines (see module doc)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream
        self.state_watchers: list[Callable[[State, State], None]] = []
        """Also told of every state change (the metrics time rehashing with it)."""

    def emit(self, text: str) -> None:
        """Print ``text t=<monotonic>`` as one flushed line (a closed stdout is ignored)."""
        with contextlib.suppress(BrokenPipeError, ValueError):
            print(f"{text} t={time.monotonic():.6f}", file=self.stream or sys.stdout, flush=True)

    # -- listener ---------------------------------------------------------------------------

    def on_state_change(self, from_state: State, to_state: State, info: ClusterInfo) -> None:
        for watcher in self.state_watchers:
            watcher(from_state, to_state)
        self.emit(
            f"state {from_state} -> {to_state} epoch={info.epoch} members={_names(info.members)} "
            f"sentry={info.sentry or '-'} fingerprint={info.fingerprint or '-'}"
        )

    def on_sentry_change(self, old: str | None, new: str | None, info: ClusterInfo) -> None:
        self.emit(f"sentry {old or '-'} -> {new or '-'} epoch={info.epoch}")

    # -- topology hook ------------------------------------------------------------------------

    async def release(self, topology: Topology) -> None:
        self.emit(
            f"epoch {topology.epoch} members={_names(topology.ring.nodes)} "
            f"sentry={topology.sentry} fingerprint={topology.ring.fingerprint}"
        )

    async def settle(self, topology: Topology) -> None:
        """Nothing to start: a bare node owns keys but runs no work."""

    async def suspend(self, reason: SuspendReason) -> None:
        self.emit(f"suspended reason={reason.replace(' ', '_')}")


@dataclass(frozen=True, slots=True)
class NodeEvent:
    """One event line of ``cloister node``, parsed.

    ``words`` are the space-separated parts without ``=`` (``("ready", "->", "rehashing")``
    for a state line), ``fields`` the ``key=value`` parts, ``t`` the monotonic time.
    """

    kind: str
    words: tuple[str, ...]
    fields: dict[str, str]
    t: float

    @property
    def epoch(self) -> int | None:
        """The epoch the line names (``epoch=`` field, or the number of an epoch line)."""
        if self.kind == "epoch":
            return int(self.words[0])
        value = self.fields.get("epoch")
        return None if value is None else int(value)

    @property
    def members(self) -> tuple[str, ...]:
        """The ``members=`` list (empty for ``-`` or when absent)."""
        value = self.fields.get("members", "-")
        return () if value == "-" else tuple(value.split(","))

    @property
    def change(self) -> tuple[str, str]:
        """``(from, to)`` of a state or sentry line."""
        return self.words[0], self.words[2]


def parse_event(line: str) -> NodeEvent | None:
    """Parse one line ``cloister node`` printed; None for anything else (log lines...)."""
    found = _EVENT.match(line.strip())
    if found is None:
        return None
    kind, body, t = found.groups()
    parts = body.split()
    return NodeEvent(
        kind=kind,
        words=tuple(p for p in parts if "=" not in p),
        fields=dict(p.split("=", 1) for p in parts if "=" in p),
        t=float(t),
    )
