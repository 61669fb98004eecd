"""Prometheus metrics of one node: its cluster view, its manager's counters and timings.

:class:`NodeCollector` is a Prometheus *collector*: every scrape reads the live objects —
the cluster's state, epoch, members and counters, the manager's counters, its
histograms (plain :class:`~cloister._histogram.Histogram` objects the engine fills: no
lock, no ``prometheus_client`` on the hot path) and its number of live workers. The
figures that cost a request to the backend — the inbox depth of this node's partitions
and of all of them, the stored dead letters — are sampled in the background every
``sample_interval`` seconds (see :meth:`NodeMetrics.attach`) and the scrape returns the
last sample. ``cloister run --metrics-port`` and ``cloister node --metrics-port`` serve
them on ``http://HOST:PORT/metrics``, next to the probes ``/healthz`` and ``/readyz``
(:mod:`cloister.health`); any other path is a 404. In your own process::

    async with serve_metrics(cluster, port=9464) as metrics:
        manager = await Processor.start(cluster)
        metrics.attach(manager)
        source = await RabbitMQSource.start(manager, "amqp://...", queue="orders", key=key)
        report_source(source)                      # any number of sources
        ...

Every series has the labels ``cluster`` and ``node``; the manager's also ``manager``, a
source's also ``source``:

=================================================  =========  ==============================
metric                                             type       meaning
=================================================  =========  ==============================
``cloister_node_state{state}``                     gauge      1 for the node's state, else 0
``cloister_epoch``                                 gauge      the epoch this node adopted
``cloister_members``                               gauge      members of that epoch
``cloister_consensus``                             gauge      members needed before ready
``cloister_is_sentry``                             gauge      1 while this node is the sentry
``cloister_epochs_adopted_total``                  counter    topology changes seen
``cloister_fenced_total``                          counter    self-fencings (renewal failed)
``cloister_heartbeat_failures_total``              counter    failed membership renewals
``cloister_bad_records_total``                     counter    malformed records ignored
``cloister_requests_refused_total``                counter    requests refused unrun (``busy``):
                                                              at ``max_concurrent_requests``
                                                              or their queue full
``cloister_request_errors_total``                  counter    requests and multicasts that were
                                                              undecodable, refused or failed
``cloister_malformed_records_total{kind}``         counter    the same by kind: member,
                                                              ghost_member, epoch, sentry
``cloister_unauthenticated_records_total{kind}``   counter    records and requests refused
                                                              for a missing or bad tag (a
                                                              cluster secret is set), each
                                                              once, by kind: member, epoch,
                                                              sentry, claim, state, inbox,
                                                              dead_letter, table, request,
                                                              reply
``cloister_medium_data_loss_total``                counter    times the medium was found to
                                                              have lost its data (rebuilt)
``cloister_medium_rebuilding``                     gauge      1 from a data loss until the
                                                              node settled on a new epoch
``cloister_event_loop_lag_seconds``                gauge      how late the event loop ran its
                                                              last tick (a callback held it)
``cloister_event_loop_delay_seconds``              histogram  the same, every tick (50 ms)
``cloister_event_loop_stalls_total``               counter    loop held longer than 0.25 s
                                                              (each logged, naming the code)
``cloister_rehash_seconds``                        histogram  from leaving ``ready`` (or
                                                              ``assembling``) to ``ready``
                                                              again: the longest a moved key
                                                              can pause, one per epoch
``cloister_last_rehash_seconds``                   gauge      the last such pause
``cloister_manager_state{state}``                  gauge      1 for the manager's state
``cloister_manager_workers``                       gauge      live (owned) workers here
``cloister_manager_inbox_depth``                   gauge      inbox backlog of the partitions
                                                              this node consumes (sampled)
``cloister_cluster_inbox_depth``                   gauge      inbox backlog of all partitions,
                                                              the same on every node (sampled)
``cloister_manager_dead_letters``                  gauge      messages parked in the
                                                              dead-letter bucket (sampled)
``cloister_manager_callback_seconds{callback}``    histogram  perform / handle_cast /
                                                              handle_call, start to applied
``cloister_manager_cast_latency_seconds``          histogram  inbox record stored to its
                                                              handle_cast applied
``cloister_manager_handoff_seconds{phase}``        histogram  each epoch's release (hand over)
                                                              and settle (claim, load, start)
``cloister_manager_casts_total`` ...               counter    one per manager counter: casts
                                                              handled (failed tries count as
                                                              errors and retries), performs,
                                                              calls, errors, timeouts,
                                                              handed_off, taken_over,
                                                              duplicates, retries,
                                                              dead_letters, late_results,
                                                              fenced_writes, state_lost
``cloister_source_messages_total{outcome}``        counter    a source's messages: received,
                                                              stored, parked, failed (tries),
                                                              released, ack_errors
``cloister_source_in_flight``                      gauge      received, not yet acked or
                                                              given back
``cloister_source_partitions``                     gauge      broker partitions this node
                                                              reads (0 in shared mode)
``cloister_source_moves_total{direction}``         counter    partitions taken / released
=================================================  =========  ==============================

A source's series appear once it is reported: ``cloister.metrics.report_source(source)``
(every node of the process exports it until the source is gone), e.g. from the
``start`` of the manager a ``cloister run`` application defines.

A source's figures add up at every scrape: ``received == stored + parked + released +
in_flight`` (one snapshot of its counters).

``prometheus_client`` is optional (``pip install 'pycloister[metrics]'``);
:func:`require_prometheus` says so clearly when it is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from cloister._histogram import Histogram
from cloister.cluster.control import MALFORMED_KINDS
from cloister.cluster.states import State
from cloister.errors import CloisterError, ConfigurationError
from cloister.health import Health, ProbeServer
from cloister.schema import KINDS

if TYPE_CHECKING:
    from cloister.cluster import Cluster
    from cloister.manager import DynamicManager

__all__ = [
    "MANAGER_STATES",
    "SOURCE_OUTCOMES",
    "MetricSource",
    "MetricsUnavailableError",
    "NodeCollector",
    "NodeMetrics",
    "report_source",
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
    "medium_data_loss": "Times this node found the medium had lost its data (a server "
    "restarted with an empty store) and rebuilt its control plane.",
    "requests_refused": "Requests refused unrun (busy): at max_concurrent_requests or queue full.",
    "request_errors": "Requests and multicasts undecodable, refused or failed by their handler.",
    "crashes_seen": "Members whose process was gone (no responders), removed before their TTL.",
}
_MANAGER_COUNTERS = {
    "performs": "perform callbacks run.",
    "calls": "Calls handled by workers on this node.",
    "casts": "Casts handled by workers on this node (failed tries count as errors).",
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
    "state_lost": "Stored worker records of this node's partitions the medium lost.",
}
SOURCE_OUTCOMES = ("received", "stored", "parked", "failed", "released", "ack_errors")
"""The counters of a :class:`~cloister.sources.base.Source`, exported by outcome."""


class MetricSource(Protocol):
    """What the metrics read of a broker source (:class:`~cloister.sources.base.Source`)."""

    name: str
    counters: dict[str, int]

    @property
    def in_flight(self) -> int: ...

    @property
    def reading(self) -> frozenset[int]: ...


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


_SOURCES: weakref.WeakSet[Any] = weakref.WeakSet()


def report_source(source: MetricSource) -> None:
    """Export ``source``'s counters (a :class:`~cloister.sources.base.Source`) from every
    node's metrics in this process, until the source is garbage-collected."""
    _SOURCES.add(source)


class NodeCollector:
    """A Prometheus collector reading one node's live objects at scrape time.

    Scrapes run in the HTTP server's thread: they only read attributes and copy small
    dicts (atomic under the GIL), never await, never touch the backend.
    """

    def __init__(self, cluster: Cluster, manager: DynamicManager | None = None) -> None:
        self.cluster = cluster
        self.manager = manager
        self.inbox_depth: int | None = None
        """The last sampled inbox depth of this node's partitions (None before the first
        sample, or no inbox)."""
        self.cluster_inbox_depth: int | None = None
        """The last sampled inbox depth of all partitions."""
        self.dead_letters: int | None = None
        """The last sampled number of parked messages."""
        self._rehash_began: float | None = None
        self._rehashes = Histogram()
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
            self._rehashes.observe(took)
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
        yield labels.labelled_counter(
            "unauthenticated_records",
            "Records and requests refused for a missing or bad tag of the cluster secret.",
            "kind",
            cluster.counters.unauthenticated,
            [kind.name for kind in KINDS],
        )
        yield labels.gauge(
            "medium_rebuilding",
            "1 from a medium data loss until this node settled on an epoch published after it.",
            info.rebuilding,
        )
        if (loop_watch := cluster.loop_watch) is not None:
            yield labels.gauge(
                "event_loop_lag_seconds",
                "How late the node's event loop ran its last tick (blocked by a callback).",
                loop_watch.lag,
            )
            yield labels.histogram(
                "event_loop_delay_seconds",
                "How late the node's event loop ran each tick (every 50 ms).",
                loop_watch.delays,
            )
            yield from labels.counters(
                "event_loop_",
                {"stalls": loop_watch.stalls},
                {"stalls": "Times the event loop was held longer than 0.25 s."},
            )
        yield labels.histogram(
            "rehash_seconds",
            "Rehashes: from leaving ready (or assembling) to ready again, one per epoch.",
            self._rehashes,
        )
        if self._last_rehash is not None:
            yield labels.gauge("last_rehash_seconds", "The last rehash.", self._last_rehash)
        for source in list(_SOURCES):
            yield from self._source(labels.plus("source", source.name), source)
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
        sampled = (
            ("manager_inbox_depth", "this node's partitions", self.inbox_depth),
            ("cluster_inbox_depth", "all partitions, whole cluster", self.cluster_inbox_depth),
        )
        for name, where, depth in sampled:
            if depth is not None:
                doc = f"Inbox messages stored and not yet handled, {where} (sampled)."
                yield labels.gauge(name, doc, depth)
        if self.dead_letters is not None:
            yield labels.gauge(
                "manager_dead_letters",
                "Messages parked in the dead-letter bucket, whole cluster (sampled).",
                self.dead_letters,
            )
        timings = manager.timings
        yield labels.labelled_histogram(
            "manager_callback_seconds",
            "Callbacks from start (or queueing on the pool) to result applied.",
            "callback",
            timings.callbacks,
        )
        yield labels.histogram(
            "manager_cast_latency_seconds",
            "Inbox records from stored by the medium to their handle_cast applied.",
            timings.cast_latency,
        )
        yield labels.labelled_histogram(
            "manager_handoff_seconds",
            "Each epoch's release (stop, hand over) and settle (claim, load, start, consume).",
            "phase",
            timings.handoff,
        )
        yield from labels.counters("manager_", manager.counters.as_dict(), _MANAGER_COUNTERS)

    @staticmethod
    def _source(labels: _Labels, source: MetricSource) -> Iterator[Any]:
        counts = dict(source.counters)  # a copy: the loop thread goes on counting
        yield labels.labelled_counter(
            "source_messages",
            "Broker messages of this source by outcome: received, stored, parked (dead "
            "letters), failed (tries to store), released (given back), ack_errors.",
            "outcome",
            {outcome: counts.get(outcome, 0) for outcome in SOURCE_OUTCOMES},
            SOURCE_OUTCOMES,
        )
        yield labels.gauge(
            "source_in_flight",
            "Messages received and neither acknowledged nor given back yet.",
            source.in_flight,
        )
        yield labels.gauge(
            "source_partitions",
            "Broker partitions this node reads (0 in shared mode).",
            len(source.reading),
        )
        yield labels.labelled_counter(
            "source_moves",
            "Broker partitions this node started reading (taken) or let go of (released).",
            "direction",
            {
                "taken": counts.get("partitions_taken", 0),
                "released": counts.get("partitions_released", 0),
            },
            ("taken", "released"),
        )


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

    def histogram(self, name: str, doc: str, histogram: Histogram) -> Any:
        from prometheus_client.core import HistogramMetricFamily

        family = HistogramMetricFamily(f"cloister_{name}", doc, labels=self.names)
        buckets, total = histogram.snapshot()
        family.add_metric(self.values, _buckets(buckets), sum_value=total)
        return family

    def labelled_histogram(
        self, name: str, doc: str, label: str, histograms: dict[str, Histogram]
    ) -> Any:
        """A histogram with a ``label``: one series per entry of ``histograms``."""
        from prometheus_client.core import HistogramMetricFamily

        family = HistogramMetricFamily(f"cloister_{name}", doc, labels=[*self.names, label])
        for option, histogram in histograms.items():
            buckets, total = histogram.snapshot()
            family.add_metric([*self.values, option], _buckets(buckets), sum_value=total)
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


def _buckets(buckets: list[tuple[float, int]]) -> list[tuple[str, float]]:
    """Prometheus ``le`` labels: ``0.005``, ..., ``+Inf``."""
    return [
        ("+Inf" if bound == float("inf") else repr(bound), float(count)) for bound, count in buckets
    ]


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
        flag: str = "the port",
    ) -> None:
        require_prometheus()
        self.collector = NodeCollector(cluster)
        self.health = Health(cluster)
        """Answers ``/healthz`` and ``/readyz`` on the same port (:mod:`cloister.health`)."""
        self.host = host
        self.sample_interval = sample_interval
        self._endpoint = ProbeServer(
            self.health, host=host, port=port, metrics=self._exposition, flag=flag
        )
        self._registry: Any = None
        self._sampler: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The port the endpoint listens on (the one picked, if 0 was asked for)."""
        return self._endpoint.port

    def start(self) -> None:
        """Listen on ``host:port``: ``/metrics``, ``/healthz`` and ``/readyz``.

        Raises:
            PortInUseError: the port is taken (the message names it).
        """
        from prometheus_client import CollectorRegistry
        from prometheus_client.process_collector import ProcessCollector

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        ProcessCollector(registry=registry)  # process_cpu_seconds_total, memory, fds
        self._registry = registry
        self._endpoint.start()

    def _exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self._registry), CONTENT_TYPE_LATEST

    def attach(self, manager: DynamicManager) -> None:
        """Report ``manager`` too (metrics and readiness), and sample its inbox depth in
        the background.

        Call it from the event loop that runs ``manager``.
        """
        self.collector.manager = manager
        self.health.attach(manager)
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
        await self._endpoint.close()

    async def _sample(self, manager: DynamicManager) -> None:
        collector, patience = self.collector, max(1.0, self.sample_interval)

        async def sample(what: str, reading: Awaitable[int]) -> int | None:
            try:
                return await asyncio.wait_for(reading, timeout=patience)
            except (CloisterError, TimeoutError) as exc:
                log.debug("%s not sampled: %s", what, exc)
                return None

        while True:
            collector.inbox_depth = await sample("inbox depth", manager.inbox_depth(owned=True))
            collector.cluster_inbox_depth = await sample(
                "cluster inbox depth", manager.inbox_depth()
            )
            collector.dead_letters = await sample("dead letters", _dead_letters(manager))
            await asyncio.sleep(self.sample_interval)


async def _dead_letters(manager: DynamicManager) -> int:
    return await manager.inbox.dead_letter_count()  # NotRunningError without an inbox


@contextlib.asynccontextmanager
async def serve_metrics(
    cluster: Cluster,
    *,
    port: int,
    host: str = "0.0.0.0",
    sample_interval: float = 5.0,
    flag: str = "the port",
) -> AsyncIterator[NodeMetrics]:
    """Serve ``cluster``'s metrics on ``http://host:port/metrics`` while inside, and its
    probes on ``/healthz`` and ``/readyz`` (see :mod:`cloister.health`).

    Raises:
        MetricsUnavailableError: ``prometheus_client`` is not installed.
        PortInUseError: the port is taken (``flag`` names the option that chose it).
        OSError: the address cannot be bound.
    """
    metrics = NodeMetrics(cluster, port=port, host=host, sample_interval=sample_interval, flag=flag)
    metrics.start()
    try:
        yield metrics
    finally:
        await metrics.close()
