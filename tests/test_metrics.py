"""The metrics of one node, read as Prometheus would (memory backend, in-process)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloister import Cluster, DynamicManager, Replace
from cloister._histogram import Histogram
from cloister.metrics import NodeCollector, report_source
from cloister.testing import eventually
from tests._support.timing import MEMORY

prometheus_client = pytest.importorskip("prometheus_client")


@given(st.lists(st.floats(0, 100, allow_nan=False), max_size=50))
def test_a_histogram_counts_each_value_in_every_bucket_at_or_above_it(values: list[float]) -> None:
    histogram = Histogram((0.1, 1.0, 10.0))
    for value in values:
        histogram.observe(value)
    buckets, total = histogram.snapshot()
    assert [bound for bound, _ in buckets] == [0.1, 1.0, 10.0, float("inf")]
    for bound, count in buckets:
        assert count == sum(1 for v in values if v <= bound)
    assert total == pytest.approx(sum(values))
    assert histogram.count == len(values)


class Ledger(DynamicManager):
    partitions = 2
    max_attempts = 2
    retry_backoff = (0.01, 0.01)

    def children_specs(self) -> dict[str, dict[str, Any]]:
        return {"a": {"payload": 0, "timeout": 0}, "b": {"payload": 0, "timeout": 0}}

    async def handle_cast(self, message: Any, id: Any, payload: Any) -> Replace:
        if message == "boom":
            raise ValueError("a failing cast")
        return Replace(payload + 1)


class FakeSource:
    """What the metrics read of a source: its name, counters and in-flight count."""

    name = "orders"
    in_flight = 2
    reading = frozenset({3, 5})

    def __init__(self) -> None:
        self.counters = {"received": 7, "stored": 4, "parked": 1, "released": 0, "failed": 3}


def samples(collector: NodeCollector) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(collector)
    found = {}
    for family in registry.collect():
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    matches = [v for (n, ls), v in found.items() if n == name and set(labels.items()) <= ls]
    assert len(matches) == 1, (name, labels, [k for k in found if k[0] == name])
    return matches[0]


async def test_a_node_exports_its_histograms_sources_and_losses() -> None:
    async with AsyncExitStack() as stack:
        cluster = Cluster("metered", "n1", backend="memory://metrics-node", **MEMORY.options())
        await cluster.start()
        stack.push_async_callback(cluster.stop)
        manager = await Ledger.start(cluster)
        stack.push_async_callback(manager.stop)
        await cluster.wait_ready(5)
        collector = NodeCollector(cluster, manager)
        source = FakeSource()
        report_source(source)
        for _ in range(3):
            await manager.cast("a", 1)
        await manager.cast("b", "boom")  # fails twice, then parked
        await eventually(lambda: manager.counters.dead_letters == 1, what="the failing cast parked")
        await eventually(lambda: manager.get("a").payload == 3)  # type: ignore[union-attr]
        watch = cluster.loop_watch
        assert watch is not None
        await eventually(lambda: watch.delays.count > 0, what="a tick of the loop watch")
        found = samples(collector)

        # casts_total counts the handled casts; the failed tries are errors and retries.
        assert value(found, "cloister_manager_casts_total") == 3
        assert value(found, "cloister_manager_errors_total") == 2
        latency = value(found, "cloister_manager_cast_latency_seconds_count")
        assert latency == 3
        assert value(found, "cloister_manager_callback_seconds_count", callback="handle_cast") == 3
        assert (
            value(found, "cloister_manager_callback_seconds_bucket", callback="perform", le="+Inf")
            == 0
        )
        assert value(found, "cloister_manager_handoff_seconds_count", phase="settle") >= 1
        assert value(found, "cloister_event_loop_delay_seconds_count") > 0
        assert value(found, "cloister_medium_data_loss_total") == 0
        assert value(found, "cloister_medium_rebuilding") == 0
        for outcome, count in source.counters.items():
            assert (
                value(found, "cloister_source_messages_total", source="orders", outcome=outcome)
                == count
            )
        assert value(found, "cloister_source_messages_total", outcome="ack_errors") == 0
        assert value(found, "cloister_source_in_flight", source="orders") == 2

        # A medium that loses its data: counted, and rebuilding until settled again.
        before = cluster.epoch
        cluster.backend.world.lose_data()  # type: ignore[attr-defined]
        await eventually(lambda: cluster.epoch > before and cluster.info.state == "ready")
        found = samples(collector)
        assert value(found, "cloister_medium_data_loss_total") == 1
        assert value(found, "cloister_medium_rebuilding") == 0
        assert value(found, "cloister_manager_state_lost_total") == 1  # "a"'s payload
        del source
