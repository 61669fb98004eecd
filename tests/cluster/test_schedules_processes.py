"""The cluster-wide scheduler with real node processes on a real nats-server.

A job every second on 3 node processes for 30 s; the job's owner is killed (-9) a third
of the way in and a fourth node joins at two thirds. Each node logs every run to its own
file (synced line by line). Then: every tick from the first to the last ran exactly once
— except at most one, the tick the killed node had claimed and was running (a claimed
tick is never run again: at most once per tick) — no tick ran twice, and no two runs were
ever in progress at once.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from pathlib import Path

from cloister.local.processes import ProcessGroup
from cloister.testing import NatsServer
from tests.cli.support import cloister

NODE = Path(__file__).with_name("_schedule_node.py")
DURATION = 30.0


def read_runs(logs: list[Path]) -> tuple[list[tuple[float, str, int, float]], dict[float, float]]:
    """(tick, node, fence, started) of every run, and tick -> ended for the finished ones."""
    started: list[tuple[float, str, int, float]] = []
    ended: dict[float, float] = {}
    for log in logs:
        if not log.exists():
            continue
        for line in log.read_text().splitlines():
            parts = line.split()
            if len(parts) != 5:
                continue  # a line cut by the kill
            what, tick, node, fence, moment = parts
            if what == "start":
                started.append((float(tick), node, int(fence), float(moment)))
            else:
                ended[float(tick)] = float(moment)
    return started, ended


def owner(logs: list[Path]) -> str:
    started, _ = read_runs(logs)
    return max(started)[1]


def check_status(server: NatsServer) -> None:
    """``cloister status --json`` shows the job, its owner and its next run, as a user
    sees them."""
    result = cloister("status", "--json", "--backend", server.url, "--cluster", "sched")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    (job,) = document["schedules"]
    assert job["name"] == "beat" and job["trigger"] == "every 1s"
    assert job["node"] in {"n1", "n2", "n3"}
    assert time.time() - 2 < job["next_run"] < time.time() + 3
    reported = {m["node"]: m["schedules"] for m in document["members"]}
    assert all(len(jobs) == 1 for jobs in reported.values()), reported
    assert sum(jobs[0]["runs_here"] for jobs in reported.values()) == 1
    text = cloister("status", "--backend", server.url, "--cluster", "sched")
    assert text.returncode == 0 and "job beat every 1s  next " in text.stdout, text.stdout


def test_a_job_every_second_runs_each_tick_once_through_a_kill_and_a_join(
    nats_server: NatsServer, node_processes: ProcessGroup, tmp_path: Path
) -> None:
    logs = {name: tmp_path / f"{name}.log" for name in ("n1", "n2", "n3", "n4")}
    procs = {}
    for name in ("n1", "n2", "n3"):
        procs[name] = node_processes.spawn_python(
            str(NODE), nats_server.url, name, str(logs[name]), name=name
        )
    for proc in procs.values():
        proc.wait_for_line(r"^scheduled ", timeout=30)
    began = time.monotonic()
    while not any(log.exists() for log in logs.values()):
        assert time.monotonic() - began < 30, "no run in 30 s"
        time.sleep(0.2)
    began = time.monotonic()
    time.sleep(DURATION / 3)
    check_status(nats_server)
    victim = owner(list(logs.values()))
    killed_at = time.time()
    procs[victim].kill()
    time.sleep(DURATION / 3)
    procs["n4"] = node_processes.spawn_python(
        str(NODE), nats_server.url, "n4", str(logs["n4"]), name="n4"
    )
    procs["n4"].wait_for_line(r"^scheduled ", timeout=30)
    time.sleep(max(0.0, DURATION - (time.monotonic() - began)))
    node_processes.kill_all()

    started, ended = read_runs(list(logs.values()))
    counts = Counter(tick for tick, *_ in started)
    twice = sorted(tick for tick, n in counts.items() if n > 1)
    assert not twice, f"ticks run more than once: {twice}"
    ticks = sorted(counts)
    expected = round(ticks[-1] - ticks[0]) + 1
    missing = sorted(
        ticks[0] + k
        for k in range(expected)
        if round(ticks[0] + k, 6) not in {round(t, 6) for t in ticks}
    )
    assert len(ticks) >= DURATION - 3, f"only {len(ticks)} ticks ran in {DURATION} s"
    # At most the one tick the killed node had claimed when it died, claimed before the kill.
    assert len(missing) <= 1, f"ticks never run: {missing}"
    assert all(tick <= killed_at + 1 for tick in missing), (missing, killed_at)
    # Never two runs in progress at once: each run ended (or its node was killed) before
    # the next one started.
    runs = sorted(started, key=lambda run: run[3])
    for (tick, node, _, _), (_, _, _, next_start) in itertools.pairwise(runs):
        end = ended.get(tick, killed_at if node == victim else None)
        assert end is not None, f"tick {tick} on {node} never ended and its node was not killed"
        assert end <= next_start, f"tick {tick} on {node} still running when the next started"
    fences = [fence for *_, fence, _ in sorted(started)]
    assert fences == sorted(fences), "a later tick was claimed with an older fence"
    nodes = {node for _, node, *_ in started}
    assert victim in nodes and len(nodes) >= 2  # the job moved off the killed node
