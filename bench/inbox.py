"""Benchmark: the durable inbox, side by side with a plain JetStream pull consumer.

Cases (issue 6), each in a fresh child process (``--child CASE``; JSON on stdout):

- nats-plain: the reference — a plain nats-py JetStream pull consumer with explicit acks
  (no ordering, no affinity): publish N messages (pipelined), fetch + ack them all.
- nats-inbox: pycloister on the same kind of server — 3 nodes (``Cluster`` +
  ``DynamicManager``) in one process, N casts from all nodes, ordered per key, each acked
  after its ``handle_cast`` returned. Messages/s from the first put to the last handled.
- memory-inbox: the same on the embedded backend.
- latency-memory / latency-nats: put -> ``handle_cast`` latency at half the measured max
  rate (a paced producer); p50/p99.
- pause-memory: pause of moved keys when a node leaves gracefully and when one is killed
  (memory backend's crash injection): the largest put -> handled latency of messages for
  keys that changed owner, under a steady stream.

- nats-inbox-stateful: nats-inbox with a handler that returns ``Replace`` (a new payload,
  stored before the message is acked) — informational, the reference keeps no state.
  ``memory-inbox-stateful`` is the same on the embedded backend (``bench/fencing.py``
  runs both against the code before fencing).

- takeover (``--takeover``): kill -9 of one of 3 nodes (one in a child process, SIGKILLed;
  default heartbeat and failure timeout), every key with a stored state: kill -> epoch
  without it, epoch -> ready, and until each moved key handled a cast sent right after the
  kill; lost casts and wrong states counted. With ``--compare TREE`` side by side.
- ``--compare TREE``: the stateful NATS row of this tree and of another one (its ``src``)
  side by side with plain nats-py, alternating rounds; writes ``inbox_compare.json``.
- idle-nats: what a node costs doing nothing and at a low rate (issue 16): one node
  (``Cluster`` + a ``DynamicManager`` with the default 128 partitions) on its own
  nats-server; CPU seconds of the node's process and of the server over ``--seconds``
  idle, then over as long at 150 casts/s (``psutil``). Run alone with ``--idle`` (the
  same case against other sources: ``PYTHONPATH=<other tree>/src python bench/inbox.py
  --idle``); writes ``bench/results/inbox_idle.json``.

Throughput cases run in ``--rounds`` rounds (each round: every case once, side by side);
the table shows medians. Run: ``python bench/inbox.py`` (or ``cloister bench inbox``);
``--quick`` for a smaller run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import print_table, write_json

KEYS = 1000


# -- the manager under test ---------------------------------------------------------------


def new_record() -> dict[str, Any]:
    """What the workers of one case report: counts and latencies."""
    return {
        "handled": 0,
        "latency": [],
        "moved": set(),
        "moved_since": 0,
        "moved_latency": [],
        "stateful": False,
    }


def make_manager(record: dict[str, Any]) -> type:
    from cloister import DynamicManager, Replace

    class Sink(DynamicManager):
        name = "bench"
        partitions = 32

        def children_specs(self) -> dict[str, Any]:
            return {f"k{i}": {"timeout": 0, "payload": 0} for i in range(KEYS)}

        def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
            record["handled"] += 1
            sent = message[1]
            if sent:
                record["latency"].append(time.perf_counter() - sent)
            if record["moved_since"] and id in record["moved"]:
                record["moved_latency"].append(time.perf_counter() - sent)
            if record["stateful"]:
                return Replace(payload + 1)  # a new payload: stored before the ack
            return None

    return Sink


async def start_nodes(
    backend: str, count: int, record: dict[str, Any], **options: Any
) -> tuple[list[Any], list[Any]]:
    from cloister import Cluster

    manager_cls = make_manager(record)
    clusters = [
        Cluster(
            "bench",
            f"n{i}",
            backend=backend,
            heartbeat=options.get("heartbeat", 0.5),
            failure_timeout=options.get("failure_timeout", 1.5),
            backend_options=options.get("backend_options"),
        )
        for i in range(count)
    ]
    await asyncio.gather(*(c.start() for c in clusters))
    managers = [await manager_cls.start(c) for c in clusters]
    await asyncio.gather(*(c.wait_ready(30) for c in clusters))
    while sum(len(m) for m in managers) < KEYS:
        await asyncio.sleep(0.01)
    return clusters, managers


async def stop_nodes(clusters: list[Any], managers: list[Any]) -> None:
    for manager, cluster in zip(managers, clusters, strict=True):
        await manager.stop()  # a crashed node's manager and cluster only tidy up locally
        await cluster.stop()


async def throughput(
    backend: str, n: int, lanes: int = 128, *, stateful: bool = False
) -> dict[str, Any]:
    record = new_record()
    record["stateful"] = stateful
    clusters, managers = await start_nodes(backend, 3, record)
    started = time.perf_counter()

    async def lane(index: int) -> None:
        for i in range(index, n, lanes):
            await managers[i % 3].cast(f"k{i % KEYS}", [i, 0])

    await asyncio.gather(*(lane(i) for i in range(lanes)))
    stored = time.perf_counter()
    while record["handled"] < n:
        await asyncio.sleep(0.001)
    done = time.perf_counter()
    await stop_nodes(clusters, managers)
    return {"messages": n, "put_per_s": n / (stored - started), "per_s": n / (done - started)}


async def latency(backend: str, rate: float, seconds: float, lanes: int = 64) -> dict[str, Any]:
    record = new_record()
    clusters, managers = await start_nodes(backend, 3, record)
    interval = 1.0 / rate
    n = int(rate * seconds)
    begin = time.perf_counter()

    async def lane(index: int) -> None:
        # A paced producer: message i is due at begin + i * interval; each lane sends its
        # share in order, so at most ``lanes`` puts are in flight (NATS round trips).
        for i in range(index, n, lanes):
            delay = begin + i * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await managers[i % 3].cast(f"k{i % KEYS}", [i, time.perf_counter()])

    await asyncio.gather(*(lane(i) for i in range(lanes)))
    while record["handled"] < n:
        await asyncio.sleep(0.001)
    await stop_nodes(clusters, managers)
    values = sorted(record["latency"])
    return {
        "rate": rate,
        "messages": n,
        "p50_ms": values[len(values) // 2] * 1000,
        "p99_ms": values[int(len(values) * 0.99)] * 1000,
    }


async def pause(kind: str) -> dict[str, Any]:
    """Largest put -> handled latency of moved keys' messages across a leave or a crash."""
    from cloister.backends.memory import world
    from cloister.errors import CloisterError

    record = new_record()
    url = f"memory://bench-pause-{kind}"
    clusters, managers = await start_nodes(url, 3, record, heartbeat=0.2, failure_timeout=0.6)
    victim = 1
    record["moved"] = set(managers[victim].ids())
    stop = asyncio.Event()
    sent = refused = 0

    async def stream() -> None:
        nonlocal sent, refused
        i = 0
        while not stop.is_set():
            live = [
                m
                for m, c in zip(managers, clusters, strict=True)
                if not c.crashed and c.state.value != "stopped"
            ]
            try:
                await live[i % len(live)].cast(f"k{i % KEYS}", [i, time.perf_counter()])
                sent += 1
            except CloisterError:  # a sender going down refuses (not acknowledged): next one
                refused += 1
            i += 1
            await asyncio.sleep(0.0005)

    producer = asyncio.ensure_future(stream())
    await asyncio.sleep(0.5)
    record["moved_since"] = time.perf_counter()
    changed = time.perf_counter()
    if kind == "leave":
        await managers[victim].stop()
        await clusters[victim].stop()
    else:
        world(url.split("://")[1]).crash(f"n{victim}")
    await asyncio.sleep(2.5 if kind == "crash" else 1.5)
    stop.set()
    await producer
    while record["handled"] < sent:
        await asyncio.sleep(0.01)
        if time.perf_counter() - changed > 20:
            break
    await stop_nodes(clusters, managers)
    worst = max(record["moved_latency"], default=0.0)
    return {
        "kind": kind,
        "pause_s": worst,
        "failure_timeout_s": 0.6,
        "lost": sent - record["handled"],
        "refused_puts": refused,  # not acknowledged, so not lost: counted, not hidden
    }


async def idle_cost(url: str, server_pid: int, seconds: float, rate: float) -> dict[str, Any]:
    """CPU seconds of one node and its server: idle, then at ``rate`` casts/s."""
    import psutil

    from cloister import Cluster, DynamicManager, Replace

    handled = 0

    class Idle(DynamicManager):
        name = "idle"

        def children_specs(self) -> dict[str, Any]:
            return {f"k{i}": {"timeout": 0, "payload": 0} for i in range(KEYS)}

        def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
            nonlocal handled
            handled += 1
            return Replace(payload + 1)

    me, server = psutil.Process(), psutil.Process(server_pid)

    def cpu(process: psutil.Process) -> float:
        times = process.cpu_times()
        return float(times.user + times.system)

    async def measure(work: Any) -> dict[str, float]:
        node0, server0 = cpu(me), cpu(server)
        await work
        return {"node_cpu_s": cpu(me) - node0, "server_cpu_s": cpu(server) - server0}

    async def paced() -> None:
        begin = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = begin + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await manager.cast(f"k{i % KEYS}", [i, 0])

    async with Cluster("idle", "n0", backend=url) as cluster:
        manager = await Idle.start(cluster)
        await cluster.wait_ready(30)
        await manager.cast("k0", [0, 0])  # every partition claimed, the first record acked
        while handled < 1:
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)  # settled: what follows is the steady state
        idle = await measure(asyncio.sleep(seconds))
        busy = await measure(paced())
        await manager.stop()
    return {
        "seconds": seconds,
        "rate": rate,
        "partitions": Idle.partitions,
        "idle": idle,
        "at_rate": busy,
    }


async def takeover_victim(url: str) -> None:
    """The node killed by the takeover case: one node of cluster ``bench``, for good."""
    from cloister import Cluster

    cluster = Cluster("bench", "victim", backend=url, heartbeat=1.0)
    await cluster.start()
    record = new_record()
    record["stateful"] = True
    await make_manager(record).start(cluster)
    print("started", flush=True)
    await asyncio.Event().wait()


async def takeover(url: str) -> dict[str, Any]:
    """:func:`_takeover`, never leaving its victim process behind."""
    victims: list[asyncio.subprocess.Process] = []
    try:
        return await _takeover(url, victims)
    finally:
        for victim in victims:
            if victim.returncode is None:
                victim.kill()
                await victim.wait()


async def _takeover(url: str, victims: list[asyncio.subprocess.Process]) -> dict[str, Any]:
    """kill -9 of one of 3 nodes (default heartbeat and failure timeout), every key with a
    stored state: how long until the survivors are ready without it (from the kill, and
    from the adoption of that epoch) and until every moved key handled a cast again."""
    import signal

    from cloister import Cluster

    record = new_record()
    record["stateful"] = True
    manager_cls = make_manager(record)
    clusters = [Cluster("bench", f"n{i}", backend=url, heartbeat=1.0) for i in range(2)]
    for cluster in clusters:
        await cluster.start()
    managers = [await manager_cls.start(c) for c in clusters]
    await asyncio.gather(*(c.wait_ready(30) for c in clusters))
    victim = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--child", "takeover-victim", "--url", url,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    victims.append(victim)
    assert victim.stdout is not None
    await victim.stdout.readline()  # it runs (a member, not the sentry: it came last)

    def settled() -> bool:
        return all(
            c.state.value == "ready"
            and len(c.siblings()) == 3
            and len(m) == sum(1 for i in range(KEYS) if m.owner_of(f"k{i}") == c.node)
            for c, m in zip(clusters, managers, strict=True)
        )

    while not settled():
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)
    await asyncio.gather(*(managers[i % 2].cast(f"k{i}", [i, 0]) for i in range(KEYS)))
    while await managers[0].inbox_depth():  # all acked: every key's payload (1) is stored
        await asyncio.sleep(0.05)
    moved = [f"k{i}" for i in range(KEYS) if managers[0].owner_of(f"k{i}") == "victim"]
    epoch = clusters[0].epoch
    adopted: dict[str, float] = {}
    ready: dict[str, float] = {}

    async def follow(cluster: Any) -> None:
        while cluster.epoch == epoch or "victim" in cluster.siblings():
            await asyncio.sleep(0.001)
        adopted[cluster.node] = time.perf_counter()
        await cluster.wait_ready(30)
        ready[cluster.node] = time.perf_counter()

    watchers = [asyncio.ensure_future(follow(c)) for c in clusters]
    record["moved"], record["moved_latency"] = set(moved), []
    killed = time.perf_counter()
    record["moved_since"] = killed
    victim.send_signal(signal.SIGKILL)
    await victim.wait()
    # One cast to every moved key right after the kill (acked by the inbox at once).
    handled_before = record["handled"]
    await asyncio.gather(*(managers[0].cast(k, [0, killed]) for k in moved))
    await asyncio.gather(*watchers)
    deadline = time.perf_counter() + 30
    while record["handled"] - handled_before < len(moved) and time.perf_counter() < deadline:
        await asyncio.sleep(0.005)
    handled = record["handled"] - handled_before
    latencies = sorted(record["moved_latency"])

    def payloads() -> list[Any]:
        return [(managers[0].get(k) or managers[1].get(k)) for k in moved]

    def exactly() -> int:
        return sum(1 for info in payloads() if info is not None and info.payload == 2)

    # The counter moves when a handler runs (on a pool thread); its Replace is applied on
    # the loop a moment later: wait for that, up to the deadline (a lost state stays 1).
    while exactly() < len(moved) and time.perf_counter() < deadline:
        await asyncio.sleep(0.005)
    exact = exactly()
    found = sorted({repr(None if info is None else info.payload) for info in payloads()})
    for manager, cluster in zip(managers, clusters, strict=True):
        await manager.stop()
        await cluster.stop()
    return {
        "moved_keys": len(moved),
        "lost": len(moved) - handled,
        "state_exact": exact,
        "payloads_seen": found,  # what the moved keys hold (2 when exact)
        "kill_to_adopted_s": max(adopted.values()) - killed,
        "epoch_to_ready_s": max(ready[n] - adopted[n] for n in ready),
        "kill_to_ready_s": max(ready.values()) - killed,
        "moved_handled_p50_s": latencies[len(latencies) // 2] if latencies else None,
        "moved_handled_max_s": latencies[-1] if latencies else None,
    }


def takeover_main(args: argparse.Namespace) -> None:
    """The takeover case alone, this tree (and ``--compare TREE``) in alternating rounds."""
    from cloister.testing import NatsServer

    here = str(Path(__file__).resolve().parent.parent / "src")
    trees = {"this tree": here} | ({"compared": args.compare} if args.compare else {})
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for number in range(args.rounds):
        order = list(trees) if number % 2 == 0 else list(reversed(trees))
        for name in order:
            with NatsServer() as server:
                runs[name].append(run_child("takeover", args, server.url, sources=trees[name]))
            print(f"round {number + 1}, {name}: {runs[name][-1]}", flush=True)
    figures = (
        "kill_to_adopted_s", "epoch_to_ready_s", "kill_to_ready_s", "moved_handled_p50_s",
        "moved_handled_max_s",
    )  # fmt: skip
    rows, summary = [], {}
    for name, results in runs.items():
        medians = {f: statistics.median(r[f] for r in results if r[f] is not None) for f in figures}
        medians["lost"] = sum(r["lost"] for r in results)
        medians["state_not_exact"] = sum(r["moved_keys"] - r["state_exact"] for r in results)
        summary[name] = {"sources": trees[name], **medians}
        rows.append(
            [
                name,
                *(f"{medians[f]:.2f}" for f in figures),
                medians["lost"],
                medians["state_not_exact"],
            ]
        )
    print_table(
        f"kill -9 of 1 of 3 nodes on NATS, {KEYS} keys with state, heartbeat 1 s, failure "
        f"timeout 3 s; seconds, median of {args.rounds}",
        ["sources", "kill->epoch", "epoch->ready", "kill->ready", "moved p50", "moved max",
         "lost", "state wrong"],
        rows,
    )  # fmt: skip
    print(f"wrote {write_json('inbox_takeover', {'summary': summary, 'runs': runs})}")


# -- the reference: plain nats-py -----------------------------------------------------------


async def nats_plain(url: str, n: int) -> dict[str, Any]:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="plain", subjects=["plain.>"], storage=StorageType.FILE))
    started = time.perf_counter()
    window = 256
    for start in range(0, n, window):
        await asyncio.gather(
            *(
                js.publish(f"plain.{i % 32}", b"x" * 16)
                for i in range(start, min(n, start + window))
            )
        )
    stored = time.perf_counter()
    sub = await js.pull_subscribe(
        "plain.>", durable="plain", config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT)
    )
    got = 0
    while got < n:
        msgs = await sub.fetch(256, timeout=5)
        for msg in msgs:
            await msg.ack()
        got += len(msgs)
    done = time.perf_counter()
    await nc.close()
    return {"messages": n, "put_per_s": n / (stored - started), "per_s": n / (done - started)}


# -- driver ----------------------------------------------------------------------------------


def run_child(
    case: str,
    args: argparse.Namespace,
    url: str | None = None,
    *,
    sources: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Run ``case`` in a fresh interpreter (importing ``cloister`` from ``sources`` when
    given: another tree, for a before/after comparison); its JSON result."""
    command = [sys.executable, __file__, "--child", case, "--messages", str(args.messages)]
    if url:
        command += ["--url", url]
    for key, value in extra.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    env = None
    if sources is not None:
        env = {**os.environ, "PYTHONPATH": sources}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, check=False, env=env
    )
    if result.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def child(args: argparse.Namespace) -> None:
    import logging

    logging.basicConfig(level=logging.ERROR)
    case = args.child
    if case == "nats-plain":
        out = asyncio.run(nats_plain(args.url, args.messages))
    elif case == "nats-inbox":
        out = asyncio.run(throughput(args.url, args.messages))
    elif case == "nats-inbox-stateful":
        out = asyncio.run(throughput(args.url, args.messages, stateful=True))
    elif case == "memory-inbox":
        out = asyncio.run(throughput("memory://bench-inbox", args.messages))
    elif case == "memory-inbox-stateful":
        out = asyncio.run(throughput("memory://bench-inbox", args.messages, stateful=True))
    elif case == "latency-memory":
        out = asyncio.run(latency("memory://bench-latency", args.rate, args.seconds))
    elif case == "latency-nats":
        out = asyncio.run(latency(args.url, args.rate, args.seconds))
    elif case == "takeover":
        out = asyncio.run(takeover(args.url))
    elif case == "takeover-victim":
        asyncio.run(takeover_victim(args.url))
        return
    elif case == "idle-nats":
        out = asyncio.run(idle_cost(args.url, args.server_pid, args.seconds, args.rate))
    elif case in ("pause-leave", "pause-crash"):
        out = asyncio.run(pause(case.split("-")[1]))
    else:
        raise SystemExit(f"unknown case {case}")
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child")
    parser.add_argument("--url")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds (median)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--idle", action="store_true", help="only the idle-cost case")
    parser.add_argument("--takeover", action="store_true", help="only the kill -9 takeover")
    parser.add_argument("--server-pid", type=int)
    parser.add_argument(
        "--compare",
        help="another tree's src: its stateful row (or with --idle its idle cost) side by side",
    )
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.idle:
        idle_main(args)
        return
    if args.takeover:
        takeover_main(args)
        return
    if args.compare:
        compare_main(args)
        return
    if args.quick:
        args.messages, args.rounds = 20_000, 1
    from cloister.testing import NatsServer

    def on_fresh_server(case: str) -> dict[str, Any]:
        with NatsServer() as server:
            return run_child(case, args, server.url)

    # Throughput: rounds of the reference and our cases side by side, medians reported.
    cases = ["nats-plain", "nats-inbox", "nats-inbox-stateful", "memory-inbox"]
    rounds: list[dict[str, Any]] = []
    for number in range(args.rounds):
        one = {
            case: run_child(case, args) if case.startswith("memory") else on_fresh_server(case)
            for case in cases
        }
        one["ratio"] = one["nats-inbox"]["per_s"] / one["nats-plain"]["per_s"]
        one["ratio_stateful"] = one["nats-inbox-stateful"]["per_s"] / one["nats-plain"]["per_s"]
        rounds.append(one)
        print(
            f"round {number + 1}: plain {one['nats-plain']['per_s']:,.0f}/s, inbox "
            f"{one['nats-inbox']['per_s']:,.0f}/s ({one['ratio']:.0%}), stateful "
            f"{one['nats-inbox-stateful']['per_s']:,.0f}/s ({one['ratio_stateful']:.0%}), "
            f"memory {one['memory-inbox']['per_s']:,.0f}/s",
            flush=True,
        )
    median = {case: statistics.median(r[case]["per_s"] for r in rounds) for case in cases}
    ratio = statistics.median(r["ratio"] for r in rounds)
    ratio_stateful = statistics.median(r["ratio_stateful"] for r in rounds)

    results: dict[str, Any] = {"rounds": rounds, "median_per_s": median}
    memory_rate = median["memory-inbox"] / 2
    nats_rate = median["nats-inbox"] / 2
    results["latency_memory"] = run_child("latency-memory", args, rate=memory_rate, seconds=3)
    with NatsServer() as server:
        results["latency_nats"] = run_child(
            "latency-nats", args, server.url, rate=nats_rate, seconds=3
        )
    results["pause_leave"] = run_child("pause-leave", args)
    results["pause_crash"] = run_child("pause-crash", args)

    rows = [
        [
            "throughput on NATS, 3 nodes, ordered per key",
            f"{median['nats-inbox']:,.0f} msg/s",
            f"{median['nats-plain']:,.0f} msg/s (plain pull+ack)",
            ">= 50% of plain",
            f"{ratio:.0%}",
            ratio >= 0.5,
        ],
        [
            "  the same, each message Replaces its payload",
            f"{median['nats-inbox-stateful']:,.0f} msg/s",
            "(state stored before the ack)",
            "-",
            f"{ratio_stateful:.0%}",
            "-",
        ],
        [
            "throughput on the memory backend",
            f"{median['memory-inbox']:,.0f} msg/s",
            "-",
            ">= 100,000 msg/s",
            "-",
            median["memory-inbox"] >= 100_000,
        ],
        [
            f"p99 put->handled at half max (NATS, {nats_rate:,.0f}/s)",
            f"{results['latency_nats']['p99_ms']:.1f} ms",
            "-",
            "<= 50 ms",
            "-",
            results["latency_nats"]["p99_ms"] <= 50,
        ],
        [
            f"p99 put->handled at half max (memory, {memory_rate:,.0f}/s)",
            f"{results['latency_memory']['p99_ms']:.1f} ms",
            "-",
            "<= 5 ms",
            "-",
            results["latency_memory"]["p99_ms"] <= 5,
        ],
        [
            "pause of moved keys, graceful leave",
            f"{results['pause_leave']['pause_s'] * 1000:.0f} ms",
            "-",
            "<= 1 s",
            "-",
            results["pause_leave"]["pause_s"] <= 1,
        ],
        [
            "pause of moved keys, kill -9 (failure timeout 0.6 s)",
            f"{results['pause_crash']['pause_s'] * 1000:.0f} ms",
            "-",
            "<= 1.6 s",
            "-",
            results["pause_crash"]["pause_s"] <= 1.6,
        ],
    ]
    print_table(
        f"durable inbox ({args.messages:,} messages; throughput: median of {args.rounds} rounds)",
        ["figure", "pycloister", "reference", "target", "ratio", "met"],
        rows,
    )
    path = write_json(
        "inbox",
        {
            "messages": args.messages,
            "results": results,
            "nats_ratio": ratio,
            "nats_ratio_stateful": ratio_stateful,
        },
    )
    print(f"wrote {path}")


def compare_main(args: argparse.Namespace) -> None:
    """The stateful NATS row against another tree, in alternating rounds on fresh servers:
    plain nats-py pull + ack, then each tree's 3 nodes (every message ``Replace``s)."""
    from cloister.testing import NatsServer

    here = str(Path(__file__).resolve().parent.parent / "src")
    trees = {"this tree": here, "compared": args.compare}
    rounds: list[dict[str, Any]] = []
    for number in range(args.rounds):
        one: dict[str, Any] = {}
        with NatsServer() as server:
            one["plain"] = run_child("nats-plain", args, server.url)
        order = list(trees) if number % 2 == 0 else list(reversed(trees))
        for name in order:
            with NatsServer() as server:
                one[name] = run_child("nats-inbox-stateful", args, server.url, sources=trees[name])
        rounds.append(one)
        print(
            f"round {number + 1}: plain {one['plain']['per_s']:,.0f}/s, "
            + ", ".join(f"{n} {one[n]['per_s']:,.0f}/s" for n in trees),
            flush=True,
        )
    plain = statistics.median(r["plain"]["per_s"] for r in rounds)
    rows, summary = [["plain nats-py pull + ack", f"{plain:,.0f} msg/s", "100%"]], {}
    for name in trees:
        rate = statistics.median(r[name]["per_s"] for r in rounds)
        ratio = statistics.median(r[name]["per_s"] / r["plain"]["per_s"] for r in rounds)
        summary[name] = {"sources": trees[name], "per_s": rate, "ratio_to_plain": ratio}
        rows.append(
            [f"{name}: 3 nodes, every message Replaces", f"{rate:,.0f} msg/s", f"{ratio:.0%}"]
        )
    print_table(
        f"stateful inbox on NATS ({args.messages:,} messages, median of {args.rounds} rounds)",
        ["case", "throughput", "of plain (per round)"],
        rows,
    )
    payload = {
        "messages": args.messages,
        "plain_per_s": plain,
        "summary": summary,
        "rounds": rounds,
    }
    print(f"wrote {write_json('inbox_compare', payload)}")


def idle_main(args: argparse.Namespace) -> None:
    """The idle-cost case alone: one node on its own server, idle then at 150 casts/s;
    with ``--compare TREE`` the same case on another tree's sources, in alternating rounds."""
    from cloister.testing import NatsServer

    seconds = 30.0 if args.seconds == 3.0 else args.seconds  # 3.0: the latency default
    here = str(Path(__file__).resolve().parent.parent / "src")
    trees = {"this tree": here} | ({"compared": args.compare} if args.compare else {})
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, sources in trees.items():
            with NatsServer() as server:
                assert server.pid is not None
                runs[name].append(
                    run_child(
                        "idle-nats",
                        args,
                        server.url,
                        sources=sources,
                        seconds=seconds,
                        rate=150,
                        server_pid=server.pid,
                    )
                )
    rows, summary = [], {}
    for name, results in runs.items():
        figures = {
            phase: statistics.median(
                r[phase]["node_cpu_s"] + r[phase]["server_cpu_s"] for r in results
            )
            for phase in ("idle", "at_rate")
        }
        per_k = figures["at_rate"] / (150 * seconds / 1000)
        summary[name] = {"sources": trees[name], **figures, "cpu_s_per_1k_at_rate": per_k}
        node_idle = statistics.median(r["idle"]["node_cpu_s"] for r in results)
        rows.append(
            [
                name,
                f"{node_idle:.2f}",
                f"{figures['idle']:.2f}",
                f"{figures['at_rate']:.2f}",
                f"{per_k:.2f}",
            ]
        )
    print_table(
        f"one node, 128 partitions: CPU seconds over {seconds:.0f} s, node + nats-server "
        f"(median of {args.rounds})",
        ["sources", "idle: node", "idle: total", "150 casts/s: total", "per 1k msgs at 150/s"],
        rows,
    )
    print(
        f"wrote {write_json('inbox_idle', {'seconds': seconds, 'summary': summary, 'runs': runs})}"
    )


if __name__ == "__main__":
    main()
