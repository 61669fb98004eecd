"""The broker-independent part of sources, with a fake broker: decode, key, park, ack, stop."""

from __future__ import annotations

import asyncio
import re
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloister.cluster.placement import Placement
from cloister.errors import ConfigurationError
from cloister.ring import HashRing
from cloister.sources import (
    MissingDependencyError,
    RabbitMQSource,
    Source,
    SourceMessage,
    partition_name,
    partition_of,
)
from cloister.sources.base import Delivery
from cloister.testing import eventually

from .support import Nodes, Sink, body, flaky_cast, key_fn


class FakeDelivery(Delivery):
    __slots__ = ("gone", "outcome")

    def __init__(self, meta: SourceMessage, partition: int | None = None) -> None:
        super().__init__(meta, partition)
        self.outcome: str | None = None
        self.gone = False  # the broker took it back (its channel closed)

    def stale(self) -> bool:
        return self.gone

    async def ack(self) -> None:
        self.outcome = "acked"

    async def release(self) -> None:
        self.outcome = "released"


class FakeSource(Source):
    """A broker that is a list: ``deliver(body)`` hands one message to the source."""

    def __init__(self, manager: Any, **options: Any) -> None:
        options.setdefault("name", "fake")
        options.setdefault("mode", "shared")
        super().__init__(manager, **options)
        self.deliveries: list[FakeDelivery] = []
        self.opened: list[int] = []  # partitions, in the order they were started

    async def _connect(self) -> None:
        pass

    async def _stop_intake(self) -> None:
        pass

    async def _disconnect(self) -> None:
        pass

    async def _start_partition(self, partition: int) -> None:
        self.opened.append(partition)

    async def _stop_partition(self, partition: int) -> None:
        pass

    def deliver(
        self, data: bytes, msg_id: str | None = None, partition: int | None = None
    ) -> FakeDelivery:
        meta = SourceMessage(source=self.name, body=data, msg_id=msg_id)
        delivery = FakeDelivery(meta, partition)
        self.deliveries.append(delivery)
        self._accept(delivery)
        return delivery


@pytest.fixture
async def nodes() -> AsyncIterator[Nodes]:
    async with AsyncExitStack() as stack:  # (parametrized test names make no world name)
        yield Nodes(stack, f"fake-sources-{uuid.uuid4().hex[:8]}")


async def settled(source: FakeSource) -> None:
    await eventually(lambda: all(d.outcome for d in source.deliveries), what="all settled")


@pytest.mark.parametrize(
    ("result", "reason"),
    [
        ("k1", "key function returned str; expected (key, message)"),
        (("k1", 1, 7), "msg_id of type int"),
        (([1], 1), "a key the ring cannot place"),
    ],
)
async def test_a_key_function_answer_that_is_no_message_is_parked(
    nodes: Nodes, result: Any, reason: str
) -> None:
    (a,) = await nodes.start("a")
    async with FakeSource(a, key=lambda body, meta: result) as source:
        delivery = source.deliver(b"{}")
        await settled(source)
    assert delivery.outcome == "acked" and source.counters["parked"] == 1
    (letter,) = await a.dead_letters()
    assert reason in letter.reason and letter.raw == b"{}" and letter.source == "fake"


async def test_a_message_the_inbox_cannot_encode_is_parked(nodes: Nodes) -> None:
    (a,) = await nodes.start("a")
    async with FakeSource(a, key=lambda body, meta: ("k1", {1, 2})) as source:
        source.deliver(b"{}", msg_id="set")
        await settled(source)
    (letter,) = await a.dead_letters()
    assert letter.reason.startswith("the inbox refused it: WireFormatError")
    assert letter.msg_id == "set"


@pytest.mark.parametrize(
    ("decode", "data", "expected"),
    [
        ("msgpack", msgpack.packb({"key": "k2", "seq": 1}), 1),
        ("bytes", b"k2:2", 2),
        (lambda data: {"key": "k2", "seq": int(data)}, b"3", 3),
    ],
)
async def test_decoders(nodes: Nodes, decode: Any, data: bytes, expected: int) -> None:
    (a,) = await nodes.start("a")

    def key(body: Any, meta: SourceMessage) -> tuple[Any, Any]:
        if isinstance(body, bytes):
            name, seq = body.decode().split(":")
            return name, int(seq)
        return key_fn(body, meta)

    async with FakeSource(a, key=key, decode=decode) as source:
        source.deliver(data)
        await eventually(lambda: nodes.journal.handled["k2"] == [expected])
    assert (source.counters["stored"], source.counters["parked"]) == (1, 0)


async def test_stop_gives_back_what_is_still_failing_and_what_arrives_late(nodes: Nodes) -> None:
    (a,) = await nodes.start("a")
    flaky_cast(a, [10**9])
    source = await FakeSource.start(a, key=key_fn, retry_backoff=(0.01, 0.01))
    held = source.deliver(body("k3", 1))
    await eventually(lambda: source.counters["failed"] >= 2)
    assert held.outcome is None  # neither acked nor given back: still ours, retried
    await source.stop()
    assert held.outcome == "released" and source.in_flight == 0
    late = source.deliver(body("k3", 2))  # a delivery racing the stop
    await asyncio.sleep(0.01)
    assert late.outcome is None and source.counters["released"] == 2
    assert nodes.journal.total() == 0


async def test_options_are_checked(nodes: Nodes) -> None:
    (a,) = await nodes.start("a")
    with pytest.raises(ConfigurationError, match="decode must be one of"):
        FakeSource(a, key=key_fn, decode="yaml")
    with pytest.raises(ConfigurationError, match="key must be a function"):
        FakeSource(a, key="key")
    with pytest.raises(ConfigurationError, match="requeue_after must be a number"):
        FakeSource(a, key=key_fn, requeue_after=-1)


async def test_a_manager_without_an_inbox_is_refused() -> None:
    from .support import Sink

    standalone = await type("Solo", (Sink,), {"journal": None}).start()
    try:
        with pytest.raises(ConfigurationError, match="no durable inbox"):
            await FakeSource.start(standalone, key=key_fn)
    finally:
        await standalone.stop()


async def test_without_aio_pika_the_error_names_the_extra(
    nodes: Nodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    (a,) = await nodes.start("a")
    monkeypatch.setitem(sys.modules, "aio_pika", None)  # what a missing package looks like
    with pytest.raises(MissingDependencyError, match=r"pip install 'pycloister\[rabbitmq\]'"):
        await RabbitMQSource.start(a, queue="q", key=key_fn)


async def test_parked_messages_can_be_replayed_once_the_key_function_is_fixed(
    nodes: Nodes,
) -> None:
    (a,) = await nodes.start("a")
    fixed = False

    def key(body: Any, meta: SourceMessage) -> tuple[Any, Any]:
        if not fixed and body["seq"] == 2:
            raise ValueError("a bug, fixed later")
        assert meta.subject == "orders.eu" and meta.headers["tenant"] == "t1"
        return key_fn(body, meta)

    source = FakeSource(a, key=key)
    async with source:
        for seq in (1, 2):
            delivery = FakeDelivery(
                SourceMessage(
                    source="fake",
                    body=body("k5", seq),
                    msg_id=f"m{seq}",
                    subject="orders.eu",
                    headers={"tenant": "t1", "trace": b"\x00"},  # bytes are not kept
                )
            )
            source.deliveries.append(delivery)
            source._accept(delivery)
        source.deliver(b"not json")  # stays parked: the decoder still cannot read it
        await settled(source)
    await eventually(lambda: nodes.journal.handled["k5"] == [1])
    assert len(await a.dead_letters()) == 2
    assert await a.replay() == 0  # no key yet: the manager leaves them to their source

    fixed = True
    assert await source.replay_parked() == 1  # works on a stopped source: needs no broker
    await eventually(lambda: nodes.journal.handled["k5"] == [1, 2])
    (left,) = await a.dead_letters()
    assert left.raw == b"not json" and left.source == "fake"
    assert await source.replay_parked() == 0
    assert source.counters["stored"] == 1  # counters speak of the broker's deliveries


async def test_a_source_may_be_given_the_inbox_itself(nodes: Nodes) -> None:
    # Sources need an Inbox, not a manager: the manager is just one thing that has one.
    (a,) = await nodes.start("a")
    async with FakeSource(a.inbox, key=key_fn) as source:
        delivery = source.deliver(body("k1", 1))
        await settled(source)
    assert delivery.outcome == "acked" and source.counters["stored"] == 1
    await eventually(lambda: nodes.journal.handled["k1"] == [1], what="k1 handled")


def adds_up(source: Source) -> bool:
    c = source.counters
    return c["received"] == c["stored"] + c["parked"] + c["released"] + source.in_flight


async def test_the_counters_add_up_whatever_happens_to_a_message(nodes: Nodes) -> None:
    (a,) = await nodes.start("a")
    failures = [0]
    flaky_cast(a, failures)
    source = await FakeSource.start(a, key=key_fn, retry_backoff=(0.01, 0.01))
    source.deliver(body("k1", 1))  # stored
    source.deliver(b"\xff")  # parked
    await settled(source)
    assert adds_up(source) and source.in_flight == 0
    failures[0] = 10**9  # the inbox is down: the next ones are held
    held = [source.deliver(body("k2", s)) for s in (1, 2, 3)]
    await eventually(lambda: source.counters["failed"] >= 2)
    held[2].gone = True  # and the broker took one back (a closed channel)
    assert adds_up(source) and source.in_flight == 3
    await source.stop()  # what is held is given back
    assert source.counters == source.counters | {
        "received": 5, "stored": 1, "parked": 1, "released": 3,
    }  # fmt: skip
    assert adds_up(source) and source.in_flight == 0


async def test_partitioned_a_source_reads_what_the_ring_gives_and_retries_in_place(
    nodes: Nodes,
) -> None:
    a, b = await nodes.start("a", "b")
    failures = [0]
    flaky_cast(a, failures)
    source = await FakeSource.start(
        a, key=key_fn, mode="partitioned", requeue_after=0, retry_backoff=(0.01, 0.01)
    )
    mine = set(a._region.consumers.partitions)  # type: ignore[union-attr]
    await eventually(lambda: source.reading == mine, what="a reads its partitions")
    assert sorted(source.opened) == sorted(mine)
    theirs = next(p for p in range(Sink.partitions) if p not in mine)
    stray = source.deliver(body("k1", 1), partition=theirs)  # not ours: given back at once
    await eventually(lambda: stray.outcome == "released")
    # while a partition is ours, a message the inbox refuses is retried in place (never
    # given back, even with requeue_after=0: the key's next ones would overtake it)
    partition = min(mine)
    failures[0] = 10**9
    held = source.deliver(body("k9", 1), partition=partition)
    await eventually(lambda: source.counters["failed"] >= 5)
    assert held.outcome is None and source.counters["released"] == 1
    failures[0] = 0
    await eventually(lambda: held.outcome == "acked")
    # a node joins and takes partitions over: a lets them go before it acknowledges
    await nodes.start("c")
    await eventually(lambda: source.reading < mine, what="a gave partitions up")
    assert source.counters["partitions_released"] == len(mine - source.reading)
    await source.stop()
    assert source.reading == frozenset() and adds_up(source)
    assert b is not None


async def test_source_metrics_are_served_and_add_up(nodes: Nodes) -> None:
    import urllib.request

    from cloister.metrics import report_source, serve_metrics

    (a,) = await nodes.start("a")
    cluster = nodes.clusters["a"]
    async with serve_metrics(cluster, port=0, host="127.0.0.1") as metrics:
        source = await FakeSource.start(a, key=key_fn, name="orders")
        report_source(source)
        source.deliver(body("k1", 1))
        source.deliver(b"not json")
        await settled(source)
        url = f"http://127.0.0.1:{metrics.port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())
        await source.stop()
    wanted = {"cluster": cluster.name, "node": "a", "source": "orders"}
    figures: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        match = re.fullmatch(r"(cloister_source_\w+)\{(.*)\} (\S+)", line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match[2]))
        if all(found.get(k) == v for k, v in wanted.items()):
            figures[match[1], found.get("outcome", "")] = float(match[3])
    outcome = "cloister_source_messages_total"
    assert figures[outcome, "received"] == 2
    assert figures[outcome, "stored"] == 1
    assert figures[outcome, "parked"] == 1
    assert figures[outcome, "released"] == 0
    assert figures["cloister_source_in_flight", ""] == 0
    assert figures["cloister_source_partitions", ""] == 0  # shared mode


@given(
    key=st.one_of(st.text(max_size=40), st.integers(-(2**63), 2**63 - 1)),
    partitions=st.integers(1, 4096),
)
def test_publishers_route_a_key_to_the_partition_that_places_its_worker(
    key: Any, partitions: int
) -> None:
    placement = Placement(HashRing(["a", "b", "c"]), partitions, "a")
    assert partition_of(key, partitions) == placement.partition_of(key)
    assert partition_name("orders", key, partitions) == f"orders.{placement.partition_of(key)}"


async def test_a_source_on_a_node_that_died_gives_its_partitions_back(nodes: Nodes) -> None:
    # A dead node calls no hook; its source, still alive in the process, lets go anyway.
    a, _ = await nodes.start("a", "b")
    source = await FakeSource.start(a, key=key_fn, mode="partitioned")
    await eventually(lambda: len(source.reading) > 0, what="a reads its partitions")
    taken = source.counters["partitions_taken"]
    nodes.world.crash("a")
    await eventually(lambda: source.reading == frozenset(), what="a's source let go")
    assert source.counters["partitions_released"] == taken
    await source.stop()
