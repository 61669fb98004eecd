"""Real ``cloister node`` processes on real NATS servers, read through their event lines.

Every node prints ``state``/``epoch``/``sentry``/``lease`` lines stamped with
``time.monotonic()`` — one clock for all processes of this machine — so a test can compare
when a node was killed (its own clock) with when each survivor noticed.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

from cloister.testing import (
    NodeEvent,
    NodeProcess,
    ProcessGroup,
    node_events,
    wait_for,
    wait_for_event,
)
from tests._support.timing import NATS_FAILURE_TIMEOUT as FAILURE_TIMEOUT
from tests._support.timing import NATS_HEARTBEAT as HEARTBEAT
from tests._support.timing import NATS_TTL_SLACK as TTL_SLACK
from tests.cli.support import cli_env, cloister

__all__ = [
    "FAILURE_TIMEOUT",
    "HEARTBEAT",
    "TTL_SLACK",
    "Nodes",
    "assert_one_sentry_at_a_time",
    "wait_for",
]


class Nodes:
    """``cloister node`` processes of one cluster, started and read by name.

    ``heartbeat`` / ``failure_timeout`` None: the Cluster's defaults.
    """

    def __init__(
        self,
        group: ProcessGroup,
        backend: str,
        cluster: str,
        *,
        consensus: int = 3,
        heartbeat: float | None = HEARTBEAT,
        failure_timeout: float | None = FAILURE_TIMEOUT,
        extra: Sequence[str] = (),
    ) -> None:
        self.group = group
        self.backend = backend
        self.cluster = cluster
        self.consensus = consensus
        self.heartbeat = heartbeat
        self.failure_timeout = failure_timeout
        self.extra = list(extra)
        self.procs: dict[str, NodeProcess] = {}

    def argv(self, name: str) -> list[str]:
        """``python`` arguments running node ``name`` (timings left out when None)."""
        argv = [
            "-m", "cloister", "node",
            "--cluster", self.cluster,
            "--backend", self.backend,
            "--name", name,
            "--consensus", str(self.consensus),
            *self.extra,
        ]  # fmt: skip
        if self.heartbeat is not None:
            argv += ["--heartbeat", str(self.heartbeat)]
        if self.failure_timeout is not None:
            argv += ["--failure-timeout", str(self.failure_timeout)]
        return argv

    def start(self, *names: str) -> None:
        """Spawn the nodes ``names`` and wait until each has joined."""
        for name in names:
            self.procs[name] = self.group.spawn_python(
                *self.argv(name), name=f"{self.cluster}-{name}", env=cli_env()
            )
        for name in names:
            wait_for_event(self.procs[name], r"^node \S+ pid=\d+ started ", timeout=30)

    def restart(self, name: str) -> None:
        """Start node ``name`` again (same command, same name)."""
        self.procs[name].start()
        wait_for_event(self.procs[name], r"^node \S+ pid=\d+ started ", timeout=30)

    def kill(self, name: str) -> float:
        """SIGKILL node ``name``; return when (monotonic), taken just before the signal."""
        at = time.monotonic()
        self.procs[name].kill()
        return at

    def terminate(self, name: str) -> float:
        """SIGTERM node ``name``, wait for its exit (checked to be 0); return when sent."""
        at = time.monotonic()
        assert self.procs[name].terminate(timeout=15) == 0, self.procs[name].tail()
        return at

    def events(self, name: str, kind: str | None = None) -> list[NodeEvent]:
        """Every event node ``name`` logged (over all its runs), of ``kind`` if given."""
        return node_events(self.procs[name], kind)

    def last(self, name: str, kind: str) -> NodeEvent | None:
        events = self.events(name, kind)
        return events[-1] if events else None

    def state(self, name: str) -> str | None:
        """The state node ``name`` is in, from its last state line."""
        event = self.last(name, "state")
        return None if event is None else event.change[1]

    def wait_ready(self, names: Iterable[str], timeout: float = 20.0) -> NodeEvent:
        """Wait until every node of ``names`` is ready on one epoch listing exactly them.

        Returns the epoch line (of the first node) they agree on.
        """
        names = sorted(names)

        def agreed() -> NodeEvent | None:
            epochs = [self.last(n, "epoch") for n in names]
            if any(e is None or e.members != tuple(names) for e in epochs):
                return None
            if len({(e.epoch, e.fields["fingerprint"]) for e in epochs if e}) != 1:
                return None
            if any(self.state(n) != "ready" for n in names):
                return None
            return epochs[0]

        return wait_for(agreed, timeout, f"{names} ready on one epoch listing them")

    def noticed(
        self, names: Iterable[str], members: Iterable[str], since: float, timeout: float
    ) -> dict[str, float]:
        """When (monotonic) each node of ``names`` first adopted an epoch listing exactly
        ``members`` after ``since``; waits up to ``timeout`` seconds for all of them."""
        wanted = tuple(sorted(members))

        def first(name: str) -> float | None:
            for event in self.events(name, "epoch"):
                if event.t >= since and event.members == wanted:
                    return event.t
            return None

        def all_noticed() -> dict[str, float] | None:
            seen = {name: first(name) for name in names}
            if any(t is None for t in seen.values()):
                return None
            return {name: t for name, t in seen.items() if t is not None}

        return wait_for(all_noticed, timeout, f"{sorted(names)} adopt members {wanted}")

    def status(self, *extra: str) -> dict[str, Any]:
        """``cloister status --json`` of this cluster (checked to exit 0)."""
        result = cloister(
            "status", "--backend", self.backend, "--cluster", self.cluster, "--json", *extra
        )
        assert result.returncode == 0, result.stderr
        doc: dict[str, Any] = json.loads(result.stdout)
        return doc


def sentries_by_epoch(nodes: Nodes) -> dict[int, set[str]]:
    """For each epoch, the sentries any node's epoch line named (one each, if all is well)."""
    seen: dict[int, set[str]] = {}
    for name in nodes.procs:
        for event in nodes.events(name, "epoch"):
            assert event.epoch is not None
            seen.setdefault(event.epoch, set()).add(event.fields["sentry"])
    return seen


def lease_intervals(nodes: Nodes, ended: dict[str, float]) -> list[tuple[float, float, str]]:
    """Who held the sentry lease when: ``(from, to, node)``, from the ``lease`` lines.

    An interval still open ends at ``ended[node]`` (when the node was killed) or now.
    """
    intervals = []
    for name, proc in nodes.procs.items():
        start: float | None = None
        for event in node_events(proc):
            if event.kind == "lease" and event.words == ("acquired",):
                start = event.t
            elif start is not None and (
                event.kind == "lease" or (event.kind == "node" and "starting" in event.words)
            ):
                # lost, or a restart: the previous run's lease ended when it was killed
                end = event.t if event.kind == "lease" else ended.get(name, event.t)
                intervals.append((start, end, name))
                start = None
        if start is not None:
            intervals.append((start, ended.get(name, time.monotonic()), name))
    return sorted(intervals)


def assert_one_sentry_at_a_time(nodes: Nodes, ended: dict[str, float]) -> None:
    """Every epoch names one sentry, and no two nodes ever held the lease at once."""
    for epoch, sentries in sentries_by_epoch(nodes).items():
        assert len(sentries) == 1, f"epoch {epoch} named several sentries: {sentries}"
    intervals = lease_intervals(nodes, ended)
    for (_, end, holder), (start, _, other) in itertools.pairwise(intervals):
        assert start >= end, f"{holder} and {other} held the sentry lease at once: {intervals}"
