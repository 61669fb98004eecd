"""Write the README's benchmark table from ``bench/results/*.json`` (never by hand).

Each row below names a result file and reads its figures from it; a file or figure that
is missing shows as "not measured". The table lives between the markers
``<!-- bench-table:start -->`` and ``<!-- bench-table:end -->`` in README.md.

Run: ``python bench/readme_table.py`` to rewrite it, ``--check`` to fail (exit 1) when the
README's table is not the one the JSON files give (the test suite runs that).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
MISSING = "not measured"

Cell = Callable[[dict[str, Any]], str]


def k(value: float) -> str:
    """Thousands, as the README writes them: 7.4 k."""
    return f"{value / 1000:.1f} k"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def s2(seconds: float) -> str:
    return f"{seconds:.2f} s"


def scenario(data: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in data["scenarios"] if s["scenario"] == name)


def faults_moved(data: dict[str, Any]) -> str:
    names = ("sigstop-node", "sigstop-sentry", "kill-9-and-join", "network-partition")
    moved = " / ".join(f"{scenario(data, n)['moved_pause_median_s']:.2f}" for n in names)
    stall = max(scenario(data, n)["stall_elsewhere_s"] for n in names)
    return f"{moved} s; stall elsewhere ≤ {stall:.2f} s"


def periodic(run: dict[str, Any]) -> str:
    return f"{run['p50_ms']:,.0f} / {run['p99_ms']:,.0f} ms, {run['performs_per_s'] / 1000:.0f} k/s"


def machine_load(data: dict[str, Any]) -> str:
    """How busy the shared machine was while the rate case ran, when it was recorded: the
    rates depend on the CPU share other processes left (the pool's cost much less)."""
    load = data.get("rate_loadavg_1min")
    return (
        f" (load average {statistics.median(load):.1f} on {data['environment']['cpus']} CPUs)"
        if load
        else ""
    )


def pool_cost(data: dict[str, Any]) -> float:
    """What the thread pool costs trivial performs against ``executor="loop"``: the median
    of the rounds' side-by-side costs (older results: from the median rates)."""
    costs = data.get("rate_pool_cost_runs")
    if costs:
        return float(statistics.median(costs))
    rate = data["rate_median"]
    return float(1 - rate["ours"] / rate["ours-loop"])


def handoff_pauses(data: dict[str, Any]) -> str:
    return " / ".join(f"{phase['pause_p99']:.2f} s" for phase in data["phases"])


def handoff_targets(data: dict[str, Any]) -> str:
    targets = " / ".join(f"{phase['target_p99_s']:g} s" for phase in data["phases"])
    met = " / ".join("met" if phase["met"] else "NOT met" for phase in data["phases"])
    return f"targets {targets} (failure timeout {data['failure_timeout']:g} s): {met}"


def wire_rows(data: dict[str, Any], *names: str) -> list[dict[str, Any]]:
    by_name = {row["record"]: row for row in data["rows"]}
    return [by_name[name] for name in names]


def peers_row(system: str, kind: str, figure: str, spec: str) -> Cell:
    def cell(data: dict[str, Any]) -> str:
        value = data["summary"][system][kind][figure]
        return MISSING if value is None else format(value, spec)

    return cell


def peers_theirs(kind: str, figure: str, spec: str) -> Cell:
    def cell(data: dict[str, Any]) -> str:
        parts = []
        for system in ("ray-3", "rabbitmq-pg-3", "restate-3"):
            entry = data["summary"].get(system, {}).get(kind)
            if entry and entry.get(figure) is not None:
                parts.append(f"{system} {format(entry[figure], spec)}")
        return "; ".join(parts) or MISSING

    return cell


# (result file, figure, pycloister's cell, the compared-with cell)
ROWS: list[tuple[str, str, Cell, Cell]] = [
    (
        "ring",
        "lookups/s, 10 / 100 nodes",
        lambda d: (
            f"{d['ours']['lookups_per_s_10'] / 1e6:.1f} / "
            f"{d['ours']['lookups_per_s_100'] / 1e6:.1f} M/s"
        ),
        lambda d: (
            f"uhashring {d['theirs']['lookups_per_s_10'] / 1e6:.2f} / "
            f"{d['theirs']['lookups_per_s_100'] / 1e6:.2f} M/s"
        ),
    ),
    (
        "ring",
        "busiest node / mean, 10 nodes",
        lambda d: f"{d['ours']['max_over_mean_10']:.3f}",
        lambda d: f"uhashring {d['theirs']['max_over_mean_10']:.3f}",
    ),
    (
        "ring",
        "keys moved when an 11th node joins (ideal 9.09%)",
        lambda d: (
            f"{d['ours']['moved_on_join_pct']:.2f}%, "
            f"{d['ours']['moved_among_old_on_join']} between old nodes"
        ),
        lambda d: f"uhashring {d['theirs']['moved_on_join_pct']:.2f}%",
    ),
    (
        "cluster",
        "50 in-process nodes ready",
        lambda d: s2(d["assembly_median_seconds"]),
        lambda d: "target < 2 s",
    ),
    (
        "cluster",
        "`mine(key)`",
        lambda d: f"{d['mine_ns']:.0f} ns",
        lambda d: f"ring lookup + compare {d['ring_lookup_ns']:.0f} ns",
    ),
    (
        "nats_cluster",
        "kill -9 seen by all survivors (failure timeout 3 s)",
        lambda d: f"{d['figures']['crash']['median_s']:.1f} s",
        lambda d: f"target ≤ {d['figures']['crash']['target_s']:.0f} s",
    ),
    (
        "nats_cluster",
        "graceful leave seen by all",
        lambda d: f"{d['figures']['leave']['median_s']:.3f} s",
        lambda d: f"target ≤ {d['figures']['leave']['target_s']} s",
    ),
    (
        "nats_cluster",
        "20 node processes assemble",
        lambda d: f"{d['figures']['assemble']['median_s']:.1f} s",
        lambda d: f"target ≤ {d['figures']['assemble']['target_s']:.0f} s",
    ),
    (
        "manager",
        "start 1,000,000 idle workers",
        lambda d: (
            f"{d['start']['ours']['seconds']:.1f} s, "
            f"{d['start']['ours']['bytes_per_worker']:.0f} B/worker"
        ),
        lambda d: (
            f"task per worker: {d['start']['baseline']['seconds']:.1f} s, "
            f"{d['start']['baseline']['bytes_per_worker']:,.0f} B/worker"
        ),
    ),
    (
        "manager",
        "trivial sync performs/s, one process (thread pool, the default)",
        lambda d: f"{d['rate_median']['ours'] / 1000:.0f} k/s" + machine_load(d),
        lambda d: (
            f"task per worker: {d['rate_median']['baseline'] / 1000:.0f} k/s; "
            f'`executor="loop"`: {d["rate_median"]["ours-loop"] / 1000:.0f} k/s (the pool costs '
            f"{pool_cost(d):.0%}, target ≤ 20%)"
        ),
    ),
    (
        "manager",
        "timer lateness p99 at half the max rate",
        lambda d: f"{d['lateness']['ours']['p99_ms']:.1f} ms",
        lambda d: f"task per worker: {d['lateness']['baseline']['p99_ms']:,.0f} ms",
    ),
    (
        "manager_periodic",
        "1,000,000 periodic workers from `children_specs()`, 5 s period, 200k performs/s "
        "offered (thread pool): p50 / p99 lateness, achieved rate",
        lambda d: periodic(d["results"]["5s-thread"]["spread"]) + " (first due times spread)",
        lambda d: (
            periodic(d["results"]["5s-thread"]["lockstep"])
            + f" all due together; BEAM p50 {d['beam_p50_ms']} ms (target p99 ≤ 50 ms)"
        ),
    ),
    (
        "manager",
        "100,000 workers, one of 3 nodes leaves: moved workers live",
        lambda d: (
            f"{d['handoff']['live_after_epoch_s']:.2f} s after the epoch change, "
            f"{d['handoff']['ids_live_on_two_nodes_at_once']} on two nodes"
        ),
        lambda d: "target ≤ 1 s",
    ),
    (
        "faults",
        "3 `cloister run` nodes, R3 NATS, failure timeout 2 s: SIGSTOP a node / the sentry, "
        "kill -9 + join, network partition — moved keys resume (p50)",
        faults_moved,
        lambda d: f"target ≤ failure timeout + 1 s ({d['failure_timeout'] + 1:.0f} s)",
    ),
    (
        "faults",
        "a sync handler sleeping 4 s; a 0.5 s CPU-bound perform: stall of the other keys "
        "on its node",
        lambda d: (
            f"{scenario(d, 'blocking-handler')['stall_faulted_others_s']:.2f} s / "
            f"{scenario(d, 'cpu-bound-perform')['stall_faulted_others_s']:.2f} s"
        ),
        lambda d: "before the thread pool: 1.68 s / 0.55 s",
    ),
    (
        "faults",
        "kill -9 of the server leading the members and inbox streams: cluster-wide stall",
        lambda d: (
            f"{scenario(d, 'kill-stream-leader')['stall_elsewhere_s']:.2f} s, "
            f"{scenario(d, 'kill-stream-leader')['moved_keys']:.0f} keys moved"
        ),
        lambda d: "target ≤ election + 1 s (≈ 9 s)",
    ),
    (
        "fencing",
        "stateful inbox on NATS, fenced writes vs before",
        lambda d: f"{d['inbox']['nats-inbox-stateful']['fenced_per_s']:,} msg/s",
        lambda d: (
            f"unfenced {d['inbox']['nats-inbox-stateful']['before_per_s']:,} msg/s "
            f"(fencing costs {d['inbox']['nats-inbox-stateful']['cost']:.1%})"
        ),
    ),
    (
        "inbox",
        "throughput, NATS, 3 nodes, ordered per key",
        lambda d: f"{k(d['results']['median_per_s']['nats-inbox'])} msg/s ({d['nats_ratio']:.0%})",
        lambda d: (
            f"plain nats-py pull + ack: {k(d['results']['median_per_s']['nats-plain'])} msg/s"
        ),
    ),
    (
        "inbox",
        "the same, every message `Replace`s its payload",
        lambda d: (
            f"{k(d['results']['median_per_s']['nats-inbox-stateful'])} msg/s "
            f"({d['nats_ratio_stateful']:.0%})"
        ),
        lambda d: "target ≥ 90% of plain nats-py pull + ack",
    ),
    (
        "inbox",
        "throughput, memory backend",
        lambda d: f"{k(d['results']['median_per_s']['memory-inbox'])} msg/s",
        lambda d: "target ≥ 100 k msg/s",
    ),
    (
        "inbox",
        "p99 put → handled at half the max rate, NATS / memory",
        lambda d: (
            f"{d['results']['latency_nats']['p99_ms']:.1f} ms / "
            f"{d['results']['latency_memory']['p99_ms']:.1f} ms"
        ),
        lambda d: "targets 50 ms / 5 ms",
    ),
    (
        "inbox",
        "graceful leave / kill -9: pause of moved keys",
        lambda d: (
            f"{ms(d['results']['pause_leave']['pause_s'])} / "
            f"{ms(d['results']['pause_crash']['pause_s'])} (failure timeout "
            f"{d['results']['pause_crash']['failure_timeout_s']} s)"
        ),
        lambda d: "targets 1 s / failure timeout + 1 s",
    ),
    (
        "inbox_takeover",
        "kill -9 of 1 of 3 nodes (NATS, heartbeat 1 s, failure timeout 3 s): moved keys "
        "handled again (max), 0 lost",
        lambda d: (
            f"{d['summary']['this tree']['moved_handled_max_s']:.2f} s "
            f"(kill → epoch {d['summary']['this tree']['kill_to_adopted_s']:.2f} s, "
            f"epoch → ready {d['summary']['this tree']['epoch_to_ready_s']:.2f} s)"
        ),
        lambda d: (
            "target ≤ 1 s"
            + (
                f"; the tree compared in the same run: "
                f"{d['summary']['compared']['moved_handled_max_s']:.2f} s"
                if "compared" in d["summary"]
                else ""
            )
        ),
    ),
    (
        "inbox_idle",
        "an idle node, 128 partitions, 30 s: CPU-seconds (node + nats-server)",
        lambda d: f"{d['summary']['this tree']['idle']:.2f} s",
        lambda d: (
            f"before (a pull per partition per second): {d['summary']['compared']['idle']:.2f} s"
        ),
    ),
    (
        "handoff_under_load",
        "3 nodes on one nats-server under load, a 4th joins / one leaves / one is killed: p99 "
        "pause of moved keys",
        handoff_pauses,
        handoff_targets,
    ),
    (
        "handoff_under_load_r3",
        "the same on a 3-server R3 NATS cluster",
        handoff_pauses,
        handoff_targets,
    ),
    (
        "inbox_layouts",
        "1,000 keys: setup / consume / handoff of one node's share",
        lambda d: (
            "128 partitions: "
            + " / ".join(
                (
                    s2(d["summary"]["partitioned-128"]["setup_s"]),
                    f"{k(d['summary']['partitioned-128']['consume_per_s'])} msg/s",
                    s2(d["summary"]["partitioned-128"]["handoff_s"]),
                )
            )
        ),
        lambda d: "; ".join(
            f"{name}: {s2(d['summary'][name]['setup_s'])} / "
            f"{k(d['summary'][name]['consume_per_s'])} msg/s / "
            f"{s2(d['summary'][name]['handoff_s'])}"
            for name in ("consumer-per-key", "stream-per-key")
        ),
    ),
    (
        "seed_flow",
        "100,000 RabbitMQ messages, kill -9 / join / SIGTERM",
        lambda d: (
            f"{d['lost']} lost, {d['out_of_order']} out of order, "
            f"{d['overlaps']} on two nodes at once"
        ),
        lambda d: "—",
    ),
    (
        "client",
        "casts/s from one client process, each awaited",
        lambda d: f"{k(d['median_per_s']['cast'])}/s ({d['single_ratio']:.0%})",
        lambda d: (
            f"raw nats-py `js.publish` awaited: {k(d['median_per_s']['raw-awaited'])}/s "
            "(target ≥ 70%)"
        ),
    ),
    (
        "client",
        "`cast_many`, batches of 1,000",
        lambda d: (
            f"{k(d['median_per_s']['cast-many'])}/s ({d['cast_many_ratio']:.0%}; "
            f"{d['median_per_s']['cast-many'] / d['median_per_s']['raw-pipelined-msgid']:.0%}"
            " of raw with a `Nats-Msg-Id` each, "
            f"{d['median_per_s']['cast-many'] / d['median_per_s']['raw-core-pipelined']:.0%}"
            " of raw core `nc.publish` batches without one)"
        ),
        lambda d: (
            f"raw `publish_async` batches: {k(d['median_per_s']['raw-pipelined'])}/s (target ≥ 70%)"
        ),
    ),
    (
        "client",
        "p99 cast latency at half the max rate",
        lambda d: f"{d['latency']['p99_ms']:.1f} ms (p50 {d['latency']['p50_ms']:.1f} ms)",
        lambda d: (
            f"raw `js.publish` on the same schedule: {d['raw_latency']['p99_ms']:.1f} ms "
            "(target ≤ 5 ms)"
        ),
    ),
    (
        "wire",
        "decode a record through the schema layer (member / stored worker / inbox record)",
        lambda d: " / ".join(
            f"{row['schema_decode_us']:.2f} µs"
            for row in wire_rows(d, "member", "stored worker", "inbox record")
        ),
        lambda d: (
            "msgpack + hand checks: "
            + " / ".join(
                f"{row['old_decode_us']:.2f} µs"
                for row in wire_rows(d, "member", "stored worker", "inbox record")
            )
        ),
    ),
    (
        "wire",
        "sealing with a cluster secret (HMAC-SHA256), per record, decode + encode",
        lambda d: (
            f"+{statistics.median(row['seal_cost_us'] for row in d['rows']):.1f} µs, +41 bytes"
        ),
        lambda d: "unsealed",
    ),
    (
        "metrics_overhead",
        "trivial performs/s with callback timing (the histograms)",
        lambda d: f"{d['medians']['timed'] / 1000:.0f} k/s",
        lambda d: f"untimed {d['medians']['untimed'] / 1000:.0f} k/s (costs {d['cost']:.1%})",
    ),
    (
        "peers",
        "msg/s, state stored, 3 nodes (quiet)",
        peers_row("pycloister-3", "quiet", "msgs_per_s", ",.0f"),
        peers_theirs("quiet", "msgs_per_s", ",.0f"),
    ),
    (
        "peers",
        "msg/s, 1 node (quiet)",
        peers_row("pycloister-1", "quiet", "msgs_per_s", ",.0f"),
        lambda d: "target: 3 nodes ≥ 1.3 x 1 node",
    ),
    (
        "peers",
        "CPU-s per 1,000 messages, all processes, 3 nodes",
        peers_row("pycloister-3", "quiet", "cpu_s_per_1k", ".2f"),
        peers_theirs("quiet", "cpu_s_per_1k", ".2f"),
    ),
    (
        "peers",
        "msg/s with two CPU burners beside it, 3 nodes",
        peers_row("pycloister-3", "contended", "msgs_per_s", ",.0f"),
        peers_theirs("contended", "msgs_per_s", ",.0f"),
    ),
    (
        "peers",
        "p99 send → handled at 150 msg/s, 3 nodes (ms)",
        peers_row("pycloister-3", "paced", "p99_ms", ".1f"),
        peers_theirs("paced", "p99_ms", ".1f"),
    ),
]


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def table() -> str:
    """The table the JSON files give, as Markdown."""
    cache: dict[str, dict[str, Any] | None] = {}
    lines = [
        "| benchmark | figure | pycloister | compared with |",
        "|---|---|---|---|",
    ]
    for name, figure, ours, theirs in ROWS:
        if name not in cache:
            cache[name] = load(name)
        data = cache[name]
        cells = []
        for cell in (ours, theirs):
            try:
                cells.append(MISSING if data is None else cell(data))
            except (KeyError, TypeError, StopIteration, ZeroDivisionError):
                cells.append(MISSING)
        lines.append(f"| `{name}` | {figure} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def rewritten(readme: str) -> str:
    """``readme`` with the table between the markers replaced by :func:`table`."""
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md has no {START} ... {END} markers around the table")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is stale")
    args = parser.parse_args()
    current = README.read_text()
    wanted = rewritten(current)
    if args.check:
        if wanted != current:
            print("README.md's benchmark table is stale: run python bench/readme_table.py")
            return 1
        return 0
    README.write_text(wanted)
    print(f"wrote the benchmark table of {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
