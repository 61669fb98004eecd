"""The seed's scenario with real processes: nothing lost across topology changes.

Three ``cloister run seed_app:SeedApp`` node processes on a 3-server NATS cluster (R3
storage); a ``DynamicManager`` over 10,000 keys whose ``handle_cast`` appends each
message's sequence number to the key's payload. Messages are published into RabbitMQ at a
steady rate, each carrying its key and per-key sequence number, to its key's partition
queue (``cloister.sources.partition_name``: the sources' default, partitioned mode). At 30%
of the stream one node is killed with SIGKILL, at 60% a new one starts, at 80% another gets
SIGTERM. At the
end, from the nodes' journals (see ``seed_app.py``): every message handled (none lost),
per-key order kept, duplicates counted (with msg_id: zero expected), and no key ever
handled on two nodes at the same instant.

Run: ``python bench/seed_flow.py`` (or ``cloister bench seed-flow``); ``--messages`` and
``--keys`` for a shorter run (the test suite runs a short one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
READY = r"^state \S+ -> ready"


def analyse(
    journals: list[Path], messages: int, keys: int, per_key: dict[str, int]
) -> dict[str, Any]:
    """Read every node's journal and check the guarantees."""
    events: dict[str, list[tuple[float, float, int, str]]] = defaultdict(list)
    for journal in journals:
        if not journal.exists():
            continue
        for line in journal.read_text().splitlines():
            parts = line.split()
            if len(parts) != 5:
                continue  # a line cut by SIGKILL mid-write
            key, seq, node, start, end = parts
            events[key].append((float(start), float(end), int(seq), node))
    handled = sum(len(e) for e in events.values())
    repeated = []
    for key, entries in events.items():
        counts: dict[int, list[tuple[str, float]]] = defaultdict(list)
        for start, _end, seq, node in entries:
            counts[seq].append((node, round(start - entries[0][0], 3)))
        repeated += [(key, seq, where) for seq, where in counts.items() if len(where) > 1]
    distinct = 0
    out_of_order = 0
    overlaps = 0
    lost_keys = []
    for key, expected in per_key.items():
        seen: set[int] = set()
        highest = 0
        for _start, _end, seq, _node in sorted(events.get(key, [])):
            if seq not in seen:
                if seq < highest:
                    out_of_order += 1
                seen.add(seq)
                highest = max(highest, seq)
        distinct += len(seen)
        if len(seen) != expected:
            lost_keys.append(key)
        latest_end: dict[str, float] = {}  # per node, the end of its latest handling
        for start, end, _, node in sorted(events.get(key, [])):
            if any(other != node and until > start for other, until in latest_end.items()):
                overlaps += 1
            latest_end[node] = max(end, latest_end.get(node, 0.0))
    nodes = {node for e in events.values() for *_, node in e}
    moved = sum(1 for e in events.values() if len({n for *_, n in e}) > 1)
    return {
        "messages": messages,
        "handled": handled,
        "distinct": distinct,
        "lost": messages - distinct,
        "duplicates": handled - distinct,
        "out_of_order": out_of_order,
        "overlaps": overlaps,
        "nodes_that_handled": sorted(nodes),
        "keys_that_moved": moved,
        "keys_missing_messages": lost_keys[:10],
        "repeated": repeated[:10],
    }


async def final_state(url: str, per_key: dict[str, int]) -> dict[str, Any]:
    """Check every key's final payload: each sequence number exactly once, in order.

    A message's payload change is stored before the message is acknowledged, so the
    stored payloads are the cluster's state, whatever happened to the nodes.
    """
    from cloister.backends import open_backend
    from cloister.manager.claims import is_claim_key
    from cloister.manager.state import Stored

    backend = open_backend(url, "seed", "_seed-bench", replicas=3)
    await backend.connect()
    try:
        kv = await backend.kv("mgr-seed")
        deadline = time.monotonic() + 30
        while True:
            payloads = {}
            for entry in (await kv.entries()).values():
                if is_claim_key(entry.key):
                    continue  # a partition claim (the fencing token), not a worker
                stored = Stored.decode(entry.value)
                payloads[stored.id] = tuple(stored.payload or ())
            complete = all(len(set(payloads.get(k, ()))) == n for k, n in per_key.items())
            if complete or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    finally:
        await backend.close()
    state_duplicates = sum(len(p) - len(set(p)) for p in payloads.values())
    state_missing = sum(n - len(set(payloads.get(k, ()))) for k, n in per_key.items())
    state_disordered = sum(1 for p in payloads.values() if list(p) != sorted(p))
    return {
        "state_duplicates": state_duplicates,
        "state_missing": state_missing,
        "state_out_of_order": state_disordered,
    }


PARTITIONS = 64  # SeedApp's partitions (passed to it as SEED_PARTITIONS)


async def publish(
    url: str, queue: str, plan: list[tuple[str, int]], rate: float, progress: list[int]
) -> None:
    import aio_pika

    from cloister.sources import partition_name

    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        started = time.monotonic()
        window: list[Any] = []
        for index, (key, seq) in enumerate(plan):
            due = started + index / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            body = json.dumps({"key": key, "seq": seq}).encode()
            window.append(
                channel.default_exchange.publish(
                    aio_pika.Message(
                        body,
                        message_id=f"{key}:{seq}",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=partition_name(queue, key, PARTITIONS),
                )
            )
            if len(window) >= 100:
                await asyncio.gather(*window)
                window.clear()
            progress[0] = index + 1
        await asyncio.gather(*window)
        progress[0] = len(plan)


async def declare(url: str, queue: str) -> None:
    import aio_pika

    from cloister.sources.rabbitmq import declare_partition_queues

    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel()
        await declare_partition_queues(channel, queue, PARTITIONS)


async def delete_queue(url: str, queue: str) -> None:
    import aio_pika

    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel()
        for partition in range(PARTITIONS):
            await channel.queue_delete(f"{queue}.{partition}")


async def scenario(args: argparse.Namespace) -> dict[str, Any]:
    from cloister.testing import NatsCluster, ProcessGroup, wait_for_event_async

    workdir = Path(tempfile.mkdtemp(prefix="seed-flow-"))
    queue = f"seed-{uuid.uuid4().hex[:8]}"
    keys = [f"key-{i}" for i in range(args.keys)]
    plan = [(keys[i % args.keys], i // args.keys + 1) for i in range(args.messages)]
    per_key: dict[str, int] = defaultdict(int)
    for key, _ in plan:
        per_key[key] += 1
    await declare(args.amqp, queue)
    timeline: list[tuple[float, str]] = []
    began = time.monotonic()

    def note(what: str) -> None:
        timeline.append((round(time.monotonic() - began, 2), what))
        print(f"  {timeline[-1][0]:7.2f}s  {what}", flush=True)

    with NatsCluster(3) as nats, ProcessGroup(log_dir=workdir) as group:
        env = {
            "SEED_KEYS": str(args.keys),
            "SEED_QUEUE": queue,
            "SEED_PARTITIONS": str(PARTITIONS),
            "SEED_AMQP": args.amqp,
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        }
        journals: list[Path] = []

        def spawn(name: str) -> Any:
            journal = workdir / f"{name}.journal"
            journals.append(journal)
            command = [
                "-m",
                "cloister",
                "run",
                "seed_app:SeedApp",
                "--cluster",
                "seed",
                "--backend",
                nats.url,
                "--name",
                name,
                "--heartbeat",
                "0.5",
                "--failure-timeout",
                "2",
                "--replicas",
                "3",
            ]
            return group.spawn_python(
                *command, name=name, env={**env, "SEED_JOURNAL": str(journal)}
            )

        nodes = {name: spawn(name) for name in ("node-1", "node-2", "node-3")}
        for node in nodes.values():
            await wait_for_event_async(node, READY, timeout=60)
        note("3 nodes ready")
        progress = [0]
        publisher = asyncio.ensure_future(publish(args.amqp, queue, plan, args.rate, progress))
        steps = [(0.3, "kill -9 node-2"), (0.6, "start node-4"), (0.8, "SIGTERM node-3")]
        while steps:
            fraction, what = steps[0]
            if progress[0] >= args.messages * fraction:
                steps.pop(0)
                note(what)
                if what.startswith("kill"):
                    nodes["node-2"].kill()
                elif what.startswith("start"):
                    nodes["node-4"] = spawn("node-4")
                else:
                    await asyncio.to_thread(nodes["node-3"].terminate, 30)
            await asyncio.sleep(0.05)
        await publisher
        note(f"{args.messages} messages published")
        deadline = time.monotonic() + args.drain_timeout
        result = analyse(journals, args.messages, args.keys, per_key)
        while result["distinct"] < args.messages and time.monotonic() < deadline:
            await asyncio.sleep(1)
            result = analyse(journals, args.messages, args.keys, per_key)
        note(f"{result['distinct']} distinct messages handled")
        result.update(await final_state(nats.url, per_key))
        note("final payloads read from the cluster's state table")
        for name in ("node-1", "node-4"):
            await asyncio.to_thread(nodes[name].terminate, 30)
        note("stopped")
    await delete_queue(args.amqp, queue)
    result["timeline"] = timeline
    result["seconds"] = time.monotonic() - began
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=600.0, help="messages published per second")
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--drain-timeout", type=float, default=300.0)
    parser.add_argument("--json-out", type=Path, help="also write the result here (tests)")
    args = parser.parse_args()
    result = asyncio.run(scenario(args))
    sys.path.insert(0, str(HERE))
    from _common import print_table, write_json

    rows = [
        ["messages published", f"{result['messages']:,}", "-", "-"],
        ["lost", result["lost"], 0, result["lost"] == 0],
        ["per-key order violations", result["out_of_order"], 0, result["out_of_order"] == 0],
        [
            "final payloads: duplicates (msg_id given)",
            result["state_duplicates"],
            0,
            result["state_duplicates"] == 0,
        ],
        [
            "final payloads: missing sequence numbers",
            result["state_missing"],
            0,
            result["state_missing"] == 0,
        ],
        [
            "final payloads: out of order",
            result["state_out_of_order"],
            0,
            result["state_out_of_order"] == 0,
        ],
        [
            "handler runs repeated (at-least-once, around kill -9)",
            result["duplicates"],
            "reported",
            "-",
        ],
        ["keys handled on two nodes at once", result["overlaps"], 0, result["overlaps"] == 0],
        [
            "keys that moved between nodes",
            result["keys_that_moved"],
            "> 0",
            result["keys_that_moved"] > 0,
        ],
        ["seconds", f"{result['seconds']:.1f}", "-", "-"],
    ]
    print_table(
        "seed flow: RabbitMQ -> inbox -> workers, kill -9 / join / SIGTERM",
        ["figure", "value", "target", "met"],
        rows,
    )
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(result))
    else:
        print(f"wrote {write_json('seed_flow', result)}")
    ok = (
        result["lost"] == 0
        and result["out_of_order"] == 0
        and result["overlaps"] == 0
        and result["state_duplicates"] == 0
        and result["state_missing"] == 0
        and result["state_out_of_order"] == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
