"""``cloister node``: run one bare cluster node until SIGTERM or SIGINT (graceful leave).

This module also holds what ``cloister run`` shares with it: the node options
(:func:`add_node_options`), building the :class:`Cluster` from the resolved settings
(:func:`make_cluster`), the signal-driven lifecycle (:func:`serve`: wait for the medium,
join, serve the probes and metrics, drain within ``--shutdown-timeout``) and the events.

The node logs one record per event, INFO, logger ``cloister.events``, on stderr in the
format of every other log record (``--log-format``, see :mod:`cloister.cli.logs`); its
message is ``<kind> <fields> t=<T>`` where ``T`` is ``time.monotonic()`` (one clock for
every process of a machine, so event logs of several nodes can be merged). Fields are
``key=value`` without spaces; ``-`` stands for "none"; member lists are comma-separated.
Nothing goes to stdout: it is the application's. ``--log-level warning`` hides the events
with the other INFO records. The kinds:

``node <name> pid=<pid> starting cluster=<c> backend=<url> consensus=<k> groups=<g,h>``
    before connecting.
``metrics port=<p>`` / ``health port=<p>``
    the metrics endpoint (``--metrics-port``, with ``/healthz`` and ``/readyz``) or the
    probes alone (``--health-port``) listen, before connecting.
``node <name> pid=<pid> waiting attempt=<n> retry_in=<s>``
    the medium cannot be reached yet (or JetStream is still forming): retried with
    backoff for up to ``--connect-timeout`` seconds.
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
``manager drain timed_out after=<s>`` (``cloister run`` only)
    the handoff did not finish within ``--shutdown-timeout``: the node leaves anyway;
    messages not handled stay in the inbox for the keys' next owner.
``node <name> pid=<pid> leaving`` then ``node <name> pid=<pid> stopped``
    graceful leave after a signal; the exit code is then 0.

:func:`parse_event` reads such a line back (tests and benchmarks use it, through
:mod:`cloister.testing`, which knows the stream).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from typing import Any, TypeVar

from cloister._backoff import Backoff
from cloister._events import NodeEvent, log_event, parse_event
from cloister.cli.logs import CONTEXT
from cloister.cli.options import (
    EXIT_OK,
    NODE,
    UsageError,
    add_common,
    add_connection,
    add_settings,
    add_target,
    connection_options,
    port_number,
    redact_url,
    render_config,
    resolve_target,
)
from cloister.cluster import Cluster, ClusterInfo, State, SuspendReason, Topology
from cloister.errors import BackendUnavailableError
from cloister.health import Health, ProbeServer, serve_health
from cloister.metrics import (
    MetricsUnavailableError,
    NodeMetrics,
    require_prometheus,
    serve_metrics,
)

__all__ = [
    "Node",
    "NodeEvent",
    "NodeEvents",
    "ServeOptions",
    "add_node_options",
    "make_cluster",
    "parse_event",
    "port_number",
    "serve",
]

log = logging.getLogger("cloister.cli")

T = TypeVar("T")

_LEASE_POLL = 0.05
#: Pacing of the startup retries while the medium cannot be reached (--connect-timeout).
CONNECT_BACKOFF = Backoff(0.25, 5.0, jitter=0.5)
#: Of --shutdown-timeout, what is kept for leaving the cluster after the drain.
_LEAVE_SHARE = 0.25
_LEAVE_AT_MOST = 2.0


def add_parser(commands: Any) -> None:
    """Register ``cloister node``."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "node",
        help="run one bare cluster node until SIGTERM/SIGINT",
        description="Run one bare node of a cluster until SIGTERM or SIGINT, then leave "
        "gracefully (exit 0). Logs one line per state change, sentry change and adopted "
        "epoch at INFO, on stderr (see `pydoc cloister.cli.node` for the format).",
        epilog=CONFIG_EPILOG,
    )
    add_target(parser)
    add_node_options(parser)
    add_connection(parser)
    add_common(parser)
    parser.set_defaults(run=run, default_log_level="info")  # the events are INFO records


CONFIG_EPILOG = (
    "Every option can also come from its CLOISTER_* variable (shown with each option) or a "
    "config file (--config, else ./cloister.toml, else [tool.cloister] in ./pyproject.toml; "
    "keys are the options' names without --). A flag wins over its variable, a variable "
    "over the file. --print-config shows the result and where each value came from."
)


def add_node_options(parser: argparse.ArgumentParser) -> None:
    """The options of one node (``node`` and ``run``): name, consensus, groups, timing,
    the metrics and probe endpoint, the startup wait and the shutdown cap."""
    add_settings(parser, NODE, title="node")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the settings as a config file, each with where it came from, and exit",
    )


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """How :func:`serve` runs a node, from the resolved settings."""

    metrics_port: int | None = None
    health_port: int | None = None
    host: str = "0.0.0.0"
    connect_timeout: float = 0.0
    shutdown_timeout: float | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeOptions:
        """The options ``args`` (resolved) describe."""
        return cls(
            metrics_port=args.metrics_port,
            health_port=args.health_port,
            host=args.metrics_host,
            connect_timeout=args.connect_timeout,
            shutdown_timeout=args.shutdown_timeout,
        )


def make_cluster(
    args: argparse.Namespace, events: NodeEvents, extra_groups: tuple[str, ...] = ()
) -> Callable[[], Cluster]:
    """A factory of the node ``args`` describes, reporting to ``events`` (a fresh
    :class:`Cluster` for each attempt to join).

    Checks every setting first, and that ``prometheus_client`` is there when
    ``--metrics-port`` asks for it, so that a mistake fails before anything connects.

    Raises:
        UsageError: a flag, variable or config value is invalid (exit 2).
    """
    backend, name = resolve_target(args)
    if args.metrics_port is not None:
        try:
            require_prometheus()
        except MetricsUnavailableError as exc:
            raise UsageError(f"--metrics-port: {exc}") from None
    if args.metrics_port is not None and args.health_port is not None:
        raise UsageError(
            "--metrics-port already serves /healthz and /readyz: drop --health-port "
            "(or $CLOISTER_HEALTH_PORT), or the metrics"
        )
    settings: dict[str, Any] = {
        "heartbeat": args.heartbeat,
        "failure_timeout": args.failure_timeout,
        "weight": args.weight,
        "consensus": args.consensus,
        "max_concurrent_requests": args.max_concurrent_requests,
    }

    node_name: str | None = args.name

    def build() -> Cluster:
        nonlocal node_name
        cluster = Cluster(
            name,
            node_name,
            backend=backend,
            listener=events,
            groups=(*(args.group or ()), *extra_groups),
            backend_options=connection_options(args),
            **{key: value for key, value in settings.items() if value is not None},
        )
        node_name = cluster.node  # a generated name stays the same from one attempt to the next
        return cluster

    build()  # the settings are checked here (ConfigurationError: exit 2)
    return build


def print_config(args: argparse.Namespace) -> int:
    """``--print-config``: the resolved settings as a config file, on stdout."""
    sys.stdout.write(render_config(args, args.command))
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    """Build the node from the resolved settings, run it until a signal."""
    if args.print_config:
        return print_config(args)
    events = NodeEvents()
    build = make_cluster(args, events)
    return asyncio.run(serve(build, events, options=ServeOptions.from_args(args)))


class Drain:
    """The clock of a graceful stop: ``--shutdown-timeout`` seconds from the signal."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self._began: float | None = None

    def begin(self) -> None:
        """The signal came: the clock starts (once)."""
        if self._began is None:
            self._began = time.monotonic()

    def remaining(self, *, keep: float = 0.0) -> float | None:
        """Seconds left (less ``keep``, never below 0); None: no cap."""
        if self.timeout is None:
            return None
        began = self._began if self._began is not None else time.monotonic()
        return max(0.0, began + self.timeout - time.monotonic() - keep)

    def keep_for_leaving(self) -> float:
        """What the drain leaves for the node to leave the cluster."""
        if self.timeout is None:
            return 0.0
        return min(_LEAVE_AT_MOST, self.timeout * _LEAVE_SHARE)


@dataclass(frozen=True, slots=True)
class Node:
    """What an application attached to a running node may use (see :func:`serve`)."""

    cluster: Cluster
    events: NodeEvents
    metrics: NodeMetrics | None
    health: Health | None = None
    drain: Drain | None = None
    """When a stop must be done by (``--shutdown-timeout``)."""
    retry_until: float = 0.0
    """``time.monotonic()`` until which transient medium errors at startup are retried."""


Attach = Callable[[Node], AbstractAsyncContextManager[object]]
"""Runs an application on a joined node: entered once joined, left when the node leaves
(before the cluster stops), e.g. start a manager, and stop it with handoff on exit."""


async def serve(
    build: Callable[[], Cluster],
    events: NodeEvents,
    *,
    attach: Attach | None = None,
    options: ServeOptions | None = None,
) -> int:
    """Start a node from ``build``, follow it until SIGTERM/SIGINT, leave gracefully; the
    exit code.

    The medium is tried until ``options.connect_timeout`` has passed (a fresh cluster
    object per attempt, paced by :data:`CONNECT_BACKOFF`); ``attach`` runs an
    application while the node is up (``cloister run``'s manager); the metrics or probe
    endpoint serves from before joining until the end. A stop takes at most
    ``options.shutdown_timeout`` seconds: the application's drain is cut short, and so is
    the leave. When the application fails to start, the node still leaves gracefully
    before the error is raised. A second signal while leaving cancels the leave (the node
    then expires instead).
    """
    options = options or ServeOptions()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    drain = Drain(options.shutdown_timeout)
    main = asyncio.current_task()
    assert main is not None

    def made() -> Cluster:
        built = build()
        built.add_hook(events)  # the epoch and suspended lines
        CONTEXT.cluster = built
        return built

    cluster = made()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.warning("%s again: node %s stops without leaving", sig.name, cluster.node)
            main.cancel()
        else:
            log.info("%s: node %s leaves cluster %s", sig.name, cluster.node, cluster.name)
        drain.begin()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    me = f"{cluster.node} pid={os.getpid()}"
    retry_until = time.monotonic() + options.connect_timeout
    try:
        async with AsyncExitStack() as outer:
            endpoint = await _start_endpoint(outer, cluster, events, options)
            events.emit(
                f"node {me} starting cluster={cluster.name} "
                f"backend={redact_url(cluster.backend_url)} consensus={cluster.consensus} "
                f"groups={_names(cluster.groups)}"
            )

            def fresh() -> Cluster:
                nonlocal cluster
                cluster = made()
                endpoint.rebind(cluster)
                return cluster

            joined = await _join(cluster, fresh, stop, retry_until, events, me)
            if joined is None:
                events.emit(f"node {me} stopped before joining")
                return EXIT_OK
            cluster = joined
            events.emit(f"node {me} started cluster={cluster.name}")
            node = Node(cluster, events, endpoint.metrics, endpoint.health, drain, retry_until)
            try:
                async with AsyncExitStack() as running:
                    await running.enter_async_context(_lease_watch(cluster, events))
                    if attach is not None:
                        await running.enter_async_context(attach(node))
                    await _until_stopped_or_dead(cluster, stop)
                    drain.begin()
                    events.emit(f"node {me} leaving")
            except Exception:
                await _leave_quietly(cluster)
                raise
            await _leave(cluster, drain)
            events.emit(f"node {me} stopped")
            return EXIT_OK
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


@dataclass(slots=True)
class _Endpoint:
    """The metrics endpoint or the probes alone (or neither), pointed at the live node."""

    metrics: NodeMetrics | None = None
    probes: ProbeServer | None = None

    @property
    def health(self) -> Health | None:
        if self.metrics is not None:
            return self.metrics.health
        return None if self.probes is None else self.probes.health

    def rebind(self, cluster: Cluster) -> None:
        """Report ``cluster`` from now on (a fresh attempt to join)."""
        if self.metrics is not None:
            self.metrics.collector.cluster = cluster
        if self.health is not None:
            self.health.cluster = cluster


async def _start_endpoint(
    stack: AsyncExitStack, cluster: Cluster, events: NodeEvents, options: ServeOptions
) -> _Endpoint:
    if options.metrics_port is not None:
        metrics = await stack.enter_async_context(
            serve_metrics(
                cluster,
                port=options.metrics_port,
                host=options.host,
                flag="--metrics-port ($CLOISTER_METRICS_PORT)",
            )
        )
        events.state_watchers.append(metrics.collector.state_changed)
        events.emit(f"metrics port={metrics.port}")
        return _Endpoint(metrics=metrics)
    if options.health_port is not None:
        probes = await stack.enter_async_context(
            serve_health(
                cluster,
                port=options.health_port,
                host=options.host,
                flag="--health-port ($CLOISTER_HEALTH_PORT)",
            )
        )
        events.emit(f"health port={probes.port}")
        return _Endpoint(probes=probes)
    return _Endpoint()


async def _race(task: asyncio.Future[Any], stop: asyncio.Event) -> None:
    """Wait until ``task`` is done or ``stop`` is set, whichever comes first."""
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()


async def _join(
    cluster: Cluster,
    fresh: Callable[[], Cluster],
    stop: asyncio.Event,
    retry_until: float,
    events: NodeEvents,
    me: str,
) -> Cluster | None:
    """Start ``cluster`` unless ``stop`` comes first (None: nothing joined).

    While the medium is unreachable (or JetStream not ready: "no suitable peers" right
    after its cluster formed) try again, with a ``fresh()`` cluster, until ``retry_until``.
    """
    delays = CONNECT_BACKOFF.delays()
    attempt = 0
    while True:
        attempt += 1
        starting = asyncio.ensure_future(cluster.start())
        await _race(starting, stop)
        if not starting.done():  # a signal came before we had joined
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return None
        try:
            starting.result()  # raises the start failure (wrong credentials, unreachable...)
            return cluster
        except BackendUnavailableError as exc:
            pause = next(delays)
            if time.monotonic() + pause > retry_until:
                if attempt == 1:
                    raise
                raise BackendUnavailableError(
                    f"{exc} (gave up after {attempt} attempts; --connect-timeout / "
                    "$CLOISTER_CONNECT_TIMEOUT sets how long to keep trying)"
                ) from exc
            log.warning(
                "node %s cannot join yet (%s); attempt %d, retrying in %.1fs",
                cluster.node,
                exc,
                attempt,
                pause,
            )
            events.emit(f"node {me} waiting attempt={attempt} retry_in={pause:.2f}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
            if stop.is_set():
                return None
            cluster = fresh()


async def retry_transient(operation: Callable[[], Awaitable[T]], until: float, what: str) -> T:
    """Run ``operation``, again while the medium is transiently unavailable, until
    ``until`` (``time.monotonic()``); then its error is raised as it is."""
    delays = CONNECT_BACKOFF.delays()
    while True:
        try:
            return await operation()
        except BackendUnavailableError as exc:
            pause = next(delays)
            if time.monotonic() + pause > until:
                raise
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, pause)
            await asyncio.sleep(pause)


async def _until_stopped_or_dead(cluster: Cluster, stop: asyncio.Event) -> None:
    """Return when asked to stop; raise the node's failure (exit 1) if it died first."""
    dying = asyncio.ensure_future(cluster.wait_dead())
    try:
        await _race(dying, stop)
    finally:
        dying.cancel()
    if cluster.failure is not None:
        raise cluster.failure


async def _leave(cluster: Cluster, drain: Drain) -> None:
    """Leave gracefully, within what is left of the shutdown timeout (at least a moment:
    a leave saves the others waiting for our record to expire)."""
    budget = drain.remaining()
    if budget is not None:
        budget = max(budget, 0.5)
    try:
        await asyncio.wait_for(cluster.stop(), budget)
    except TimeoutError:
        log.warning(
            "node %s did not finish leaving within --shutdown-timeout (%gs); it exits now "
            "and its member record expires on its own",
            cluster.node,
            drain.timeout,
        )


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
    """The node's listener and topology hook: logs the events (see module doc)."""

    def __init__(self) -> None:
        self.state_watchers: list[Callable[[State, State], None]] = []
        """Also told of every state change (the metrics time rehashing with it)."""

    def emit(self, text: str) -> None:
        """Log the event ``text`` (``<kind> <fields>``) as a record of ``cloister.events``."""
        log_event(text)

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
