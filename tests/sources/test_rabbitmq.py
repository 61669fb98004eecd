"""RabbitMQSource against the RabbitMQ server on 127.0.0.1:5672 (guest/guest).

A missing server (or aio-pika) skips these tests, unless ``CI=true``: then they fail.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack
from typing import Any

import pytest

from cloister.sources import RabbitMQSource, SourceError, SourceMessage, partition_name
from cloister.sources.rabbitmq import declare_partition_queues
from cloister.testing import eventually, unavailable

from .support import (
    KEYS,
    Nodes,
    Sink,
    body,
    every_partition_read,
    flaky_cast,
    join_and_leave,
    key_fn,
    messages,
)

URL = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture
async def amqp() -> AsyncIterator[Any]:
    """A connection to the local RabbitMQ (for publishing and inspecting queues)."""
    try:
        import aio_pika
    except ImportError:
        unavailable("aio-pika is not installed (pip install 'pycloister[rabbitmq]')")
    try:
        connection = await aio_pika.connect(URL, timeout=5)
    except Exception as exc:
        unavailable(f"no RabbitMQ at {URL}: {exc}")
    async with connection:
        yield connection


@pytest.fixture
async def queue(amqp: Any) -> AsyncIterator[str]:
    """A unique queue name; the queue is deleted after the test."""
    name = f"cloister-test-{uuid.uuid4().hex[:12]}"
    yield name
    channel = await amqp.channel()
    await channel.queue_delete(name)
    for partition in range(Sink.partitions):  # the partitioned mode's queues
        await channel.queue_delete(f"{name}.{partition}")
    await channel.close()


@pytest.fixture
async def nodes(request: pytest.FixtureRequest) -> AsyncIterator[Nodes]:
    async with AsyncExitStack() as stack:
        yield Nodes(stack, f"sources-{request.node.name}")


async def publish(
    amqp: Any,
    queue: str,
    items: Iterable[tuple[bytes, str | None]],
    key: Any = None,
) -> int:
    """Publish (body, message_id) to ``queue`` (which exists), with publisher confirms;
    with ``key`` (body -> key), to the key's partition queue of ``queue``."""
    import aio_pika

    channel = await amqp.channel()
    sent = 0
    pending: list[Any] = []
    for data, msg_id in items:
        message = aio_pika.Message(data, message_id=msg_id, content_type="application/json")
        to = queue if key is None else partition_name(queue, key(data), Sink.partitions)
        pending.append(channel.default_exchange.publish(message, routing_key=to))
        if len(pending) >= 500:
            await asyncio.gather(*pending)
            sent += len(pending)
            pending = []
    await asyncio.gather(*pending)
    await channel.close()
    return sent + len(pending)


async def ready_count(amqp: Any, queue: str) -> int:
    """Messages ready in ``queue`` (not counting those delivered and unacknowledged)."""
    channel = await amqp.channel()
    declared = await channel.declare_queue(queue, passive=True)
    await channel.close()
    return int(declared.declaration_result.message_count)


async def start_sources(nodes: Nodes, queue: str, **options: Any) -> list[RabbitMQSource]:
    """A source on every node; ``mode="shared"`` unless told otherwise (one queue)."""
    options.setdefault("mode", "shared")
    sources = []
    for manager in nodes.managers.values():
        source = await RabbitMQSource.start(manager, URL, queue=queue, **options)
        nodes.stack.push_async_callback(source.stop)
        sources.append(source)
    return sources


def total(sources: list[RabbitMQSource], counter: str) -> int:
    return sum(s.counters[counter] for s in sources)


async def test_every_message_is_stored_once_and_handled_in_order_per_key(
    amqp: Any, queue: str, nodes: Nodes
) -> None:
    await nodes.start("a", "b", "c")
    # prefetch 10 on 3 nodes: at most 30 in flight, fewer than the 50 keys between two
    # messages of one key, so no two messages of a key are ever on two nodes at once
    sources = await start_sources(nodes, queue, key=key_fn, prefetch=10)
    per_key = 20
    count = await publish(amqp, queue, ((body(k, s), f"{k}-{s}") for k, s in messages(per_key)))
    await eventually(lambda: nodes.journal.total() >= count, timeout=30, what="all handled")
    await eventually(lambda: total(sources, "stored") == count, what="all acked")
    assert nodes.in_order(per_key), nodes.disorder(per_key)
    assert total(sources, "received") == count and total(sources, "parked") == 0
    assert sum(1 for s in sources if s.counters["received"]) >= 2  # the load was shared
    assert len(nodes.journal.nodes) == 3  # and the inbox spread the work
    for source in sources:
        await source.stop()
        assert source.in_flight == 0
    assert await ready_count(amqp, queue) == 0  # nothing left behind, nothing unacked


async def test_malformed_messages_are_parked_with_the_reason_and_the_queue_flows_on(
    amqp: Any, queue: str, nodes: Nodes
) -> None:
    a, b = await nodes.start("a", "b")
    sources = await start_sources(nodes, queue, key=key_fn, prefetch=5)
    bad_json, no_key = b"\xff not json", b'{"seq": 1}'
    await publish(
        amqp,
        queue,
        [(body("k1", 1), "m1"), (bad_json, "bad"), (no_key, "nokey"), (body("k1", 2), "m2")],
    )
    # (two nodes may take m1 and m2 at once: their order is not the point here)
    await eventually(lambda: sorted(nodes.journal.handled["k1"]) == [1, 2], what="good ones")
    await eventually(lambda: total(sources, "parked") == 2, what="bad ones parked")
    letters = await a.dead_letters()
    assert len(letters) == 2 and letters == await b.dead_letters()  # one cluster-wide store
    by_id = {letter.msg_id: letter for letter in letters}
    assert "undecodable body (json)" in by_id["bad"].reason and by_id["bad"].raw == bad_json
    assert "key function raised KeyError: 'key'" in by_id["nokey"].reason
    assert by_id["nokey"].raw == no_key
    assert all(letter.source == f"rabbitmq.{queue}" and letter.key is None for letter in letters)
    assert await a.replay() == 0  # no key: nothing to replay, and nothing breaks
    for source in sources:
        await source.stop()
    assert await ready_count(amqp, queue) == 0  # the parked ones were acknowledged too


async def test_key_function_may_choose_the_msg_id_and_the_inbox_drops_duplicates(
    amqp: Any, queue: str, nodes: Nodes
) -> None:
    await nodes.start("a")

    def keyed(body: Any, meta: SourceMessage) -> tuple[Any, Any, str]:
        return body["key"], body["seq"], f"{body['key']}/{body['seq']}"

    sources = await start_sources(nodes, queue, key=keyed)
    # the publisher retried: every message twice, with no AMQP message_id at all
    await publish(amqp, queue, [(body("k2", s), None) for s in (1, 2, 3) for _ in range(2)])
    await eventually(lambda: total(sources, "stored") == 6)
    await asyncio.sleep(0.1)
    assert nodes.journal.handled["k2"] == [1, 2, 3]


async def test_a_failed_put_is_not_acked_but_redelivered_then_stored(
    amqp: Any, queue: str, nodes: Nodes
) -> None:
    managers = await nodes.start("a", "b")
    failures = [3]  # the first three puts fail, whichever node tries
    for manager in managers:
        flaky_cast(manager, failures)
    redelivered: list[str] = []

    def key(body: Any, meta: SourceMessage) -> tuple[Any, Any]:
        if meta.redelivered:
            redelivered.append(str(meta.msg_id))
        return key_fn(body, meta)

    # requeue_after=0: give a message back to RabbitMQ at the first failure
    sources = await start_sources(
        nodes, queue, key=key, prefetch=1, requeue_after=0, retry_backoff=(0.01, 0.01)
    )
    count = await publish(amqp, queue, ((body(k, s), f"{k}-{s}") for k, s in messages(2)))
    await eventually(lambda: nodes.journal.total() >= count, timeout=10, what="all handled")
    assert total(sources, "failed") == 3 and total(sources, "released") == 3
    assert len(redelivered) == 3  # RabbitMQ had them back: they had not been acknowledged
    assert total(sources, "stored") == count  # and in the end each was stored, once
    assert sorted(s for k in nodes.journal.handled for s in nodes.journal.handled[k]) == sorted(
        s for _, s in messages(2)
    )


async def test_while_the_inbox_is_down_a_message_is_held_unacked_and_survives_a_stop(
    amqp: Any, queue: str, nodes: Nodes
) -> None:
    (a,) = await nodes.start("a")
    failures = [10**9]  # the inbox refuses everything for now
    flaky_cast(a, failures)
    source = await RabbitMQSource.start(
        a, URL, queue=queue, key=key_fn, retry_backoff=(0.01, 0.02), mode="shared"
    )
    await publish(amqp, queue, [(body("k3", 1), "held")])
    await eventually(lambda: source.counters["failed"] >= 3, what="retrying in place")
    assert source.in_flight == 1 and source.counters["released"] == 0
    assert await ready_count(amqp, queue) == 0  # delivered to us, not acknowledged
    await source.stop()
    assert source.counters["stored"] == 0
    assert await ready_count(amqp, queue) == 1  # back in the queue: nothing lost
    failures[0] = 0  # the inbox is back
    async with RabbitMQSource(a, URL, queue=queue, key=key_fn, mode="shared") as again:
        await eventually(lambda: nodes.journal.handled["k3"] == [1])
        await eventually(lambda: again.counters["stored"] == 1)


async def test_held_messages_keep_their_order_per_key(amqp: Any, queue: str, nodes: Nodes) -> None:
    (a,) = await nodes.start("a")
    failures = [5]  # retried in place (the default): the key's next messages wait
    flaky_cast(a, failures)
    async with RabbitMQSource(
        a, URL, queue=queue, key=key_fn, retry_backoff=(0.01, 0.02), mode="shared"
    ) as source:
        await publish(amqp, queue, [(body("k4", s), f"k4-{s}") for s in range(1, 31)])
        await eventually(lambda: len(nodes.journal.handled["k4"]) == 30)
        assert nodes.journal.handled["k4"] == list(range(1, 31))
        assert source.counters["failed"] == 5 and source.counters["released"] == 0


async def test_single_active_consumer_feeds_one_node_and_fails_over(
    amqp: Any, queue: str, nodes: Nodes
) -> None:
    await nodes.start("a", "b")
    sources = await start_sources(nodes, queue, key=key_fn, single_active_consumer=True)
    await publish(amqp, queue, ((body(k, s), f"{k}-{s}") for k, s in messages(4)))
    await eventually(lambda: nodes.in_order(4), what="first half handled in order")
    active = [s for s in sources if s.counters["received"]]
    assert len(active) == 1  # one node at a time takes from the queue
    await active[0].stop()
    await publish(amqp, queue, ((body(k, s + 4), f"{k}-{s + 4}") for k, s in messages(4)))
    await eventually(lambda: nodes.in_order(8), what="the standby took over")


async def test_clear_errors_for_a_missing_queue_and_an_unreachable_broker(
    amqp: Any, queue: str, nodes: Nodes
) -> None:
    (a,) = await nodes.start("a")
    with pytest.raises(SourceError, match="does not exist; create it or pass declare=True"):
        await RabbitMQSource.start(a, URL, queue=queue, key=key_fn, declare=False, mode="shared")
    with pytest.raises(SourceError, match="one does not exist; create them or pass declare"):
        await RabbitMQSource.start(a, URL, queue=queue, key=key_fn, declare=False)
    with pytest.raises(SourceError, match=r"cannot connect to RabbitMQ at amqp://guest:\*\*\*@"):
        await RabbitMQSource.start(a, "amqp://guest:guest@127.0.0.1:1/", queue=queue, key=key_fn)


def key_of(data: bytes) -> Any:
    return json.loads(data)["key"]


async def test_partitioned_by_default_every_node_reads_its_own_partitions_in_order(
    amqp: Any, queue: str, nodes: Nodes
) -> None:
    managers = await nodes.start("a", "b", "c")
    sources = await start_sources(nodes, queue, key=key_fn, mode="partitioned")
    assert all(s.mode == "partitioned" for s in sources)
    # together they read every partition, each node those whose workers it runs
    await eventually(lambda: every_partition_read(sources), what="every partition read")
    for manager, source in zip(managers, sources, strict=True):
        assert source.reading == frozenset(manager._region.consumers.partitions)  # type: ignore[union-attr]
    per_key = 20
    items = [(body(k, s), f"{k}-{s}") for k, s in messages(per_key)]
    count = await publish(amqp, queue, items, key=key_of)
    await eventually(lambda: nodes.journal.total() >= count, timeout=30, what="all handled")
    await eventually(lambda: total(sources, "stored") == count, what="all acked")
    assert not nodes.out_of_order(per_key), str(nodes.out_of_order(per_key))[:2000]
    # the intake is spread (the ring gives 1, 5 and 10 of the 16 partitions; under load a
    # flapping memory node may miss its share: tests/sources/test_processes.py checks >= 20%)
    assert sum(1 for s in sources if s.counters["received"]) >= 2
    for source in sources:
        await source.stop()
        counters = source.counters
        assert (
            counters["received"] == counters["stored"] + counters["parked"] + counters["released"]
        )
    for partition in range(Sink.partitions):
        assert await ready_count(amqp, f"{queue}.{partition}") == 0


async def test_partitions_move_with_the_ring_and_a_keys_order_survives_it(
    amqp: Any, queue: str, nodes: Nodes
) -> None:
    await nodes.start("a", "b")
    sources = await start_sources(nodes, queue, key=key_fn, mode="partitioned", prefetch=20)
    channel = await amqp.channel()
    await declare_partition_queues(channel, queue, Sink.partitions)  # as a publisher may
    await channel.close()
    per_key = 60

    async def publish_round(seq: int) -> int:
        return await publish(amqp, queue, [(body(k, seq), f"{k}-{seq}") for k in KEYS], key=key_of)

    def start_source(manager: Sink) -> Any:
        return RabbitMQSource.start(manager, URL, queue=queue, key=key_fn, prefetch=20)

    count, source_c = await join_and_leave(nodes, sources[0], start_source, publish_round, per_key)
    assert not nodes.out_of_order(per_key), str(nodes.out_of_order(per_key))[:2000]
    assert source_c.counters["received"] > 0
    assert total([*sources, source_c], "stored") >= count
