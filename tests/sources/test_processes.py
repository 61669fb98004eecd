"""Sources in real node processes: 3 ``cloister run`` nodes on one nats-server, each with
a source on default settings (partitioned), fed through the real brokers.

Each test publishes messages over 300 keys: once all were handled, no key saw a message
after a later one, and every node's source received at least 20% of them (the ring's
balance of the app's 32 partitions). Then it publishes more, kills one node with SIGKILL
while they are consumed, and checks that every message was handled at least once.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cloister.testing import unavailable, wait_for
from tests.faults import checker
from tests.faults._harness import FaultRun
from tests.faults.app import FaultApp, key_name

APP = "tests.sources._source_app:SourceApp"
KEYS = 300
PARTITIONS = FaultApp.partitions
Publish = Callable[[list[tuple[str, int]]], Awaitable[None]]


def rounds(first: int, last: int) -> list[tuple[str, int]]:
    """(key, seq) for seq in first..last, every key once per round."""
    return [(key_name(k), seq) for seq in range(first, last + 1) for k in range(KEYS)]


def encode(key: str, seq: int) -> bytes:
    return json.dumps({"key": key, "seq": seq}).encode()


def handlings(run: FaultRun) -> list[checker.Handling]:
    return checker.read_journals(run.journal(n) for n in run.nodes)


def missing(run: FaultRun, last: int) -> int:
    """Messages 1..last of every key not handled yet."""
    seen = {(h.key, h.seq) for h in handlings(run)}
    return sum(1 for item in rounds(1, last) if item not in seen)


def received(run: FaultRun, node: str) -> int:
    """What ``node``'s source received, from its last counters line."""
    for line in reversed(run.nodes[node].lines):
        found = re.match(r"^source (?:counters|stopped) (\{.*\})$", line.text)
        if found:
            return int(json.loads(found.group(1))["received"])
    return 0


def fault_run(workdir: Path, env: dict[str, str]) -> FaultRun:
    """3 nodes of the source app (the run starts them) on one nats-server, 300 keys."""
    return FaultRun(workdir, f"src-{uuid.uuid4().hex[:6]}", app=APP, servers=1, env=env, keys=KEYS)


def scenario(run: FaultRun, publish: Publish, per_key: int) -> None:
    """Order and spread with all three nodes, then a SIGKILL mid-stream: nothing lost."""
    run.start_nodes()
    asyncio.run(publish(rounds(1, per_key)))
    total = KEYS * per_key
    wait_for(lambda: missing(run, per_key) == 0 or None, 60, "every message handled")
    report = checker.Report()
    checker.check_order(report, handlings(run))
    assert report.order_violations == 0, report.examples
    wait_for(lambda: sum(received(run, n) for n in run.nodes) >= total or None, 10, "counters")
    shares = {n: received(run, n) / total for n in run.nodes}
    print(f"{total} messages; received by node: {shares}")  # (shown with pytest -s)
    assert all(share >= 0.2 for share in shares.values()), shares
    # more messages; while they are consumed, one node dies without a word
    asyncio.run(publish(rounds(per_key + 1, 2 * per_key)))
    wait_for(lambda: len(handlings(run)) >= total + total // 4 or None, 60, "consuming again")
    run.kill("b")
    wait_for(lambda: missing(run, 2 * per_key) == 0 or None, 60, "every message handled, none lost")
    print(f"after the kill: {2 * total} published, {len(handlings(run))} handlings, 0 lost")


def test_rabbitmq_keeps_order_spreads_the_intake_and_loses_nothing_to_a_kill(
    tmp_path: Path,
) -> None:
    aio_pika = _import("aio_pika")
    from cloister.sources import partition_name
    from cloister.sources.rabbitmq import declare_partition_queues

    url, queue = "amqp://guest:guest@127.0.0.1:5672/", f"cloister-proc-{uuid.uuid4().hex[:8]}"

    async def broker(action: Callable[[Any], Awaitable[None]]) -> None:
        try:
            connection = await aio_pika.connect(url, timeout=5)
        except Exception as exc:
            unavailable(f"no RabbitMQ at {url}: {exc}")
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            await action(channel)

    async def declare(channel: Any) -> None:
        await declare_partition_queues(channel, queue, PARTITIONS)

    async def delete(channel: Any) -> None:
        for partition in range(PARTITIONS):
            await channel.queue_delete(f"{queue}.{partition}")

    async def publish(items: list[tuple[str, int]]) -> None:
        async def send(channel: Any) -> None:
            for start in range(0, len(items), 1000):
                await asyncio.gather(
                    *(
                        channel.default_exchange.publish(
                            aio_pika.Message(encode(k, s), message_id=f"{k}-{s}"),
                            routing_key=partition_name(queue, k, PARTITIONS),
                        )
                        for k, s in items[start : start + 1000]
                    )
                )

        await broker(send)

    asyncio.run(broker(declare))
    env = {"SOURCE_KIND": "rabbitmq", "SOURCE_URL": url, "SOURCE_NAME": queue}
    try:
        with fault_run(tmp_path, env) as run:
            scenario(run, publish, per_key=67)  # 20,100 messages, then 20,100 more
    finally:
        asyncio.run(broker(delete))


def test_redis_streams_keep_order_spread_the_intake_and_lose_nothing_to_a_kill(
    tmp_path: Path,
) -> None:
    aioredis = _import("redis.asyncio")
    from cloister.sources import partition_name

    url, stream = "redis://127.0.0.1:6379/0", f"cloister-proc-{uuid.uuid4().hex[:8]}"

    async def publish(items: list[tuple[str, int]]) -> None:
        client = aioredis.Redis.from_url(url)
        try:
            async with client.pipeline(transaction=False) as pipe:
                for k, s in items:
                    to = partition_name(stream, k, PARTITIONS)
                    pipe.xadd(to, {"body": encode(k, s), "msg_id": f"{k}-{s}"})
                await pipe.execute()
        finally:
            await client.aclose()

    async def clean() -> None:
        client = aioredis.Redis.from_url(url)
        try:
            keys = [k async for k in client.scan_iter(match=f"{stream}*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()

    env = {"SOURCE_KIND": "redis", "SOURCE_URL": url, "SOURCE_NAME": stream}
    try:
        asyncio.run(publish([]))  # the server is there (or the test is skipped)
    except Exception as exc:
        unavailable(f"no Redis at {url}: {exc}")
    try:
        with fault_run(tmp_path, env) as run:
            scenario(run, publish, per_key=20)  # 6,000 messages, then 6,000 more
    finally:
        asyncio.run(clean())


def test_jetstream_keeps_order_spreads_the_intake_and_loses_nothing_to_a_kill(
    tmp_path: Path,
) -> None:
    import nats

    from cloister.sources import partition_name

    stream, subject = "ORDERS", "orders"
    env = {"SOURCE_KIND": "jetstream", "SOURCE_NAME": stream, "SOURCE_SUBJECT": subject}

    with fault_run(tmp_path, env) as run:

        async def publish(items: list[tuple[str, int]]) -> None:
            nc = await nats.connect(run.nats.url)
            js = nc.jetstream()
            if not items:
                await js.add_stream(name=stream, subjects=[f"{subject}.*"])
            for start in range(0, len(items), 500):
                await asyncio.gather(
                    *(
                        js.publish(
                            partition_name(subject, k, PARTITIONS),
                            encode(k, s),
                            headers={"Nats-Msg-Id": f"{k}-{s}"},
                        )
                        for k, s in items[start : start + 500]
                    )
                )
            await nc.close()

        asyncio.run(publish([]))  # the user's stream, before the nodes start
        run.env["SOURCE_URL"] = run.nats.url
        scenario(run, publish, per_key=20)


def _import(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        unavailable(f"{module} is not installed: {exc}")
