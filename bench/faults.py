"""Issue 12's fault benchmark: how long work pauses under each fault, side by side.

Every scenario of ``tests/faults`` (the same harness, :mod:`tests.faults._harness`):
3 ``cloister run`` nodes on a 3-server R3 NATS cluster, a producer casting to 30 keys
(100 casts/s), heartbeat 0.5 s, failure timeout 2 s. For each fault, in one run:

- **pause of moved keys**: from the fault to the first handling of a moved key on its
  new owner (median and max over the moved keys);
- **stall elsewhere**: the longest gap in handlings across all keys not on the faulted
  node (every key for a server loss) while the producer casts;
- **stall of the faulted node's other keys** (a blocked handler should stall its own
  key only);
- the checker's verdict (``tests/faults/checker.py``): figures that must be 0 and are not.

Targets (issue 12): a paused node's keys resume <= failure timeout + 1 s; a server loss
on R3 pauses <= election time + 1 s (4.5-8 s measured, DESIGN.md); a blocked handler
stalls only its own key.

Run: ``python bench/faults.py`` (or ``cloister bench faults``); ``--runs 3`` for medians
over several runs, ``--only sigstop-node,kill-9-and-join`` for some scenarios. Writes
``bench/results/faults.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # the harness lives in tests/faults

from tests.faults import _netns  # noqa: E402
from tests.faults._harness import FAILURE_TIMEOUT, HEARTBEAT, SCENARIOS, Outcome, play  # noqa: E402

from _common import print_table, write_json  # noqa: E402

TARGETS = {
    "sigstop-node": f"moved <= {FAILURE_TIMEOUT + 1:.0f} s",
    "sigstop-sentry": f"moved <= {FAILURE_TIMEOUT + 1:.0f} s",
    "blocking-handler": "others ~0 (own key only)",
    "cpu-bound-perform": "others ~0 (own worker only)",
    "kill-stream-leader": "stall <= election + 1 s (~9 s)",
    "kill-9-and-join": f"moved <= {FAILURE_TIMEOUT + 1:.0f} s",
    "network-partition": f"moved <= {FAILURE_TIMEOUT + 1:.0f} s",
}


def median(values: list[float | None]) -> float | None:
    """The median of the measured values (None when nothing was measured)."""
    found = [v for v in values if v is not None]
    return statistics.median(found) if found else None


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def summarize(name: str, outcomes: list[Outcome]) -> dict[str, Any]:
    """One scenario's figures: medians over its runs, and every run's raw figures."""
    return {
        "scenario": name,
        "target": TARGETS[name],
        "moved_keys": median([float(o.pauses.moved_keys) for o in outcomes]),
        "moved_pause_median_s": median([o.pauses.moved_pause_median for o in outcomes]),
        "moved_pause_max_s": median([o.pauses.moved_pause_max for o in outcomes]),
        "stall_elsewhere_s": median([o.pauses.stall_elsewhere for o in outcomes]),
        "stall_faulted_others_s": median([o.pauses.stall_faulted_others for o in outcomes]),
        "checker_failures": [o.report.failures() for o in outcomes],
        "runs": [
            {"report": o.report.as_dict(), "pauses": _pauses(o), "notes": o.notes} for o in outcomes
        ],
    }


def _pauses(outcome: Outcome) -> dict[str, Any]:
    p = outcome.pauses
    return {
        "moved_keys": p.moved_keys,
        "moved_pause_median": p.moved_pause_median,
        "moved_pause_max": p.moved_pause_max,
        "stall_elsewhere": p.stall_elsewhere,
        "stall_faulted_others": p.stall_faulted_others,
    }


def verdict(failures: list[dict[str, int]]) -> str:
    """The checker's findings over the runs: ``ok``, or the figures that were not 0."""
    merged: dict[str, int] = {}
    for found in failures:
        for name, count in found.items():
            merged[name] = merged.get(name, 0) + count
    return "ok" if not merged else " ".join(f"{k}={v}" for k, v in merged.items())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=1, help="runs per scenario (medians)")
    parser.add_argument("--only", help="comma-separated scenario names")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(SCENARIOS)
    if "network-partition" in names and (why := _netns.unavailable_reason()) is not None:
        print(f"skipping network-partition: {why}")
        names.remove("network-partition")
    began = time.monotonic()
    rows, results = [], []
    for name in names:
        outcomes = []
        for n in range(args.runs):
            print(f"  {time.monotonic() - began:7.1f}s  {name} run {n + 1}/{args.runs}", flush=True)
            outcomes.append(play(name, Path(tempfile.mkdtemp(prefix=f"faults-{name}-"))))
        result = summarize(name, outcomes)
        results.append(result)
        rows.append(
            [
                name,
                seconds(result["moved_pause_median_s"]),
                seconds(result["moved_pause_max_s"]),
                seconds(result["stall_elsewhere_s"]),
                seconds(result["stall_faulted_others_s"]),
                TARGETS[name],
                verdict(result["checker_failures"]),
            ]
        )
    print_table(
        f"faults: 3 nodes, 3-server R3 NATS, heartbeat {HEARTBEAT} s, failure timeout "
        f"{FAILURE_TIMEOUT} s; seconds, medians of {args.runs} run(s)",
        ["fault", "moved p50", "moved max", "stall elsewhere", "faulted node's others",
         "target", "checker"],
        rows,
    )  # fmt: skip
    path = write_json(
        "faults",
        {
            "heartbeat": HEARTBEAT,
            "failure_timeout": FAILURE_TIMEOUT,
            "runs_per_scenario": args.runs,
            "seconds": round(time.monotonic() - began, 1),
            "scenarios": results,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
