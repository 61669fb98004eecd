"""Issue 15's handoff benchmark: how long moved keys pause when membership changes under load.

The harness of ``tests/faults`` (:class:`tests.faults._harness.FaultRun`): ``cloister run
tests.faults.app:FaultApp`` nodes on NATS (one ``nats-server`` by default, an R3 cluster
of three with ``--servers 3``), heartbeat 0.5 s, failure timeout 2 s, a producer casting
to ``--keys`` keys, and one journal line per handling on each node. One round:

1. **max rate**: 3 nodes, a producer casting as fast as the medium acknowledges (one put
   in flight per key) for ``--burst`` seconds; the max rate is what the 3 nodes handled
   per second (with the backlog left at the end: when it is ~0 the producer, not the
   nodes, was the limit, and the rate is a lower bound).
2. a producer at ``--load`` (50 %) of that rate, then three membership changes, each
   followed by ``--after`` seconds of casting: a 4th node **joins**, one node **leaves**
   (SIGTERM, a graceful handoff), one node is **killed** (SIGKILL; the others notice it
   after the failure timeout). The phase producer (``tests.faults.producer``: one put
   at a time per key, each journaled) may not reach the asked rate on a small machine:
   the rate it achieved is printed beside it.

Per phase, from the journals: the **moved keys** (first handled on another node than
before the change) and their **pause**, from the later of the change and the key's last
handling on its old owner to its first handling on the new owner (p50 / p99 / max over
the moved keys); the **worst delay** of a moved key's message (acknowledged to the
producer -> handling started). From the nodes' event lines and ``/metrics``: the
**rehash** (the first node leaving ``ready`` to the last one back in ``ready`` on the
epoch that settles the phase), when that epoch was adopted (detection), and the
``cloister_manager_handoff_seconds{phase=release|settle}`` observed during the phase
(the longest per node): where a slow rehash spends its time.

Targets (issue 15): p99 pause of moved keys <= 1 s for join and leave, <= failure
timeout + 1 s (3 s) for a kill.

Run: ``python bench/handoff_under_load.py`` (or ``cloister bench handoff-under-load``;
about 30-40 s per round); ``--rounds 3`` for medians, ``--servers 3`` for an R3 NATS
cluster. Writes ``bench/results/handoff_under_load.json`` (``handoff_under_load_r3.json``
on R3). Exits 1 when a target is not met.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # the harness lives in tests/faults

from tests.faults import checker  # noqa: E402
from tests.faults._harness import (  # noqa: E402
    FAILURE_TIMEOUT,
    HEARTBEAT,
    MANAGER,
    NODES,
    FaultRun,
)
from tests.faults.app import key_name  # noqa: E402

from _common import print_table, write_json  # noqa: E402
from cloister import Client  # noqa: E402
from cloister.testing import NodeEvent, NodeProcess, wait_for  # noqa: E402

JOINER = "d"
BURST_CASTERS = 4  # cast_many calls in flight at once during the max-rate burst
BURST_BATCH = 100
TARGETS = {"join": 1.0, "leave": 1.0, "kill": FAILURE_TIMEOUT + 1.0}
_HANDOFF = re.compile(
    r'^cloister_manager_handoff_seconds_(sum|count)\{[^}]*phase="(\w+)"[^}]*\}\s+(\S+)$'
)


class MeteredRun(FaultRun):
    """A :class:`FaultRun` whose nodes serve ``/metrics``, each on its own free port."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metrics_ports: dict[str, int] = {}

    def spawn(self, node: str) -> NodeProcess:
        port = self.metrics_ports.setdefault(node, free_port())
        shared = self.env
        self.env = {**shared, "CLOISTER_METRICS_PORT": str(port)}
        try:
            return super().spawn(node)
        finally:
            self.env = shared

    def handoff_totals(self, nodes: Iterable[str]) -> dict[str, dict[str, float]]:
        """node -> ``{release_sum, release_count, settle_sum, settle_count}`` now."""
        return {n: scrape_handoff(self.metrics_ports[n]) for n in nodes}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def scrape_handoff(port: int) -> dict[str, float]:
    """The handoff histogram's sums and counts per phase on one node's ``/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    totals: dict[str, float] = {}
    for line in body.splitlines():
        found = _HANDOFF.match(line)
        if found is not None:
            kind, phase, value = found.groups()
            totals[f"{phase}_{kind}"] = totals.get(f"{phase}_{kind}", 0.0) + float(value)
    return totals


# -- the figures of one phase -----------------------------------------------------------------


@dataclass
class Phase:
    """What one membership change did to the moved keys and how the cluster rehashed."""

    name: str
    node: str
    at: float
    until: float = 0.0
    members: list[str] = field(default_factory=list)
    moved_keys: int = 0
    stuck_keys: int = 0  # cast to in the phase, never handled in it
    pause_p50: float | None = None
    pause_p99: float | None = None
    pause_max: float | None = None
    worst_delay: float | None = None
    epoch: int | None = None
    epochs: int = 0  # epochs adopted during the phase
    detect: float | None = None  # the change -> the settling epoch first adopted
    rehash: float | None = None  # first node out of ready -> last node back in ready
    ready: float | None = None  # the change -> every member ready on that epoch
    release_max: float | None = None  # the longest release (hand over) on a node
    settle_max: float | None = None  # the longest settle (claim, load, start, consume)
    handoff: dict[str, dict[str, float]] = field(default_factory=dict)
    trace: dict[str, dict[str, float]] = field(default_factory=dict)
    """node -> seconds after the change: epoch adopted, out of ready, back in ready, its
    manager up on the new epoch; and the release / settle it observed (durations)."""

    @property
    def target(self) -> float:
        return TARGETS[self.name]

    @property
    def met(self) -> bool | None:
        return None if self.pause_p99 is None else self.pause_p99 <= self.target


def quantile(values: Sequence[float], q: float) -> float:
    """The nearest-rank quantile ``q`` of sorted ``values``."""
    rank = max(0, min(len(values) - 1, round(q * len(values) + 0.5) - 1))
    return values[rank]


def measure_pauses(
    phase: Phase, casts: Sequence[checker.Handling], acked: dict[tuple[str, int], float]
) -> None:
    """Fill the moved keys' pauses and worst message delay of ``phase`` from the journals."""
    pauses: list[float] = []
    delays: list[float] = []
    sent_at: dict[str, list[float]] = {}
    for (key, _), t in acked.items():
        sent_at.setdefault(key, []).append(t)
    for key, handlings in checker.by_key(casts).items():
        before = [h for h in handlings if h.start < phase.at]
        if not before:
            continue
        owner = before[-1].node
        window = [h for h in handlings if phase.at <= h.start < phase.until]
        if not window and any(phase.at <= t < phase.until for t in sent_at.get(key, ())):
            phase.stuck_keys += 1
        first_new = next((h for h in window if h.node != owner), None)
        if first_new is None:
            continue  # stayed (or was not handled again in the phase)
        last_old = max(h.end for h in handlings if h.node == owner and h.start < first_new.start)
        pauses.append(first_new.start - max(phase.at, last_old))
        for h in window:
            sent = acked.get((key, h.seq))
            if sent is not None:
                delays.append(max(0.0, h.start - sent))
    pauses.sort()
    phase.moved_keys = len(pauses)
    if pauses:
        phase.pause_p50 = quantile(pauses, 0.5)
        phase.pause_p99 = quantile(pauses, 0.99)
        phase.pause_max = pauses[-1]
    phase.worst_delay = max(delays) if delays else None


def measure_rehash(phase: Phase, events: dict[str, list[NodeEvent]]) -> None:
    """Fill the rehash figures of ``phase`` from every node's event lines."""
    inside = {n: [e for e in found if phase.at <= e.t < phase.until] for n, found in events.items()}
    settling = [
        e
        for n in phase.members
        for e in inside.get(n, [])
        if e.kind == "epoch" and sorted(e.members) == phase.members
    ]
    phase.epochs = len({e.epoch for found in inside.values() for e in found if e.kind == "epoch"})
    if not settling:
        return
    epoch = phase.epoch = settling[0].epoch
    phase.detect = min(e.t for e in settling) - phase.at
    states = [e for n in phase.members for e in inside.get(n, []) if e.kind == "state"]
    left = [e.t for e in states if e.change[0] == "ready" and e.change[1] != "ready"]
    back = [e.t for e in states if e.change[1] == "ready" and e.epoch == epoch]
    if back:
        phase.ready = max(back) - phase.at
        started = min(left) if left else min(e.t for e in settling)
        phase.rehash = max(back) - started
    marks: dict[str, Callable[[NodeEvent], bool]] = {
        "adopted": lambda e: e.kind == "epoch" and e.epoch == epoch,
        "rehashing": lambda e: e.kind == "state" and e.change[1] == "rehashing",
        "ready": lambda e: e.kind == "state" and e.change[1] == "ready" and e.epoch == epoch,
        "manager_up": lambda e: e.kind == "manager" and e.fields.get("epoch") == str(epoch),
    }
    # The node that leaves: its own steps (a graceful leave hands over before the epoch).
    marks["leaving"] = lambda e: e.kind == "node" and "leaving" in e.words
    marks["manager_stopped"] = lambda e: e.kind == "manager" and "stopped" in e.words
    marks["stopped"] = lambda e: e.kind == "node" and "stopped" in e.words
    for node in [*phase.members, *([phase.node] if phase.node not in phase.members else [])]:
        seen = phase.trace.setdefault(node, {})
        for mark, matches in marks.items():
            found = next((e.t for e in inside.get(node, []) if matches(e)), None)
            if found is not None:
                seen[mark] = round(found - phase.at, 4)


def measure_handoff(
    phase: Phase, before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> None:
    """The handoff histogram's observations during ``phase``, per node (mean of each)."""
    for node, now in after.items():
        then = before.get(node, {})
        figures: dict[str, float] = {}
        for step in ("release", "settle"):
            count = now.get(f"{step}_count", 0.0) - then.get(f"{step}_count", 0.0)
            total = now.get(f"{step}_sum", 0.0) - then.get(f"{step}_sum", 0.0)
            figures[f"{step}_count"] = count
            figures[f"{step}_seconds"] = round(total, 4)
        phase.handoff[node] = figures
    for node, figures in phase.handoff.items():
        seen = phase.trace.setdefault(node, {})
        seen["release"], seen["settle"] = figures["release_seconds"], figures["settle_seconds"]
    releases = [f["release_seconds"] for f in phase.handoff.values() if f["release_count"]]
    settles = [f["settle_seconds"] for f in phase.handoff.values() if f["settle_count"]]
    phase.release_max = max(releases) if releases else None
    phase.settle_max = max(settles) if settles else None


# -- one round ----------------------------------------------------------------------------------


@dataclass
class Round:
    max_rate: float
    burst_backlog: int
    load_rate: float
    cast_rate: float  # what the phase producer achieved (acknowledged casts per second)
    interval: float
    phases: list[Phase]
    seconds: float
    restarts: int


def handled_between(run: FaultRun, start: float, end: float) -> int:
    return sum(1 for h in run.handlings() if h.kind == "cast" and start <= h.start < end)


def measure_max_rate(run: FaultRun, seconds: float) -> tuple[float, int]:
    """Cast flat out for ``seconds``; return (handlings per second, backlog at the end).

    The burst casts message ``0`` with generated message ids: the phase producer's
    ``<key>:<seq>`` ids must not meet the burst's in the medium's dedup window.
    """
    began, ended, sent = asyncio.run(_burst(run, seconds))
    handled = handled_between(run, 0.0, ended)
    # Let the backlog drain before the measured phases start.
    wait_for(
        lambda: handled_between(run, began, float("inf")) >= sent or None,
        120,
        f"the burst's {sent} casts handled",
        interval=0.5,
    )
    return handled_between(run, began, ended) / (ended - began), max(0, sent - handled)


async def _burst(run: FaultRun, seconds: float) -> tuple[float, float, int]:
    """``BURST_CASTERS`` pipelined casters of ``BURST_BATCH``; (began, ended, casts)."""
    keys = [key_name(i) for i in range(run.keys)]
    sent = 0
    async with Client(run.name, backend=run.nats.url) as client:
        await client.cast_many(MANAGER, [(k, 0) for k in keys])  # the inbox is open
        began = time.monotonic()
        until = began + seconds

        async def caster(offset: int) -> None:
            nonlocal sent
            n = offset
            while time.monotonic() < until:
                batch = [(keys[(n + i) % len(keys)], 0) for i in range(BURST_BATCH)]
                n += BURST_BATCH
                await client.cast_many(MANAGER, batch)
                sent += len(batch)

        await asyncio.gather(*(caster(c * 7) for c in range(BURST_CASTERS)))
        ended = time.monotonic()
    return began, ended, sent


def resumed(run: FaultRun, since: float) -> bool | None:
    """Every key has a handling that started after ``since`` (else None)."""
    seen = {h.key for h in run.handlings() if h.kind == "cast" and h.start >= since}
    return True if len(seen) >= run.keys else None


def acked_times(run: FaultRun) -> dict[tuple[str, int], float]:
    """(key, seq) -> when the phase producer's cast was acknowledged."""
    found: dict[tuple[str, int], float] = {}
    path = run.workdir / "acked.log"
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 3:
            found[(parts[0], int(parts[1]))] = float(parts[2])
    return found


def pick(run: FaultRun, members: list[str], avoid: Iterable[str] = ()) -> str:
    """A member that is not the sentry (nor in ``avoid``): its change moves only keys."""
    # The sentry named by a live member's last epoch (run.sentry() reads node a's, and
    # a may be gone by now).
    epochs = [e for e in run.events(members[0]) if e.kind == "epoch"]
    sentry = epochs[-1].fields["sentry"] if epochs else run.sentry()
    return next(n for n in members if n != sentry and n not in set(avoid))


def play_round(n: int, args: argparse.Namespace) -> Round:
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix=f"handoff-load-{n}-"))
    with MeteredRun(
        workdir, f"hl{n}{int(began) % 10000}", keys=args.keys, servers=args.servers
    ) as run:
        run.start_nodes(NODES)
        max_rate, backlog = measure_max_rate(run, args.burst)
        load_rate = args.load * max_rate
        run.interval = run.keys / load_rate
        run.start_producer()
        time.sleep(args.warmup)
        members = sorted(run.nodes)
        phases: list[Phase] = []

        def change(name: str, node: str, act: Any, expected: list[str]) -> None:
            totals = run.handoff_totals(members)
            phase = Phase(name, node, at=time.monotonic(), members=expected)
            act()
            run.wait_members(expected, timeout=60)
            settled = time.monotonic()
            try:  # every key handled again since: the moved keys' pauses are all seen
                wait_for(
                    lambda: resumed(run, settled), args.resume_timeout, "keys resumed", interval=0.5
                )
            except AssertionError as exc:  # wait_for's timeout: the stuck keys are counted
                print(f"  {name}: {exc}", flush=True)
            time.sleep(args.after)
            phase.until = time.monotonic()
            measure_handoff(phase, totals, run.handoff_totals(expected))
            phases.append(phase)

        change("join", JOINER, lambda: run.spawn(JOINER), sorted([*members, JOINER]))
        members = sorted([*members, JOINER])
        leaver = pick(run, members, avoid=[JOINER])
        change(
            "leave",
            leaver,
            lambda: run.nodes[leaver].send_signal(signal.SIGTERM),
            [m for m in members if m != leaver],
        )
        members = [m for m in members if m != leaver]
        victim = pick(run, members, avoid=[JOINER])
        change("kill", victim, lambda: run.kill(victim), [m for m in members if m != victim])
        run.stop_producer()
        casts = [h for h in run.handlings() if h.kind == "cast"]
        acked = acked_times(run)
        events = {node: run.events(node) for node in run.nodes}
        for phase in phases:
            measure_pauses(phase, casts, acked)
            measure_rehash(phase, events)
        return Round(
            max_rate=max_rate,
            burst_backlog=backlog,
            load_rate=load_rate,
            cast_rate=len(acked) / (max(acked.values()) - min(acked.values())),
            interval=run.interval,
            phases=phases,
            seconds=time.monotonic() - began,
            restarts=run.restarts,
        )


# -- the report ---------------------------------------------------------------------------------


def median(values: Iterable[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return statistics.median(found) if found else None


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def summarize(rounds: list[Round]) -> list[dict[str, Any]]:
    """Per phase: the medians over the rounds of every figure, and the verdict."""
    rows = []
    for name in TARGETS:
        mine = [p for r in rounds for p in r.phases if p.name == name]
        figures: dict[str, Any] = {"phase": name, "target_p99_s": TARGETS[name]}
        for attr in (
            "moved_keys", "stuck_keys", "pause_p50", "pause_p99", "pause_max", "worst_delay",
            "detect", "rehash", "ready", "release_max", "settle_max",
        ):  # fmt: skip
            figures[attr] = median(getattr(p, attr) for p in mine)
        figures["met"] = all(p.met and not p.stuck_keys for p in mine)
        figures["runs"] = [asdict(p) for p in mine]
        rows.append(figures)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds (medians)")
    parser.add_argument("--servers", type=int, default=1, help="NATS servers (3: R3)")
    parser.add_argument("--keys", type=int, default=120, help="keys cast to")
    parser.add_argument("--load", type=float, default=0.5, help="fraction of the max rate")
    parser.add_argument("--burst", type=float, default=5.0, help="seconds of the max rate")
    parser.add_argument("--warmup", type=float, default=3.0, help="casting before the join")
    parser.add_argument("--after", type=float, default=2.0, help="casting after every key resumed")
    parser.add_argument(
        "--resume-timeout", type=float, default=60.0, help="longest wait for every key"
    )
    args = parser.parse_args()
    began = time.monotonic()
    rounds = []
    for n in range(args.rounds):
        print(f"  {time.monotonic() - began:7.1f}s  round {n + 1}/{args.rounds}", flush=True)
        rounds.append(play_round(n, args))
        last = rounds[-1]
        print(
            f"  max rate {last.max_rate:.0f}/s (backlog {last.burst_backlog}), "
            f"load {last.load_rate:.0f}/s asked, {last.cast_rate:.0f}/s cast, "
            f"round {last.seconds:.0f} s",
            flush=True,
        )
    phases = summarize(rounds)
    print_table(
        f"handoff under load: 3 nodes, {args.servers} NATS server(s), {args.keys} keys at "
        f"{args.load:.0%} of {median(r.max_rate for r in rounds) or 0:.0f} casts/s "
        f"({median(r.cast_rate for r in rounds) or 0:.0f}/s achieved); "
        f"heartbeat {HEARTBEAT} s, failure timeout {FAILURE_TIMEOUT} s; seconds, medians "
        f"of {args.rounds} round(s)",
        ["phase", "moved", "stuck", "pause p50", "p99", "max", "worst delay", "detect", "rehash",
         "all ready", "release", "settle", "target p99", "met"],
        [
            [
                p["phase"], f"{p['moved_keys']:.0f}", f"{p['stuck_keys']:.0f}",
                seconds(p["pause_p50"]), seconds(p["pause_p99"]), seconds(p["pause_max"]),
                seconds(p["worst_delay"]), seconds(p["detect"]), seconds(p["rehash"]),
                seconds(p["ready"]), seconds(p["release_max"]), seconds(p["settle_max"]),
                f"<= {p['target_p99_s']:.0f}", "met" if p["met"] else "NOT met",
            ]
            for p in phases
        ],
    )  # fmt: skip
    print(
        "pause: later of the change and the key's last handling on its old owner -> first "
        "handling on the new owner;\nworst delay: a moved key's message acknowledged -> "
        "handled; detect: the change -> the settling epoch adopted (for a join: the new\n"
        "process's start included); rehash: first node out "
        "of ready -> last back; release/settle: the longest manager_handoff_seconds on a node"
    )
    slowest = max(
        (p for r in rounds for p in r.phases),
        key=lambda p: -1.0 if p.pause_p99 is None else p.pause_p99 / p.target,
    )
    print(f"\ntrace of the slowest phase ({slowest.name} of {slowest.node}), seconds after it:")
    for node, seen in sorted(slowest.trace.items()):
        print(f"  {node}: " + "  ".join(f"{k}={v:.3f}" for k, v in seen.items()))
    path = write_json(
        "handoff_under_load" if args.servers == 1 else f"handoff_under_load_r{args.servers}",
        {
            "servers": args.servers,
            "keys": args.keys,
            "load": args.load,
            "heartbeat": HEARTBEAT,
            "failure_timeout": FAILURE_TIMEOUT,
            "rounds": [
                {
                    "max_rate": round(r.max_rate, 1),
                    "burst_backlog": r.burst_backlog,
                    "load_rate": round(r.load_rate, 1),
                    "cast_rate": round(r.cast_rate, 1),
                    "interval": round(r.interval, 4),
                    "seconds": round(r.seconds, 1),
                    "restarts": r.restarts,
                }
                for r in rounds
            ],
            "seconds": round(time.monotonic() - began, 1),
            "phases": phases,
        },
    )
    print(f"wrote {path}")
    return 0 if all(p["met"] for p in phases) else 1


if __name__ == "__main__":
    raise SystemExit(main())
