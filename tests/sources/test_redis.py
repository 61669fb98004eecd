"""RedisStreamsSource against the Redis server on 127.0.0.1:6379 (a unique key prefix per test).

A missing server (or redis-py) skips these tests, unless ``CI=true``: then they fail.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack
from typing import Any

import pytest

from cloister.sources import RedisStreamsSource, SourceError, partition_name
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

URL = "redis://127.0.0.1:6379/0"
FAST = {"block": 0.1, "retry_backoff": (0.01, 0.05)}


@pytest.fixture
async def redis() -> AsyncIterator[Any]:
    """A client of the local Redis (for publishing and inspecting streams)."""
    try:
        import redis.asyncio as aioredis
    except ImportError:
        unavailable("redis-py is not installed (pip install 'pycloister[redis]')")
    client = aioredis.Redis.from_url(URL, decode_responses=False)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        unavailable(f"no Redis at {URL}: {exc}")
    yield client
    await client.aclose()


@pytest.fixture
async def stream(redis: Any) -> AsyncIterator[str]:
    """A unique stream name (prefix); every key under it is deleted after the test."""
    name = f"cloister-test-{uuid.uuid4().hex[:12]}"
    yield name
    keys = [k async for k in redis.scan_iter(match=f"{name}*")]
    if keys:
        await redis.delete(*keys)


@pytest.fixture
async def nodes(request: pytest.FixtureRequest) -> AsyncIterator[Nodes]:
    async with AsyncExitStack() as stack:
        yield Nodes(stack, f"redis-{request.node.name}")


async def add(
    redis: Any, stream: str, items: Iterable[tuple[str, int]], shared: bool = False
) -> int:
    """XADD (key, seq) entries to their partition's stream (or to ``stream``)."""
    count = 0
    async with redis.pipeline(transaction=False) as pipe:
        for key, seq in items:
            to = stream if shared else partition_name(stream, key, Sink.partitions)
            pipe.xadd(to, {"body": body(key, seq), "msg_id": f"{key}-{seq}", "origin": "test"})
            count += 1
        await pipe.execute()
    return count


async def start_sources(nodes: Nodes, stream: str, **options: Any) -> list[RedisStreamsSource]:
    sources = []
    for manager in nodes.managers.values():
        source = await RedisStreamsSource.start(
            manager, URL, stream=stream, key=key_fn, **{**FAST, **options}
        )
        nodes.stack.push_async_callback(source.stop)
        sources.append(source)
    return sources


async def pending(redis: Any, stream: str, partitions: int = Sink.partitions) -> int:
    total = 0
    for partition in range(partitions):
        total += (await redis.xpending(f"{stream}.{partition}", "cloister"))["pending"]
    return total


async def no_pending(redis: Any, stream: str) -> bool:
    return await pending(redis, stream) == 0


def total(sources: list[RedisStreamsSource], counter: str) -> int:
    return sum(s.counters[counter] for s in sources)


def adds_up(source: RedisStreamsSource) -> bool:
    c = source.counters
    return c["received"] == c["stored"] + c["parked"] + c["released"] + source.in_flight


async def test_partitioned_every_node_reads_its_streams_and_order_holds_per_key(
    redis: Any, stream: str, nodes: Nodes
) -> None:
    await nodes.start("a", "b", "c")
    sources = await start_sources(nodes, stream)
    await eventually(lambda: every_partition_read(sources), what="every partition read")
    per_key = 20
    count = await add(redis, stream, messages(per_key))
    await eventually(lambda: nodes.journal.total() >= count, timeout=30, what="all handled")
    await eventually(lambda: total(sources, "stored") == count, what="all acked")
    assert not nodes.out_of_order(per_key), str(nodes.out_of_order(per_key))[:2000]
    # the intake is spread (the ring gives 1, 5 and 10 of the 16 partitions; under load a
    # flapping memory node may miss its share: tests/sources/test_processes.py checks >= 20%)
    assert sum(1 for s in sources if s.counters["received"]) >= 2
    await eventually(lambda: all(adds_up(s) for s in sources), what="the counters add up")
    await eventually(lambda: no_pending(redis, stream), what="every entry acknowledged (XACK)")


async def test_poison_entries_are_parked_with_the_reason_and_acknowledged(
    redis: Any, stream: str, nodes: Nodes
) -> None:
    (a,) = await nodes.start("a")
    (source,) = await start_sources(nodes, stream)
    target = partition_name(stream, "k1", Sink.partitions)
    await redis.xadd(target, {"body": body("k1", 1)})
    await redis.xadd(target, {"body": b"\xff not json", "msg_id": "bad"})
    await redis.xadd(target, {"payload": b"{}", "msg_id": "nobody"})
    await redis.xadd(target, {"body": body("k1", 2)})
    await eventually(lambda: nodes.journal.handled["k1"] == [1, 2], what="the good ones")
    await eventually(lambda: source.counters["parked"] == 2, what="the bad ones parked")
    by_id = {letter.msg_id: letter for letter in await a.dead_letters()}
    assert "undecodable body (json)" in by_id["bad"].reason
    assert by_id["bad"].raw == b"\xff not json"
    assert "has no 'body' field" in by_id["nobody"].reason
    assert all(letter.source == f"redis.{stream}.cloister" for letter in by_id.values())
    await eventually(lambda: adds_up(source) and source.in_flight == 0)
    assert await pending(redis, stream) == 0


async def test_entries_pending_with_a_dead_consumer_are_claimed_and_stored_in_order(
    redis: Any, stream: str, nodes: Nodes
) -> None:
    await nodes.start("a")
    count = await add(redis, stream, messages(5))
    # a consumer read every entry and died before acknowledging any
    for partition in range(Sink.partitions):
        name = f"{stream}.{partition}"
        await redis.xgroup_create(name, "cloister", id="0", mkstream=True)
        await redis.xreadgroup("cloister", "ghost", {name: ">"})
    assert await pending(redis, stream) == count
    (source,) = await start_sources(nodes, stream)  # taking the partitions claims them
    await eventually(lambda: nodes.journal.total() >= count, timeout=15, what="all handled")
    assert nodes.in_order(5), nodes.disorder(5)
    assert all(nodes.journal.handled[k] == [1, 2, 3, 4, 5] for k in KEYS)
    await eventually(lambda: source.counters["stored"] == count)
    await eventually(lambda: no_pending(redis, stream))


async def test_shared_mode_claims_the_entries_of_a_consumer_that_died(
    redis: Any, stream: str, nodes: Nodes
) -> None:
    await nodes.start("a")
    await redis.xgroup_create(stream, "cloister", id="0", mkstream=True)
    count = await add(redis, stream, [("k5", s) for s in range(1, 11)], shared=True)
    await redis.xreadgroup("cloister", "ghost", {stream: ">"}, count=4)  # and died
    (source,) = await start_sources(
        nodes, stream, mode="shared", claim_idle=0.3, claim_interval=0.1
    )
    await eventually(lambda: len(nodes.journal.handled["k5"]) == count, timeout=10)
    assert sorted(nodes.journal.handled["k5"]) == list(range(1, 11))
    await eventually(lambda: source.counters["stored"] == count and source.in_flight == 0)
    assert (await redis.xpending(stream, "cloister"))["pending"] == 0


async def test_an_entry_the_inbox_cannot_take_stays_pending_and_is_stored_after_a_restart(
    redis: Any, stream: str, nodes: Nodes
) -> None:
    (a,) = await nodes.start("a")
    failures = [10**9]
    flaky_cast(a, failures)
    (source,) = await start_sources(nodes, stream)
    await add(redis, stream, [("k3", 1), ("k3", 2)])
    await eventually(lambda: source.counters["failed"] >= 3, what="retrying in place")
    assert source.in_flight == 2 and source.counters["released"] == 0
    await source.stop()
    assert source.counters["stored"] == 0 and adds_up(source)
    assert await pending(redis, stream) == 2  # pending, not lost
    failures[0] = 0
    async with RedisStreamsSource(a, URL, stream=stream, key=key_fn, **FAST) as again:
        await eventually(lambda: nodes.journal.handled["k3"] == [1, 2])
        await eventually(lambda: again.counters["stored"] == 2)
    assert await pending(redis, stream) == 0


async def test_partitions_move_when_a_node_joins_and_one_leaves_with_order_kept(
    redis: Any, stream: str, nodes: Nodes
) -> None:
    await nodes.start("a", "b")
    sources = await start_sources(nodes, stream)
    per_key = 40

    async def publish_round(seq: int) -> int:
        return await add(redis, stream, [(k, seq) for k in KEYS])

    def start_source(manager: Sink) -> Any:
        return RedisStreamsSource.start(manager, URL, stream=stream, key=key_fn, **FAST)

    _, source_c = await join_and_leave(nodes, sources[0], start_source, publish_round, per_key)
    assert not nodes.out_of_order(per_key), str(nodes.out_of_order(per_key))[:2000]
    assert source_c.counters["received"] > 0
    await eventually(lambda: all(s.in_flight == 0 for s in (sources[1], source_c)))
    await eventually(lambda: no_pending(redis, stream))


async def test_clear_errors_for_an_unreachable_server(stream: str, nodes: Nodes) -> None:
    (a,) = await nodes.start("a")
    with pytest.raises(SourceError, match=r"cannot connect to Redis at redis://:\*\*\*@"):
        await RedisStreamsSource.start(
            a, "redis://:secret@127.0.0.1:1/0", stream=stream, key=key_fn
        )


def test_a_partitioned_source_needs_a_cluster() -> None:
    from cloister.errors import ConfigurationError

    class Target:
        partitions = 4
        inbox: Any = None

    with pytest.raises(ConfigurationError, match="mode='shared'"):
        RedisStreamsSource(Target(), stream="s", key=key_fn)  # type: ignore[arg-type]
