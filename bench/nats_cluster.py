"""Real node processes on a real nats-server: crash detection, graceful leave, assembly.

Run: ``python bench/nats_cluster.py`` (or ``cloister bench nats_cluster``). Targets (issue 4),
with the Cluster's default heartbeat and failure timeout:

- crash detection (kill -9 of one node until every survivor has adopted the epoch
  without it) <= failure timeout + 1 s, the default failure timeout being <= 5 s;
- a graceful leave (SIGTERM) seen by every survivor <= 0.5 s;
- 20 node processes started at once assemble (every one ``ready`` on one epoch listing
  all 20) <= 10 s, counted from the spawn of the first process.

Each figure is the median of ``--runs`` runs. The node processes are ``cloister node``,
driven and read exactly as the acceptance tests in ``tests/nats`` do (their event lines
carry ``time.monotonic()``, one clock for every process of this machine).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import print_table, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' node harness

from tests.nats.support import Nodes

from cloister import Cluster
from cloister.testing import NatsServer, ProcessGroup

TRIO = ("a", "b", "c")


def defaults() -> tuple[float, float]:
    """The Cluster's default heartbeat and failure timeout (what users get)."""
    probe = Cluster("bench", "probe")
    return probe.heartbeat, probe.failure_timeout


def crash_and_leave(server: NatsServer, group: ProcessGroup, runs: int) -> dict[str, list[float]]:
    """Kill -9 (then restart) and SIGTERM (then restart) node c of three, ``runs`` times."""
    nodes = Nodes(group, server.url, "trio", consensus=1, heartbeat=None, failure_timeout=None)
    nodes.start(*TRIO)
    nodes.wait_ready(TRIO)
    times: dict[str, list[float]] = {"crash": [], "leave": []}
    for run in range(runs):
        for what, stop in (("crash", nodes.kill), ("leave", nodes.terminate)):
            at = stop("c")
            seen = nodes.noticed(("a", "b"), ("a", "b"), since=at, timeout=30)
            times[what].append(max(seen.values()) - at)
            print(f"run {run + 1}: {what} seen by all after {times[what][-1]:.3f}s", flush=True)
            nodes.restart("c")
            nodes.wait_ready(TRIO, timeout=30)
    return times


def assemble(server: NatsServer, group: ProcessGroup, count: int, run: int) -> float:
    """Spawn ``count`` nodes at once; seconds until all are ready on one epoch of all."""
    names = [f"n{i:02d}" for i in range(count)]
    nodes = Nodes(
        group, server.url, f"crowd{run}", consensus=count, heartbeat=None, failure_timeout=None
    )
    began = time.monotonic()
    nodes.start(*names)
    agreed = nodes.wait_ready(names, timeout=60)
    ready = [nodes.last(n, "state") for n in names]
    took = max(event.t for event in ready if event is not None) - began
    print(f"run {run + 1}: {count} nodes ready on epoch {agreed.epoch} after {took:.3f}s")
    group.terminate_all()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--nodes", type=int, default=20, help="processes for the assembly run")
    args = parser.parse_args()
    heartbeat, failure_timeout = defaults()
    with (
        tempfile.TemporaryDirectory(prefix="cloister-bench-") as tmp,
        NatsServer(base_dir=Path(tmp) / "nats") as server,
        ProcessGroup() as group,
    ):
        times = crash_and_leave(server, group, args.runs)
        group.terminate_all()
        times["assemble"] = [assemble(server, group, args.nodes, r) for r in range(args.runs)]
    targets = {
        "crash": failure_timeout + 1.0,
        "leave": 0.5,
        "assemble": 10.0,
    }
    labels = {
        "crash": f"kill -9 seen by every survivor (failure timeout {failure_timeout:g}s)",
        "leave": "SIGTERM seen by every survivor",
        "assemble": f"{args.nodes} node processes assemble",
    }
    rows, figures = [], {}
    for key, label in labels.items():
        median = statistics.median(times[key])
        met = median <= targets[key]
        rows.append(
            [label, f"{median:.3f}", f"{min(times[key]):.3f}", f"{max(times[key]):.3f}",
             f"<= {targets[key]:g}", "yes" if met else "NO"]
        )  # fmt: skip
        figures[key] = {
            "median_s": round(median, 4),
            "runs_s": [round(t, 4) for t in times[key]],
            "target_s": targets[key],
            "met": met,
        }
    print_table(
        f"NATS cluster (heartbeat {heartbeat:g}s, failure timeout {failure_timeout:g}s, "
        f"median of {args.runs})",
        ["what", "median s", "min s", "max s", "target s", "met"],
        rows,
    )
    path = write_json(
        "nats_cluster",
        {
            "heartbeat_s": heartbeat,
            "failure_timeout_s": failure_timeout,
            "runs": args.runs,
            "nodes": args.nodes,
            "figures": figures,
        },
    )
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
