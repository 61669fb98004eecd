"""Benchmark: layouts for a durable, key-owned inbox on JetStream, side by side.

The question (the inbox issue): "partition the inbox rather than one stream or consumer
per key; where possible let the server enforce exclusive consumption ... Measure the
alternatives." This measures them with raw nats-py (no pycloister code in the path), each
on a fresh local nats-server (``cloister.testing.NatsServer``), in process:

- partitioned-P (P = 8, 32, 128): one work-queue stream, subjects ``inbox.<p>`` with
  ``p = crc32(key) % P``, one durable pull consumer per partition (filter ``inbox.<p>``,
  explicit acks). What pycloister builds.
- consumer-per-key: one work-queue stream, subjects ``inbox.<key>``, one durable pull
  consumer per key (K consumers).
- stream-per-key: one work-queue stream per key (K streams), one durable consumer each.
  Stream creation is capped at ``--stream-budget`` seconds (default 120, checked between
  windows of ``WINDOW`` creations); if the cap is hit, the case runs with the keys whose
  streams were created (reported as ``capped``; later rounds reuse that smaller K).
- single-consumer: one work-queue stream, one consumer (filter ``inbox.*``) for every
  key — a plain queue with no per-key ownership: the reference for raw speed.

Every stream is a file-backed work-queue stream; keys are worker ids ``w0 .. w<K-1>``.
Per case, in this order:

1. setup: create the stream(s) and all consumers (API requests pipelined, at most
   ``WINDOW`` in flight); server RSS (``/varz`` "mem") read right after.
2. exclusivity: try to add a second durable consumer with the first consumer's filter
   subject; record whether the server refused it and the JetStream error code (a
   work-queue stream refuses overlapping filters, 10100).
3. publish: N small msgpack payloads, round-robin over the keys, ``js.publish``
   pipelined in gathered windows of 256 (each one waits for its ack).
4. handoff: one of three nodes leaves, so the consumers it owned (every third one,
   ``index % 3 == 1``: P/3 resp. K/3) are deleted and re-created — for real, with the N
   messages still stored; the delete and re-create times are measured.
5. consume: one node drains everything: one pull subscription per consumer, fetch
   batches of up to 256, decode and ``msg.ack()`` each message (each loop knows how many
   messages its consumer holds, so no loop ends on a timeout). Two rates: fetch+ack
   (until the server has received every ack) and consume (until it has processed them:
   no message left in the stream(s), per ``/jsz``). See ``consume`` for how the fetch
   loops are scheduled.

Each of ``--rounds`` rounds runs every case once; figures are medians over rounds.
Run: ``python bench/inbox_layouts.py`` (K = 1000 keys, N = 50,000 messages);
``--quick`` for K = 200, N = 5,000; ``--keys`` / ``--messages`` / ``--rounds`` to change.
Prints a table (and the facts behind it); writes ``bench/results/inbox_layouts.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import msgpack
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import APIError

from _common import print_table, write_json
from cloister.testing import NatsServer

WINDOW = 64  # JetStream API requests (stream/consumer create/delete) in flight at once
PUBLISH_WINDOW = 256  # js.publish calls gathered at once
FETCH_BATCH = 256
FETCH_TIMEOUT = 0.5  # seconds; only matters if a consumer is (briefly) empty
CONSUME_WORKERS = 8  # concurrent fetch loops of the consuming node (multi-consumer layouts)
SINGLE_FETCHERS = 2  # concurrent pull subscriptions on the one shared consumer
NODES = 3
IDLE_LIMIT = 30.0  # seconds a fetch loop may see nothing before the case fails
STORED_WAIT = 600.0  # seconds consume waits for the server to process the acks


@dataclass(frozen=True)
class Consumer:
    """One durable pull consumer: its stream, name and filter subject."""

    stream: str
    name: str
    subject: str


@dataclass(frozen=True)
class Layout:
    """How one alternative maps keys to streams, subjects and consumers."""

    case: str
    keys: tuple[str, ...]
    streams: dict[str, list[str]]  # stream name -> its subjects
    consumers: tuple[Consumer, ...]
    subject: tuple[str, ...]  # per key index: the subject its messages are published to
    owner: tuple[int, ...]  # per key index: the index of the consumer that receives them


def make_keys(count: int) -> tuple[str, ...]:
    """The worker ids used as keys."""
    return tuple(f"w{i}" for i in range(count))


def partitioned(keys: tuple[str, ...], partitions: int) -> Layout:
    """One stream, ``partitions`` subjects and one consumer per partition."""
    part = [zlib.crc32(key.encode()) % partitions for key in keys]
    return Layout(
        case=f"partitioned-{partitions}",
        keys=keys,
        streams={"INBOX": ["inbox.*"]},
        consumers=tuple(Consumer("INBOX", f"p{p}", f"inbox.{p}") for p in range(partitions)),
        subject=tuple(f"inbox.{p}" for p in part),
        owner=tuple(part),
    )


def consumer_per_key(keys: tuple[str, ...]) -> Layout:
    """One stream, one subject and one consumer per key."""
    return Layout(
        case="consumer-per-key",
        keys=keys,
        streams={"INBOX": ["inbox.*"]},
        consumers=tuple(Consumer("INBOX", f"c-{key}", f"inbox.{key}") for key in keys),
        subject=tuple(f"inbox.{key}" for key in keys),
        owner=tuple(range(len(keys))),
    )


def stream_per_key(keys: tuple[str, ...]) -> Layout:
    """One stream (one subject) and one consumer per key."""
    return Layout(
        case="stream-per-key",
        keys=keys,
        streams={f"INBOX-{key}": [f"inbox.{key}"] for key in keys},
        consumers=tuple(Consumer(f"INBOX-{key}", "owner", f"inbox.{key}") for key in keys),
        subject=tuple(f"inbox.{key}" for key in keys),
        owner=tuple(range(len(keys))),
    )


def single_consumer(keys: tuple[str, ...]) -> Layout:
    """One stream and one consumer for every key (no ownership)."""
    return Layout(
        case="single-consumer",
        keys=keys,
        streams={"INBOX": ["inbox.*"]},
        consumers=(Consumer("INBOX", "all", "inbox.*"),),
        subject=tuple(f"inbox.{key}" for key in keys),
        owner=tuple(0 for _ in keys),
    )


# -- JetStream helpers ----------------------------------------------------------------------


async def windowed(calls: Iterable[Callable[[], Awaitable[Any]]], window: int = WINDOW) -> None:
    """Await ``calls`` with at most ``window`` in flight."""
    pending: set[asyncio.Future[Any]] = set()
    for call in calls:
        if len(pending) >= window:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                future.result()
        pending.add(asyncio.ensure_future(call()))
    if pending:
        for future in (await asyncio.wait(pending))[0]:
            future.result()


def consumer_config(consumer: Consumer) -> ConsumerConfig:
    """A durable pull consumer with explicit acks, filtered to ``consumer.subject``."""
    return ConsumerConfig(
        name=consumer.name,
        durable_name=consumer.name,
        filter_subject=consumer.subject,
        ack_policy=AckPolicy.EXPLICIT,
    )


async def create_consumers(js: JetStreamContext, consumers: Sequence[Consumer]) -> None:
    """Create ``consumers`` (pipelined)."""
    await windowed(partial(js.add_consumer, c.stream, consumer_config(c)) for c in consumers)


async def delete_consumers(js: JetStreamContext, consumers: Sequence[Consumer]) -> None:
    """Delete ``consumers`` (pipelined)."""
    await windowed(partial(js.delete_consumer, c.stream, c.name) for c in consumers)


async def create_streams(js: JetStreamContext, layout: Layout, budget: float) -> int:
    """Create the streams of ``layout`` in order (pipelined) until done or ``budget`` s passed.

    Each stream allows its own consumers plus one (the intruder of ``try_intruder``):
    without ``max_consumers`` the nats-server tried here (2.15.1) refuses a stream's 1001st
    consumer (10026, "maximum consumers limit reached"): consumer-per-key with K = 1000
    reaches that, and it would hide the work-queue overlap check the intruder probes.
    Returns how many of the streams (a prefix, in order) exist.
    """
    per_stream: dict[str, int] = {}
    for consumer in layout.consumers:
        per_stream[consumer.stream] = per_stream.get(consumer.stream, 0) + 1
    deadline = time.perf_counter() + budget
    items = list(layout.streams.items())
    created = 0
    for start in range(0, len(items), WINDOW):
        if time.perf_counter() > deadline:
            break
        chunk = items[start : start + WINDOW]
        await asyncio.gather(
            *(
                js.add_stream(
                    StreamConfig(
                        name=name,
                        subjects=subjects,
                        retention=RetentionPolicy.WORK_QUEUE,
                        storage=StorageType.FILE,
                        max_consumers=per_stream.get(name, 0) + 1,
                    )
                )
                for name, subjects in chunk
            )
        )
        created += len(chunk)
    return created


async def try_intruder(js: JetStreamContext, layout: Layout) -> dict[str, Any]:
    """Try a second durable consumer with the first consumer's filter subject."""
    first = layout.consumers[0]
    intruder = Consumer(first.stream, "intruder", first.subject)
    result: dict[str, Any] = {"filter_subject": first.subject}
    try:
        await js.add_consumer(first.stream, consumer_config(intruder))
    except APIError as exc:
        result.update(refused=True, err_code=exc.err_code, description=exc.description)
    else:
        result.update(refused=False, err_code=None, description="accepted")
        await js.delete_consumer(first.stream, intruder.name)
    return result


# -- the measured phases --------------------------------------------------------------------


async def publish(js: JetStreamContext, layout: Layout, n: int) -> float:
    """Publish ``n`` messages round-robin over the keys; return the seconds taken."""
    keys = len(layout.keys)
    started = time.perf_counter()
    for start in range(0, n, PUBLISH_WINDOW):
        await asyncio.gather(
            *(
                js.publish(layout.subject[i % keys], msgpack.packb([layout.keys[i % keys], i]))
                for i in range(start, min(n, start + PUBLISH_WINDOW))
            )
        )
    return time.perf_counter() - started


async def fetch_some(sub: JetStreamContext.PullSubscription, batch: int) -> list[Msg]:
    """Up to ``batch`` messages from ``sub`` ([] if none came within ``FETCH_TIMEOUT``)."""
    try:
        return await sub.fetch(batch, timeout=FETCH_TIMEOUT)
    except TimeoutError:  # nats.errors.TimeoutError or asyncio's (the same in 3.11+)
        return []


async def drain(sub: JetStreamContext.PullSubscription, want: int) -> int:
    """Fetch and ack from ``sub`` until ``want`` messages were acked; return how many."""
    got = 0
    idle_since = time.perf_counter()
    while got < want:
        msgs = await fetch_some(sub, min(FETCH_BATCH, want - got))
        if not msgs:
            if time.perf_counter() - idle_since > IDLE_LIMIT:
                raise RuntimeError(f"{want - got} messages never arrived")
            continue
        idle_since = time.perf_counter()
        for msg in msgs:
            msgpack.unpackb(msg.data)  # every layout decodes what it receives
            await msg.ack()
        got += len(msgs)
    return got


async def consume(
    nc: Client, js: JetStreamContext, layout: Layout, n: int, stored: Callable[[], int]
) -> dict[str, Any]:
    """One node drains every consumer of ``layout``; return the consume figures.

    How the fetch loops are scheduled (chosen by trying 2 to 256 loops on this machine;
    more loops than this were no faster, and slower for the per-key layouts):

    - several consumers: ``CONSUME_WORKERS`` fetch loops (fewer if there are fewer
      consumers), each taking the next consumer from a shared list and draining it
      completely before taking another (all messages are stored before consuming starts,
      so there is nothing to gain by coming back to a consumer later). Each fetch asks for
      ``min(256, messages left on that consumer)``: nats-py's ``fetch`` otherwise waits
      out its timeout whenever fewer than the batch are left, which would measure the
      timeout, not the layout (a real consumer knows the count too: ``num_pending``).
    - single-consumer: ``SINGLE_FETCHERS`` pull subscriptions bound to the one shared
      consumer fetch concurrently (competing workers, the usual plain-queue setup), claiming
      batches from a shared count of messages left. Kept at 2: with 4 x 256 or more
      outstanding, the consumer's default ``max_ack_pending`` (1000) stalls fetches (8
      fetchers measured ~600 msg/s). Counts the keys whose messages reached more than one
      fetcher: nothing keeps a key with one fetcher.

    Binding the pull subscriptions (one local SUB each) happens before the clock starts.
    Two clocks: ``fetch_ack_s`` stops when the client has fetched everything and the
    server has received every ack (a flush); ``consume_s`` stops when the server has
    processed those acks, i.e. ``stored()`` (messages left in the stream(s)) is 0 — acked
    messages leave a work-queue stream. The second is the consume rate reported: the
    server may process acks much later than it receives them (it does with many
    consumers on one stream).
    """
    want = [0] * len(layout.consumers)
    for i in range(n):
        want[layout.owner[i % len(layout.keys)]] += 1
    result: dict[str, Any] = {}
    if len(layout.consumers) == 1:
        only = layout.consumers[0]
        subs = [
            await js.pull_subscribe_bind(only.name, stream=only.stream)
            for _ in range(SINGLE_FETCHERS)
        ]
        seen: list[set[str]] = [set() for _ in subs]
        unclaimed = n  # messages no fetch has asked for yet
        acked = 0

        async def shared(index: int) -> None:
            nonlocal unclaimed, acked
            idle_since = time.perf_counter()
            while unclaimed > 0:
                batch = min(FETCH_BATCH, unclaimed)
                unclaimed -= batch  # claimed before the await: the fetchers never overask
                msgs = await fetch_some(subs[index], batch)
                unclaimed += batch - len(msgs)
                if msgs:
                    idle_since = time.perf_counter()
                elif time.perf_counter() - idle_since > IDLE_LIMIT:
                    raise RuntimeError(f"{unclaimed} messages never arrived")
                for msg in msgs:
                    seen[index].add(msgpack.unpackb(msg.data)[0])
                    await msg.ack()
                acked += len(msgs)

        started = time.perf_counter()
        await asyncio.gather(*(shared(i) for i in range(len(subs))))
        await nc.flush()
        fetched = time.perf_counter() - started
        fetchers: dict[str, int] = {}
        for keys in seen:
            for key in keys:
                fetchers[key] = fetchers.get(key, 0) + 1
        result["fetch_loops"] = len(subs)
        result["keys_split_across_fetchers"] = sum(1 for c in fetchers.values() if c > 1)
        total = acked
    else:
        subs = [await js.pull_subscribe_bind(c.name, stream=c.stream) for c in layout.consumers]
        todo = list(zip(subs, want, strict=True))
        todo.reverse()  # popped from the end: consumers in order
        counts: list[int] = []

        async def worker() -> None:
            while todo:
                sub, count = todo.pop()
                counts.append(await drain(sub, count))

        loops = min(len(subs), CONSUME_WORKERS)
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(loops)))
        await nc.flush()
        fetched = time.perf_counter() - started
        total = sum(counts)
        result["fetch_loops"] = loops
    for sub in subs:
        await sub.unsubscribe()
    if total != n:
        raise RuntimeError(f"{layout.case}: acked {total} of {n} messages")
    left = stored()
    while left > 0:
        if time.perf_counter() - started > STORED_WAIT:
            raise RuntimeError(f"{layout.case}: {left} acked messages still stored")
        await asyncio.sleep(0.02)
        left = stored()
    elapsed = time.perf_counter() - started
    result.update(
        fetch_ack_s=fetched,
        fetch_ack_per_s=n / fetched,
        consume_s=elapsed,
        consume_per_s=n / elapsed,
    )
    return result


async def run_case(server: NatsServer, layout: Layout, n: int, budget: float) -> dict[str, Any]:
    """Measure one layout on ``server`` (fresh); see the module docstring for the phases."""
    nc: Client = await nats.connect(server.url)
    js = nc.jetstream(timeout=60)
    out: dict[str, Any] = {"case": layout.case, "keys_requested": len(layout.keys)}
    wanted = len(layout.streams)

    started = time.perf_counter()
    created = await create_streams(js, layout, budget)
    streams_s = time.perf_counter() - started
    if created < len(layout.streams):  # stream-per-key only: keep the keys that got one
        layout = stream_per_key(layout.keys[:created])
    await create_consumers(js, layout.consumers)
    out["setup_s"] = time.perf_counter() - started
    out.update(
        capped=created < wanted,
        keys=len(layout.keys),
        streams=len(layout.streams),
        streams_s=streams_s,
        consumers=len(layout.consumers),
    )
    try:
        out["server_rss_mb"] = server.varz()["mem"] / 2**20
    except (OSError, KeyError, ValueError):
        out["server_rss_mb"] = None
    out["exclusivity"] = await try_intruder(js, layout)
    # Every key has exactly one consumer of its own (partitioned: that of its partition),
    # so a refused duplicate means the server enforces one owner per key; with one shared
    # consumer it enforces nothing per key.
    out["exclusivity"]["per_key"] = out["exclusivity"]["refused"] and len(layout.consumers) > 1
    if len(layout.consumers) == 1:
        out["exclusivity"]["note"] = (
            "per-key exclusivity not enforced: any number of clients may fetch from the one "
            "shared consumer, so one key's messages go to whichever fetcher asks"
        )

    publish_s = await publish(js, layout, n)
    out.update(messages=n, publish_s=publish_s, publish_per_s=n / publish_s)

    moved = [c for i, c in enumerate(layout.consumers) if i % NODES == 1]
    started = time.perf_counter()
    await delete_consumers(js, moved)
    deleted = time.perf_counter()
    await create_consumers(js, moved)
    done = time.perf_counter()
    out["handoff"] = {
        "consumers_moved": len(moved),
        "delete_s": deleted - started,
        "create_s": done - deleted,
        "total_s": done - started,
    }

    out.update(await consume(nc, js, layout, n, partial(stored_messages, server)))
    await nc.close()
    return out


def stored_messages(server: NatsServer) -> int:
    """Messages stored in all streams of ``server`` (its ``/jsz`` monitoring document)."""
    return int(server.jsz()["messages"])


# -- driver ----------------------------------------------------------------------------------


def median_of(values: Sequence[float | None]) -> float | None:
    """The median of the values that are not ``None`` (``None`` if there are none)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One case's figures: medians over its rounds, plus the last round's facts."""
    last = runs[-1]

    def median(pick: Callable[[dict[str, Any]], float | None]) -> float | None:
        return median_of([pick(r) for r in runs])

    return {
        "case": last["case"],
        "keys": last["keys"],
        "capped": any(r["capped"] for r in runs),
        "streams": last["streams"],
        "consumers": last["consumers"],
        "setup_s": median(lambda r: r["setup_s"]),
        "publish_per_s": median(lambda r: r["publish_per_s"]),
        "fetch_ack_per_s": median(lambda r: r["fetch_ack_per_s"]),
        "consume_per_s": median(lambda r: r["consume_per_s"]),
        "ack_lag_s": median(lambda r: r["consume_s"] - r["fetch_ack_s"]),
        "fetch_loops": last["fetch_loops"],
        "handoff_consumers": last["handoff"]["consumers_moved"],
        "handoff_s": median(lambda r: r["handoff"]["total_s"]),
        "handoff_delete_s": median(lambda r: r["handoff"]["delete_s"]),
        "handoff_create_s": median(lambda r: r["handoff"]["create_s"]),
        "server_rss_mb": median(lambda r: r["server_rss_mb"]),
        "exclusivity": last["exclusivity"],
        "keys_split_across_fetchers": last.get("keys_split_across_fetchers"),
    }


def seconds(value: float | None) -> str:
    """A duration for the table."""
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def table_row(s: dict[str, Any]) -> list[str]:
    """One summarized case as a table row."""
    ex = s["exclusivity"]
    return [
        s["case"],
        f"{s['keys']:,}" + (" (capped)" if s["capped"] else ""),
        f"{s['streams']:,}/{s['consumers']:,}",
        seconds(s["setup_s"]),
        f"{s['publish_per_s']:,.0f}",
        f"{s['fetch_ack_per_s']:,.0f}",
        f"{s['consume_per_s']:,.0f}",
        f"{s['handoff_consumers']} in {seconds(s['handoff_s'])}",
        f"refused ({ex['err_code']})" if ex["refused"] else "accepted",
        "yes" if ex["per_key"] else "no",
        "-" if s["server_rss_mb"] is None else f"{s['server_rss_mb']:.0f} MB",
    ]


HEADERS = [
    "layout",
    "keys",
    "streams/consumers",
    "setup",
    "publish msg/s",
    "fetch+ack msg/s",
    "consume msg/s",
    "handoff (1 of 3 nodes leaves)",
    "2nd consumer, same filter",
    "1 owner per key",
    "server RSS",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=1000, help="K, distinct keys")
    parser.add_argument("--messages", type=int, default=50_000, help="N, messages per case")
    parser.add_argument("--rounds", type=int, default=1, help="rounds (medians reported)")
    parser.add_argument(
        "--stream-budget", type=float, default=120.0, help="cap on stream-per-key creation (s)"
    )
    parser.add_argument("--quick", action="store_true", help="K = 200, N = 5,000, one round")
    args = parser.parse_args()
    if args.quick:
        args.keys, args.messages, args.rounds = 200, 5_000, 1

    keys = make_keys(args.keys)
    builders: dict[str, Callable[[tuple[str, ...]], Layout]] = {
        "partitioned-8": lambda ks: partitioned(ks, 8),
        "partitioned-32": lambda ks: partitioned(ks, 32),
        "partitioned-128": lambda ks: partitioned(ks, 128),
        "consumer-per-key": consumer_per_key,
        "stream-per-key": stream_per_key,
        "single-consumer": single_consumer,
    }
    stream_keys = keys  # shrinks if stream-per-key is capped; later rounds reuse the cap
    runs: dict[str, list[dict[str, Any]]] = {case: [] for case in builders}
    began = time.perf_counter()
    for number in range(args.rounds):
        for case, build in builders.items():
            layout = build(stream_keys if case == "stream-per-key" else keys)
            with NatsServer() as server:
                out = asyncio.run(run_case(server, layout, args.messages, args.stream_budget))
            if case == "stream-per-key":
                out["keys_requested"] = args.keys
                out["capped"] = out["keys"] < args.keys
                stream_keys = keys[: out["keys"]]
            runs[case].append(out)
            print(
                f"round {number + 1} {case}: setup {seconds(out['setup_s'])}, publish "
                f"{out['publish_per_s']:,.0f}/s, fetch+ack {out['fetch_ack_per_s']:,.0f}/s, "
                f"consume {out['consume_per_s']:,.0f}/s, "
                f"handoff {out['handoff']['consumers_moved']} in "
                f"{seconds(out['handoff']['total_s'])}",
                flush=True,
            )
    elapsed = time.perf_counter() - began
    summary = {case: summarize(case_runs) for case, case_runs in runs.items()}

    print_table(
        f"inbox layouts, one fresh local nats-server each: {args.messages:,} messages over "
        f"{args.keys:,} keys (median of {args.rounds} round(s))",
        HEADERS,
        [table_row(s) for s in summary.values()],
    )
    single = summary["single-consumer"]
    reference = single["consume_per_s"]
    print(
        "consume rate vs single-consumer: "
        + ", ".join(f"{s['case']} {s['consume_per_s'] / reference:.0%}" for s in summary.values())
    )
    print(
        "server still processing acks after the client sent the last one (consume - "
        "fetch+ack): "
        + ", ".join(f"{s['case']} {seconds(s['ack_lag_s'])}" for s in summary.values())
    )
    print(
        "handoff = delete + re-create, with all messages stored, of the consumers owned by "
        "the node that leaves (every third one); single-consumer has no owner, nothing moves."
    )
    print(
        f"single-consumer: a 2nd consumer with the same filter was "
        f"{'refused' if single['exclusivity']['refused'] else 'accepted'}, but nothing binds "
        f"a key to one fetcher: with {single['fetch_loops']} fetchers on the shared consumer, "
        f"{single['keys_split_across_fetchers']:,} of {args.keys:,} keys had messages "
        f"delivered to both."
    )
    stream = summary["stream-per-key"]
    if stream["capped"]:
        print(
            f"stream-per-key was capped: {stream['keys']:,} of {args.keys:,} streams created "
            f"within --stream-budget {args.stream_budget:g} s; measured with those keys."
        )
    print(f"run time {elapsed:.0f} s")
    path = write_json(
        "inbox_layouts",
        {
            "keys": args.keys,
            "messages": args.messages,
            "rounds": args.rounds,
            "settings": {
                "api_window": WINDOW,
                "publish_window": PUBLISH_WINDOW,
                "fetch_batch": FETCH_BATCH,
                "fetch_timeout_s": FETCH_TIMEOUT,
                "consume_workers": CONSUME_WORKERS,
                "single_fetchers": SINGLE_FETCHERS,
                "nodes": NODES,
                "stream_budget_s": args.stream_budget,
            },
            "summary": summary,
            "runs": runs,
            "run_time_s": elapsed,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
