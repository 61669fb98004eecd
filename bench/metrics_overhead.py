"""Benchmark: what timing every callback costs, side by side in one run.

Since issue 15 the engine times each callback into a histogram (``manager.timings``: a
clock read, a bisect and three increments per callback) for
``cloister_manager_callback_seconds``. This runs the same saturated manager twice per
round, in fresh child processes, alternating: ``timed`` (as shipped) and ``untimed``
(the engine's histograms swapped for ones whose ``observe`` does nothing). 20,000
workers due every millisecond (more than either can do), trivial performs on the event
loop (the hottest path: no thread pool in between); performs per second over a window
after a warm-up; the median of the rounds.

Run: ``python bench/metrics_overhead.py`` (``--rounds``, ``--workers``, ``--window``).
Prints a table and writes bench/results/metrics_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from _common import print_table, write_json
from cloister import DynamicManager
from cloister._histogram import Histogram

CASES = ("timed", "untimed")


class _Untimed(Histogram):
    __slots__ = ()

    def observe(self, value: float) -> None:
        """Count nothing (the baseline)."""


async def _rate(case: str, workers: int, warmup: float, window: float) -> dict[str, Any]:
    performed = [0]

    class Busy(DynamicManager):
        executor = "loop"

        def children_specs(self) -> dict[Any, Any]:
            spec = {"timeout": 0.001}
            return {f"w{i}": spec for i in range(workers)}

        def perform(self, id: Any, payload: Any) -> Any:
            performed[0] += 1

    manager = await Busy.start()
    if case == "untimed":  # the engine's own references to the histograms
        engine = manager._engine
        engine._timed_perform = engine._timed_cast = engine._timed_call = _Untimed()
    await asyncio.sleep(warmup)
    first, began = performed[0], time.perf_counter()
    await asyncio.sleep(window)
    took = time.perf_counter() - began
    count = performed[0] - first
    await manager.stop()
    return {"performs_per_s": count / took}


def _child(case: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", case, "--workers", str(args.workers)]
    command += ["--window", str(args.window), "--warmup", str(args.warmup)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--window", type=float, default=2.0)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(_rate(args.child, args.workers, args.warmup, args.window))))
        return
    rates: dict[str, list[float]] = {case: [] for case in CASES}
    for _ in range(args.rounds):
        for case in CASES:
            rates[case].append(_child(case, args)["performs_per_s"])
    medians = {case: statistics.median(values) for case, values in rates.items()}
    cost = 1 - medians["timed"] / medians["untimed"]
    print_table(
        f"performs/s, {args.workers:,} workers on the loop, median of {args.rounds} rounds",
        ["case", "median", "rounds"],
        [
            [case, f"{medians[case]:,.0f}", ", ".join(f"{v:,.0f}" for v in rates[case])]
            for case in CASES
        ],
    )
    print(f"cost of timing every callback: {cost:+.1%}")
    path = write_json(
        "metrics_overhead",
        {"workers": args.workers, "rates": rates, "medians": medians, "cost": cost},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
