"""Benchmark: casts from one client process, side by side with raw nats-py publishes.

One nats-server, one stream: the inbox of manager ``bench`` (32 partitions, created by
the client as a node would). No node consumes it, so only the producing side is
measured; the stream is purged between cases. Every case runs in each of ``--rounds``
rounds, in turn, and the table shows medians:

- raw-awaited: ``await js.publish(subject, data)`` one message at a time (plain nats-py:
  no message id, no expected-stream header), to the same partition subjects with
  records of the same size as the casts' records.
- cast: ``await client.cast(Bench, key, message)`` one at a time — the id checked, a
  message id generated (and sent as ``Nats-Msg-Id``: the server deduplicates), the
  record encoded and checked against ``max_payload``.
- raw-pipelined: batches of ``--batch`` ``js.publish_async`` then await every ack.
- raw-pipelined-msgid: the same with a ``Nats-Msg-Id`` header on each (what makes a
  cast idempotent; the server keeps every id of the dedup window): informational, it
  shows how much of the gap is the id's.
- raw-core-pipelined: the same records through core ``nc.publish`` with a reply
  subject each, the acks only counted on one wildcard subscription (informational: the
  cheapest pipelined publish nats-py's public API gives, without ``publish_async``'s
  per-message future and ack parsing — and without a message id).
- cast-many: ``await client.cast_many(Bench, batch)``, batches of ``--batch``. Its
  publishes go below nats-py's ``publish_async``: the backend writes the batch's
  ``HPUB`` frames (``Nats-Msg-Id`` header included) into nats-py's write buffer and
  takes the acks on one subscription of its own, one future per batch
  (``cloister.backends.nats._publish``) — so it can beat ``publish_async`` though
  every record carries a message id and the raw ones carry none.
- sync-cast: ``SyncClient.cast`` from one thread (informational: a thread hop per cast).

Setup done, the process freezes what it holds out of the garbage collector's scans
(``gc.freeze()``), for both sides. The raw and our case of each pair alternate in turns
(``--chunk`` awaited messages, or one batch) on two connections open at once, so a
machine shared with other work slows both alike.
- latency: casts launched on a schedule at half the measured single-cast rate (open
  loop: each cast its own task); latency from the scheduled send to the stored ack —
  and raw ``js.publish`` on the same schedule, in alternating turns, for the machine's
  own share. One such pair per round; the table shows the medians of the rounds'
  figures (each round's p99 is in the JSON).

Ratios are taken within each round, and their median reported. Targets (issue 14):
cast >= 70% of raw-awaited, cast-many >= 70% of raw-pipelined, p99
cast latency <= 5 ms at half the max rate. Run: ``python bench/client.py`` (or
``cloister bench client``); ``--quick`` for a smaller run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import secrets
import statistics
import time
from collections.abc import Iterable
from typing import Any

from _common import print_table, write_json

CLUSTER = "bench"
KEYS = 1000


def _manager() -> type:
    from cloister import DynamicManager

    class Bench(DynamicManager):
        name = "bench"
        partitions = 32

    return Bench


async def _raw(url: str, stream: str, prefix: str, messages: list[tuple[Any, Any]]) -> Any:
    """A plain nats-py connection and the records the casts would carry, by subject."""
    import nats

    from cloister import wire
    from cloister.ring import key_hash

    nc = await nats.connect(url)
    js = nc.jetstream()
    for _ in range(50):  # warm, as the client's cases are by their first cast
        await js.publish(f"{prefix}.0", b"warm")
    records = [
        (f"{prefix}.{key_hash(key) % 32}", wire.encode([key, message, f"{'0' * 16}-{n}"]))
        for n, (key, message) in enumerate(messages)
    ]
    return nc, js, records


async def awaited_pair(
    url: str, stream: str, prefix: str, messages: list[Any], chunk: int
) -> dict[str, float]:
    """Raw ``js.publish`` and ``client.cast``, each awaited, in alternating chunks of
    ``chunk`` messages, so both see the same moments of a shared machine."""
    from cloister import Client

    manager = _manager()
    nc, js, records = await _raw(url, stream, prefix, messages)
    raw_time = cast_time = 0.0
    try:
        async with Client(CLUSTER, backend=url) as client:
            await client.cast(manager, "warm", 0)
            for first in range(0, len(messages), chunk):
                begin = time.perf_counter()
                for subject, data in records[first : first + chunk]:
                    await js.publish(subject, data)
                raw_time += time.perf_counter() - begin
                begin = time.perf_counter()
                for key, message in messages[first : first + chunk]:
                    await client.cast(manager, key, message)
                cast_time += time.perf_counter() - begin
    finally:
        await nc.close()
    return {"raw-awaited": len(messages) / raw_time, "cast": len(messages) / cast_time}


async def pipelined_pair(
    url: str, stream: str, prefix: str, messages: list[Any], batch: int
) -> dict[str, float]:
    """Raw ``publish_async`` batches (plain, and with a ``Nats-Msg-Id`` each) and
    ``client.cast_many`` batches, in turns."""
    from cloister import Client

    manager = _manager()
    nc, js, records = await _raw(url, stream, prefix, messages)
    spent = {
        "raw-pipelined": 0.0,
        "raw-pipelined-msgid": 0.0,
        "raw-core-pipelined": 0.0,
        "cast-many": 0.0,
    }
    run = secrets.token_hex(4)
    inbox = nc.new_inbox()
    waiting: list[Any] = [0, None]  # acks still to come, the future the batch awaits

    async def counted(_: Any) -> None:
        waiting[0] -= 1
        if not waiting[0]:
            waiting[1].set_result(None)

    await nc.subscribe(f"{inbox}.*", cb=counted)

    async def core(first: int) -> None:
        some = records[first : first + batch]
        waiting[:] = [len(some), asyncio.get_running_loop().create_future()]
        for n, (subject, data) in enumerate(some):
            await nc.publish(subject, data, reply=f"{inbox}.{n}")
        await asyncio.wait_for(waiting[1], 30)

    async def raw(first: int, ids: bool) -> None:
        futures = [
            await js.publish_async(
                subject, data, headers={"Nats-Msg-Id": f"{run}-{first + n}"} if ids else None
            )
            for n, (subject, data) in enumerate(records[first : first + batch])
        ]
        for future in futures:
            await future

    try:
        async with Client(CLUSTER, backend=url) as client:
            await client.cast(manager, "warm", 0)
            for first in range(0, len(messages), batch):
                begin = time.perf_counter()
                await raw(first, ids=False)
                spent["raw-pipelined"] += time.perf_counter() - begin
                begin = time.perf_counter()
                await raw(first, ids=True)
                spent["raw-pipelined-msgid"] += time.perf_counter() - begin
                begin = time.perf_counter()
                await core(first)
                spent["raw-core-pipelined"] += time.perf_counter() - begin
                begin = time.perf_counter()
                await client.cast_many(manager, messages[first : first + batch])
                spent["cast-many"] += time.perf_counter() - begin
    finally:
        await nc.close()
    return {case: len(messages) / seconds for case, seconds in spent.items()}


def sync_cast(url: str, messages: list[Any]) -> float:
    from cloister import SyncClient

    manager = _manager()
    with SyncClient(CLUSTER, backend=url) as client:
        client.cast(manager, "warm", 0)
        start = time.perf_counter()
        for key, message in messages:
            client.cast(manager, key, message)
        return len(messages) / (time.perf_counter() - start)


async def _paced(send: Any, rate: float, seconds: float) -> list[float]:
    """Open loop: one ``send(n)`` task per scheduled instant, ``rate`` per second; the
    latency of each from its scheduled instant to its acknowledgement, sorted."""
    loop = asyncio.get_running_loop()
    samples: list[float] = []

    async def one(n: int, scheduled: float) -> None:
        await send(n)
        samples.append(loop.time() - scheduled)

    tasks = []
    start = loop.time()
    for n in range(int(rate * seconds)):
        scheduled = start + n / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(n, scheduled)))
    await asyncio.gather(*tasks)
    return sorted(samples)


async def latency_pair(
    url: str,
    stream: str,
    prefix: str,
    messages: list[Any],
    rate: float,
    seconds: float,
    turns: int = 4,
) -> tuple[dict[str, float], dict[str, float]]:
    """Casts and raw ``js.publish`` at ``rate`` per second (open loop), in alternating
    turns of ``seconds / turns``: the latencies of each side, over all its turns."""
    from cloister import Client

    manager = _manager()
    nc, js, records = await _raw(url, stream, prefix, messages)
    ours: list[float] = []
    raw: list[float] = []
    try:
        async with Client(CLUSTER, backend=url) as client:
            await client.cast(manager, "warm", 0)

            async def cast(n: int) -> None:
                await client.cast(manager, f"k{n % KEYS}", n)

            async def publish(n: int) -> None:
                subject, data = records[n % len(records)]
                await js.publish(subject, data)

            for _ in range(turns):
                ours += await _paced(cast, rate, seconds / turns)
                raw += await _paced(publish, rate, seconds / turns)
    finally:
        await nc.close()
    return _percentiles(sorted(ours), rate), _percentiles(sorted(raw), rate)


def _median_of(figures: Iterable[dict[str, float]]) -> dict[str, Any]:
    """Each figure's median over rounds, and the rounds' p99s (``p99_ms_rounds``)."""
    runs = list(figures)
    median: dict[str, Any] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    median["p99_ms_rounds"] = [run["p99_ms"] for run in runs]
    return median


def _percentiles(samples: list[float], rate: float) -> dict[str, float]:
    return {
        "rate": rate,
        "casts": len(samples),
        "p50_ms": samples[len(samples) // 2] * 1000,
        "p99_ms": samples[int(len(samples) * 0.99)] * 1000,
        "max_ms": samples[-1] * 1000,
    }


async def _create(url: str) -> None:
    """Create the inbox's stream, as the first client (or node) of the manager does."""
    from cloister import Client

    async with Client(CLUSTER, backend=url) as client:
        await client.cast(_manager(), "warm", 0)


async def _purge(url: str, stream: str) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        await nc.jetstream().purge_stream(stream)
    finally:
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=20_000, help="casts per case")
    parser.add_argument("--batch", type=int, default=1000, help="casts per cast_many")
    parser.add_argument(
        "--chunk", type=int, default=250, help="awaited casts per turn (raw and ours alternate)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds (median reported)")
    parser.add_argument("--seconds", type=float, default=3.0, help="of the latency case")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.messages, args.rounds, args.seconds = 5_000, 1, 2.0

    from cloister.backends._names import log_stream, log_subjects
    from cloister.testing import NatsServer

    stream, prefix = log_stream(CLUSTER, "inbox-bench"), log_subjects(CLUSTER, "inbox-bench")
    messages = [(f"k{n % KEYS}", {"n": n, "qty": 1}) for n in range(args.messages)]
    cases = (
        "raw-awaited",
        "cast",
        "raw-pipelined",
        "raw-pipelined-msgid",
        "raw-core-pipelined",
        "cast-many",
        "sync-cast",
    )
    rounds: list[dict[str, float]] = []
    print(f"{len(messages):,} messages per case, {args.rounds} round(s)", flush=True)
    with NatsServer() as server:
        url = server.url

        asyncio.run(_create(url))
        # What the process imported stays out of the collector's scans from here on, as
        # a latency-minded service does after start-up: a full collection then takes ~2
        # ms instead of ~35 ms, and falls on either side's turn alike.
        gc.collect()
        gc.freeze()
        asyncio.run(_purge(url, stream))
        for number in range(args.rounds):
            one = asyncio.run(awaited_pair(url, stream, prefix, messages, args.chunk))
            asyncio.run(_purge(url, stream))
            one |= asyncio.run(pipelined_pair(url, stream, prefix, messages, args.batch))
            asyncio.run(_purge(url, stream))
            one["sync-cast"] = sync_cast(url, messages[: len(messages) // 4])
            asyncio.run(_purge(url, stream))
            rounds.append(one)
            print(
                f"round {number + 1}: "
                + ", ".join(f"{case} {rate:,.0f}/s" for case, rate in one.items()),
                flush=True,
            )
        median = {case: statistics.median(r[case] for r in rounds) for case in cases}
        half = median["cast"] / 2
        # One latency pair per round too: a p99 over 3 s is one stall of the machine away
        # from another, so the table shows the median of the rounds' figures.
        pairs = [
            asyncio.run(latency_pair(url, stream, prefix, messages, half, args.seconds))
            for _ in range(args.rounds)
        ]
        lat, raw_lat = _median_of(p[0] for p in pairs), _median_of(p[1] for p in pairs)
        asyncio.run(_purge(url, stream))

    # Ratios within a round (the pair ran in alternating turns), then their median: the
    # machine's load moves both sides of a round alike, not two rounds alike.
    single_ratio = statistics.median(r["cast"] / r["raw-awaited"] for r in rounds)
    many_ratio = statistics.median(r["cast-many"] / r["raw-pipelined"] for r in rounds)
    rows = [
        [
            "single casts, each awaited",
            f"{median['cast']:,.0f}/s",
            f"{median['raw-awaited']:,.0f}/s (js.publish awaited)",
            ">= 70%",
            f"{single_ratio:.0%}",
            single_ratio >= 0.7,
        ],
        [
            f"cast_many, batches of {args.batch}",
            f"{median['cast-many']:,.0f}/s",
            f"{median['raw-pipelined']:,.0f}/s (publish_async batches)",
            ">= 70%",
            f"{many_ratio:.0%}",
            many_ratio >= 0.7,
        ],
        [
            "  (raw with a Nats-Msg-Id each, as casts carry)",
            "-",
            f"{median['raw-pipelined-msgid']:,.0f}/s",
            "-",
            f"{statistics.median(r['cast-many'] / r['raw-pipelined-msgid'] for r in rounds):.0%}",
            "-",
        ],
        [
            "  (raw core nc.publish + one ack subscription, no msg-id)",
            "-",
            f"{median['raw-core-pipelined']:,.0f}/s",
            "-",
            f"{statistics.median(r['cast-many'] / r['raw-core-pipelined'] for r in rounds):.0%}",
            "-",
        ],
        [
            "SyncClient.cast from one thread",
            f"{median['sync-cast']:,.0f}/s",
            "-",
            "-",
            f"{statistics.median(r['sync-cast'] / r['raw-awaited'] for r in rounds):.0%}",
            "-",
        ],
        [
            f"p99 cast latency at half max ({half:,.0f}/s)",
            f"{lat['p99_ms']:.2f} ms (p50 {lat['p50_ms']:.2f})",
            f"{raw_lat['p99_ms']:.2f} ms (p50 {raw_lat['p50_ms']:.2f})",
            "<= 5 ms",
            "-",
            lat["p99_ms"] <= 5,
        ],
    ]
    print_table(
        f"client casts ({args.messages:,} per case, median of {args.rounds} rounds)",
        ["figure", "pycloister", "raw nats-py", "target", "ratio", "met"],
        rows,
    )
    path = write_json(
        "client",
        {
            "messages": args.messages,
            "batch": args.batch,
            "rounds": rounds,
            "median_per_s": median,
            "single_ratio": single_ratio,
            "cast_many_ratio": many_ratio,
            "latency": lat,
            "raw_latency": raw_lat,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
