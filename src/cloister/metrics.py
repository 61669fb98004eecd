"""Prometheus metrics of one node: its cluster view and its manager's counters.

:class:`NodeCollector` is a Prometheus *collector*: nothing is counted on the hot path,
every scrape reads the live objects — the cluster's state, epoch, members and counters,
the manager's counters and its number of live workers. The one figure that costs a
request to the backend, the inbox depth, is sampled in the background every
``sample_interval`` seconds (see :meth:`NodeMetrics.attach`) and the scrape returns the
last sample. ``cloister run --metrics-port`` and ``cloister node --metrics-port`` serve
them on ``http://HOST:PORT/metrics``; in your own process::

    async with serve_metrics(cluster, port=9464) as metrics:
        manager = await Processor.start(cluster)
        metrics.attach(manager)
        ...

Every series has the labels ``cluster`` and ``node``; the manager's also ``manager``:

================================================  =======  =================================
metric                                            type     meaning
================================================  =======  =================================
``cloister_node_state{state}``                    gauge    1 for the node's state, else 0
``cloister_epoch``                                gauge    the epoch this node adopted
``cloister_members``                              gauge    members of that epoch
``cloister_consensus``                            gauge    members needed before ready
``cloister_is_sentry``                            gauge    1 while this node is the sentry
``cloister_epochs_adopted_total``                 counter  topology changes seen
``cloister_fenced_total``                         counter  self-fencings (renewal failed)
``cloister_heartbeat_failures_total``             counter  failed membership renewals
``cloister_bad_records_total``                    counter  malformed records ignored
``cloister_malformed_records_total{kind}``        counter  the same by kind: member,
                                                           ghost_member, epoch, sentry
``cloister_event_loop_lag_seconds``               gauge    how late the event loop ran its last
                                                           tick (a callback held it)
``cloister_event_loop_stalls_total``              counter  loop held longer than 0.25 s (each
                                                           logged once, naming the code)
``cloister_rehash_seconds``                       summary  time from leaving ``ready`` (or
                                                           ``assembling``) to ``ready`` again:
                                                           the longest a moved key can pause
``cloister_last_rehash_seconds``                  gauge    the last such pause
``cloister_manager_state{state}``                 gauge    1 for the manager's state
``cloister_manager_workers``                      gauge    live (owned) workers here
``cloister_manager_inbox_depth``                  gauge    inbox backlog of this node's partitions
                                                           (whole cluster; sampled)
``cloister_manager_performs_total`` ...           counter  one per manager counter:
                                                           performs, calls, casts, errors
                                                           (callbacks that raised),
                                                           timeouts, handed_off,
                                                           taken_over, duplicates,
                                                           retries, dead_letters,
                                                           late_results, fenced_writes
================================================  =======  =================================

``prometheus_client`` is optional (``pip install 'pycloister[metrics]'``);
:func:`require_prometheus` says so clearly when it is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from cloister.cluster.control import MALFORMED_KINDS
from cloister.cluster.states import State
from cloister.errors import CloisterError, ConfigurationError

if TYPE_CHECKING:
    from cloister.cluster import Cluster
    from cloister.manager import DynamicManager

__all__ = [
    "MANAGER_STATES",
    "MetricsUnavailableError",
    "NodeCollector",
    "NodeMetrics",
    "require_prometheus",
    "serve_metrics",
]

log = logging.getLogger("cloister.metrics")

MANAGER_STATES = ("starting", "up", "rehashing", "down")
"""The states a :class:`~cloister.manager.DynamicManager` goes through."""

_CLUSTER_COUNTERS = {
    "epochs_adopted": "Topology changes (epochs) this node adopted.",
    "fenced": "Times this node fenced itself because it could not renew its membership.",
    "heartbeat_failures": "Membership renewals that failed.",
    "bad_records": "Malformed member or control records ignored.",
    "crashes_seen": "Members whose process was gone (no responders), removed before their TTL.",
}
_MANAGER_COUNTERS = {
    "performs": "perform callbacks run.",
    "calls": "Calls handled by workers on this node.",
    "casts": "Casts handled by workers on this node.",
    "errors": "Callbacks that raised (perform, handle_call, handle_cast, ...).",
    "timeouts": "Performs that ran longer than lull x timeout.",
    "handed_off": "Workers handed over to another node (leaving or rehashing).",
    "taken_over": "Workers taken over from another node with their payload.",
    "duplicates": "Inbox messages delivered again and skipped (already handled).",
    "retries": "Inbox messages retried after a failing handle_cast.",
    "dead_letters": "Inbox messages parked after max_attempts failures.",
    "late_results": "Callback results discarded: they came back after the lease ran out.",
    "handler_timeouts": "Callbacks that ran longer than handler_timeout.",
    "abandoned": "Callbacks abandoned at handler_timeout (their message retried).",
    "stalls": "Stalls found (up, records waiting, nothing in flight or handled) and healed.",
    "fenced_writes": "State records the medium refused: another node claimed their partition.",
}


class MetricsUnavailableError(ConfigurationError):
    """Metrics were asked for but ``prometheus_client`` is not installed."""


def require_prometheus() -> None:
    """Check that ``prometheus_client`` can be imported.

    Raises:
        MetricsUnavailableError: it cannot; the message says how to install it.
    """
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise MetricsUnavailableError(
            "Prometheus metrics need the prometheus_client package: "
            "pip install 'pycloister[metrics]' (or pip install prometheus_client)"
        ) from None


class NodeCollector:
    """A Prometheus collector reading one node's live objects at scrape time.

    Scrapes run in the HTTP server's thread: they only read attributes and copy small
    dicts (atomic under the GIL), never await, never touch the backend.
    """

    def __init__(self, cluster: Cluster, manager: DynamicManager | None = None) -> None:
        self.cluster = cluster
        self.manager = manager
        self.inbox_depth: int | None = None
        """The last sampled inbox depth (None before the first sample, or no inbox)."""
        self._rehash_began: float | None = None
        self._rehashes = 0
        self._rehash_total = 0.0
        self._last_rehash: float | None = None

    def state_changed(self, from_state: State, to_state: State) -> None:
        """Time the rehashes (call it from the cluster's listener, on every transition).

        A rehash runs from leaving ``ready`` or ``assembling`` to ``ready``: while it
        lasts, keys that move are stopped on their old owner and not started on the new.
        """
        if to_state is State.REHASHING and self._rehash_began is None:
            self._rehash_began = time.monotonic()
        elif to_state is State.READY and self._rehash_began is not None:
            took = time.monotonic() - self._rehash_began
            self._rehash_began = None
            self._rehashes += 1
            self._rehash_total += took
            self._last_rehash = took
        elif to_state in (State.STOPPING, State.STOPPED):
            self._rehash_began = None

    def describe(self) -> list[Any]:
        """Nothing to check ahead: names are fixed and registered once per registry."""
        return []

    def collect(self) -> Iterator[Any]:
        """The metric families (called by ``prometheus_client`` on every scrape)."""
        cluster = self.cluster
        info = cluster.info
        labels = _Labels(("cluster", cluster.name), ("node", cluster.node))
        yield labels.one_hot("node_state", "The state this node is in.", State, info.state)
        yield labels.gauge("epoch", "The epoch this node adopted (0 before the first).", info.epoch)
        yield labels.gauge("members", "Members of the adopted epoch.", len(info.members))
        yield labels.gauge("consensus", "Members needed before any node is ready.", info.consensus)
        yield labels.gauge("is_sentry", "1 while this node is the sentry.", info.is_sentry)
        yield from labels.counters("", cluster.counters.as_dict(), _CLUSTER_COUNTERS)
        yield labels.labelled_counter(
            "malformed_records",
            "Malformed member or control records ignored or repaired, by kind.",
            "kind",
            cluster.counters.malformed,
            MALFORMED_KINDS,
        )
        if (loop_watch := cluster.loop_watch) is not None:
            yield labels.gauge(
                "event_loop_lag_seconds",
                "How late the node's event loop ran its last tick (blocked by a callback).",
                loop_watch.lag,
            )
            yield from labels.counters(
                "event_loop_",
                {"stalls": loop_watch.stalls},
                {"stalls": "Times the event loop was held longer than 0.25 s."},
            )
        yield labels.summary(
            "rehash_seconds",
            "Rehashes: from leaving ready (or assembling) to ready again.",
            self._rehashes,
            self._rehash_total,
        )
        if self._last_rehash is not None:
            yield labels.gauge("last_rehash_seconds", "The last rehash.", self._last_rehash)
        manager = self.manager
        if manager is None:
            return
        labels = labels.plus("manager", manager.manager_name)
        yield labels.one_hot(
            "manager_state", "The state the manager is in.", MANAGER_STATES, manager.state
        )
        yield labels.gauge("manager_workers", "Live workers on this node (it owns).", len(manager))
        yield labels.gauge(
            "manager_stalled",
            "1 while the manager is up with records waiting and nothing in flight or handled.",
            manager.stalled,
        )
        if self.inbox_depth is not None:
            yield labels.gauge(
                "manager_inbox_depth",
                "Inbox messages stored and not yet handled, whole cluster (sampled).",
                self.inbox_depth,
            )
        yield from labels.counters("manager_", manager.counters.as_dict(), _MANAGER_COUNTERS)


class _Labels:
    """Builds ``cloister_*`` metric families that all carry the same labels."""

    def __init__(self, *pairs: tuple[str, str]) -> None:
        self.pairs = pairs
        self.names = [name for name, _ in pairs]
        self.values = [value for _, value in pairs]

    def plus(self, name: str, value: str) -> _Labels:
        return _Labels(*self.pairs, (name, value))

    def gauge(self, name: str, doc: str, value: float) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(f"cloister_{name}", doc, labels=self.names)
        family.add_metric(self.values, float(value))
        return family

    def summary(self, name: str, doc: str, count: int, total: float) -> Any:
        from prometheus_client.core import SummaryMetricFamily

        family = SummaryMetricFamily(f"cloister_{name}", doc, labels=self.names)
        family.add_metric(self.values, count_value=count, sum_value=total)
        return family

    def labelled_counter(
        self, name: str, doc: str, label: str, values: dict[str, int], options: Iterable[str]
    ) -> Any:
        """A counter with a ``label``: one sample per option (0 when absent from ``values``)."""
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(f"cloister_{name}", doc, labels=[*self.names, label])
        counts = dict(values)  # a copy: the loop thread may add keys
        for option in dict.fromkeys([*options, *counts]):
            family.add_metric([*self.values, option], counts.get(option, 0))
        return family

    def one_hot(self, name: str, doc: str, options: Iterable[str], current: str) -> Any:
        """A gauge with a ``state`` label: 1 for ``current``, 0 for the other ``options``."""
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(f"cloister_{name}", doc, labels=[*self.names, "state"])
        for option in options:
            family.add_metric([*self.values, str(option)], float(option == current))
        return family

    def counters(
        self, prefix: str, counters: dict[str, int], docs: dict[str, str]
    ) -> Iterator[Any]:
        """One ``cloister_<prefix><key>_total`` counter per entry of ``counters``."""
        from prometheus_client.core import CounterMetricFamily

        for key, value in dict(counters).items():  # a copy: the loop thread may add keys
            doc = docs.get(key, f"The {key} counter.")
            family = CounterMetricFamily(f"cloister_{prefix}{key}", doc, labels=self.names)
            family.add_metric(self.values, value)
            yield family


class NodeMetrics:
    """The metrics endpoint of one node: a collector, an HTTP server, an inbox sampler.

    Create it with :func:`serve_metrics`, which starts and stops it.
    """

    def __init__(
        self,
        cluster: Cluster,
        *,
        port: int,
        host: str = "0.0.0.0",
        sample_interval: float = 5.0,
    ) -> None:
        require_prometheus()
        self.collector = NodeCollector(cluster)
        self.host = host
        self.sample_interval = sample_interval
        self._requested_port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._sampler: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The port the endpoint listens on (the one picked, if 0 was asked for)."""
        if self._server is None:
            return self._requested_port
        return int(self._server.server_port)

    def start(self) -> None:
        """Listen on ``host:port`` (an :class:`OSError` if the port is taken)."""
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.process_collector import ProcessCollector

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        ProcessCollector(registry=registry)  # process_cpu_seconds_total, memory, fds
        self._server, self._thread = start_http_server(
            self._requested_port, addr=self.host, registry=registry
        )
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    def attach(self, manager: DynamicManager) -> None:
        """Report ``manager`` too, and sample its inbox depth in the background.

        Call it from the event loop that runs ``manager``.
        """
        self.collector.manager = manager
        if self._sampler is None:
            self._sampler = asyncio.get_running_loop().create_task(
                self._sample(manager), name="cloister metrics inbox sampler"
            )

    async def close(self) -> None:
        """Stop sampling and serving. Safe to call twice."""
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(_shutdown, server, self._thread)

    async def _sample(self, manager: DynamicManager) -> None:
        while True:
            try:
                depth: int | None = await asyncio.wait_for(
                    manager.inbox_depth(owned=True), timeout=max(1.0, self.sample_interval)
                )
            except (CloisterError, TimeoutError) as exc:
                log.debug("inbox depth not sampled: %s", exc)
                depth = None
            self.collector.inbox_depth = depth
            await asyncio.sleep(self.sample_interval)


def _shutdown(server: Any, thread: threading.Thread | None) -> None:
    server.shutdown()
    server.server_close()
    if thread is not None:
        thread.join(5.0)


@contextlib.asynccontextmanager
async def serve_metrics(
    cluster: Cluster,
    *,
    port: int,
    host: str = "0.0.0.0",
    sample_interval: float = 5.0,
) -> AsyncIterator[NodeMetrics]:
    """Serve ``cluster``'s metrics on ``http://host:port/metrics`` while inside.

    Raises:
        MetricsUnavailableError: ``prometheus_client`` is not installed.
        OSError: the port cannot be bound.
    """
    metrics = NodeMetrics(cluster, port=port, host=host, sample_interval=sample_interval)
    metrics.start()
    try:
        yield metrics
    finally:
        await metrics.close()
