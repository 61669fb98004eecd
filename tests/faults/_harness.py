"""One fault run: 3 ``cloister run`` nodes on a 3-server R3 NATS cluster, a producer
casting all along, a fault, and the checker's report — shared by ``tests/faults`` and
``bench/faults.py``.

A run (:class:`FaultRun`, a context manager) owns everything it starts: the NATS
cluster, the node processes (``cloister run tests.faults.app:FaultApp``), the producer
(:mod:`tests.faults.producer`) and, for the partition scenario, network namespaces and a
forwarder (:mod:`tests.faults._netns`). The scenarios themselves
(:data:`SCENARIOS`) are plain functions of a run, so the tests and the benchmark do
exactly the same thing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from cloister import wire
from cloister.backends import open_backend
from cloister.backends._names import bucket_stream
from cloister.testing import (
    LineNotFoundError,
    NatsCluster,
    NatsServer,
    NodeEvent,
    NodeProcess,
    ProcessGroup,
    node_events,
    wait_for,
    wait_for_event,
)
from tests.faults import checker
from tests.faults._netns import Netns
from tests.faults.app import key_name

REPO = Path(__file__).resolve().parents[2]
APP = "tests.faults.app:FaultApp"
MANAGER = "faults"
PARTITIONS = 32
HEARTBEAT = 0.5
FAILURE_TIMEOUT = 2.0  # NATS TTLs are whole seconds
FREEZE = 3 * FAILURE_TIMEOUT  # how long SIGSTOP and the partition last
SLEEP = 2 * FAILURE_TIMEOUT  # how long the blocking handler sleeps
SPECIAL_SEQ = 5  # the sleeping message: cast ~1.2 s after the producer started (warm-up)
SERVER_DOWN = 10.0  # how long the killed NATS server stays down
WARMUP = 3.0  # casting before the fault, so every key has an owner and a payload
AFTER = 5.0  # casting after the fault is over, so moved keys show their new owner
NODES = ("a", "b", "c")
READY = r"^state \S+ -> ready "


@dataclass
class Outcome:
    """What a scenario run found: the report, and the figures for the benchmark."""

    scenario: str
    report: checker.Report
    pauses: checker.Pauses
    fault_at: float
    notes: dict[str, Any] = field(default_factory=dict)


class FaultRun:
    """A cluster under test; see the module docstring.

    Args:
        workdir: where journals, logs and the NATS stores go.
        name: the cloister cluster name (one per run).
        netns: run the nodes in network namespaces (the partition scenario).
        env: extra ``FAULTS_*`` variables for the app (CPU-bound perform, ticks).
        special: ``key:seq:seconds``, a message whose handler sleeps.
        keys, interval: the producer casts to ``keys`` keys, one cast per key every
            ``interval`` seconds.
        app: the ``cloister run`` application (a :class:`~tests.faults.app.FaultApp`).
        servers: NATS servers (streams are replicated on up to 3 of them).
    """

    def __init__(
        self,
        workdir: Path,
        name: str,
        *,
        netns: bool = False,
        env: Mapping[str, str] | None = None,
        special: str | None = None,
        keys: int = 30,
        interval: float = 0.3,
        app: str = APP,
        servers: int = 3,
    ) -> None:
        self.workdir = workdir
        self.app = app  # a FaultApp (its journal is what the checker reads)
        self.replicas = min(3, servers)
        self.name = name
        self.env = dict(env or {})
        self.special = special
        self.keys = keys
        self.interval = interval
        self.nats: NatsCluster | NatsServer = (
            NatsCluster(servers, base_dir=workdir / "nats")
            if servers > 1
            else NatsServer(base_dir=workdir / "nats")  # (a cluster of one forms no quorum)
        )
        self.group = ProcessGroup(log_dir=workdir / "logs")
        self.netns = Netns((*NODES, "d")) if netns else None
        self.nodes: dict[str, NodeProcess] = {}
        self.producer: NodeProcess | None = None
        self.forwarder: NodeProcess | None = None
        self.frozen: dict[str, list[tuple[float, float]]] = {}
        self.ready_at = 0.0
        self.restarts = 0  # nodes started again after a start-up failure
        self.producer_stopped_at: float | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.nats.start()
            if self.netns is not None:
                self.netns.setup()
                ports = [str(s.port) for s in self.nats.servers]
                self.forwarder = self.group.spawn_python(
                    "-m", "tests.faults._forward", self.netns.host, *ports,
                    name="forwarder", env=self._python_env(), cwd=REPO,
                )  # fmt: skip
                self.forwarder.wait_for_line("^forwarding ", timeout=10)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Kill everything this run started (CONT first: a stopped process ignores TERM)."""
        for proc in self.nodes.values():
            proc.send_signal(signal.SIGCONT)
        self.group.stop()
        self.nats.stop()
        if self.netns is not None:
            self.netns.teardown()

    # -- nodes ------------------------------------------------------------------------------

    def backend_url(self, node: str) -> str:
        """The NATS URL ``node`` connects to (through the forwarder in a namespace)."""
        if self.netns is None:
            return self.nats.url
        host = self.netns.host
        return "nats://" + ",".join(f"{host}:{s.port}" for s in self.nats.servers)

    def _python_env(self) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        return {"PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}

    def spawn(self, node: str) -> NodeProcess:
        """Start ``cloister run`` of the app as ``node`` (without waiting)."""
        argv = [
            sys.executable, "-m", "cloister", "run", self.app,
            "--cluster", self.name, "--backend", self.backend_url(node), "--name", node,
            "--consensus", "2", "--replicas", str(self.replicas),
            "--heartbeat", str(HEARTBEAT), "--failure-timeout", str(FAILURE_TIMEOUT),
        ]  # fmt: skip
        if self.netns is not None:
            argv = [*self.netns.prefix(node), *argv]
        env = {
            **self._python_env(),
            "FAULTS_JOURNAL": str(self.journal(node)),
            "FAULTS_KEYS": str(self.keys),
            **self.env,
        }
        proc = self.group.spawn(argv, name=node, env=env, cwd=REPO)
        self.nodes[node] = proc
        return proc

    def journal(self, node: str) -> Path:
        return self.workdir / f"{node}.journal"

    def start_nodes(self, names: Iterable[str] = NODES) -> None:
        """Start nodes and wait until all of them are ready on one epoch listing them."""
        names = list(names)
        if not self.nodes:
            # The first node creates the R3 buckets alone (see test_server_failover.py).
            self._started(self.spawn(names[0]))
            names = names[1:]
        for name in names:
            self.spawn(name)
        for name in names:
            self._started(self.nodes[name])
        self.wait_members(sorted(self.nodes))

    def _started(self, proc: NodeProcess, attempts: int = 3) -> None:
        """Wait until ``proc``'s manager started; start it again if it exited before.

        A node opening R3 buckets just created can find a stream without a leader yet
        and exit ("did not answer in time"): a known start-up race, not this suite's
        subject, so the node is simply started again.
        """
        for attempt in range(1, attempts + 1):
            try:
                wait_for_event(proc, r"^manager \S+ started ", timeout=60)
                return
            except LineNotFoundError:
                if proc.is_running or attempt == attempts:
                    raise
                self.restarts += 1
                proc.start()

    def wait_members(self, members: list[str], timeout: float = 60.0) -> None:
        """Wait until every node of ``members`` is ready on an epoch listing exactly them."""

        def agreed() -> bool | None:
            for name in members:
                last_epoch = self._last(name, "epoch")
                last_state = self._last(name, "state")
                if last_epoch is None or sorted(last_epoch.members) != members:
                    return None
                if last_state is None or last_state.change[1] != "ready":
                    return None
            return True

        wait_for(agreed, timeout, f"{members} ready on one epoch listing them")
        self.ready_at = max(self.ready_at, time.monotonic())

    def events(self, node: str) -> list[NodeEvent]:
        """Every event ``node`` logged."""
        return node_events(self.nodes[node])

    def _last(self, node: str, kind: str) -> NodeEvent | None:
        events = [e for e in self.events(node) if e.kind == kind]
        return events[-1] if events else None

    def sentry(self) -> str:
        """The node that holds the sentry lease now (from the last epoch line)."""
        epoch = self._last(NODES[0], "epoch")
        assert epoch is not None
        return epoch.fields["sentry"]

    # -- faults -----------------------------------------------------------------------------

    def freeze(self, node: str, seconds: float) -> float:
        """SIGSTOP ``node`` for ``seconds``, then SIGCONT; return when it was stopped."""
        proc = self.nodes[node]
        at = time.monotonic()
        proc.send_signal(signal.SIGSTOP)
        time.sleep(seconds)
        proc.send_signal(signal.SIGCONT)
        self.frozen.setdefault(node, []).append((at, time.monotonic()))
        return at

    def kill(self, node: str) -> float:
        """SIGKILL ``node``; return when."""
        at = time.monotonic()
        self.nodes[node].kill()
        return at

    def partition(self, node: str, seconds: float) -> float:
        """Cut ``node`` off from every server for ``seconds``; return when it was cut."""
        assert self.netns is not None, "a partition needs FaultRun(netns=True)"
        at = time.monotonic()
        self.netns.cut(node)
        time.sleep(seconds)
        self.netns.heal(node)
        return at

    def stream_leaders(self) -> dict[str, str]:
        """stream name -> the server leading it, from the servers' /jsz."""
        leaders: dict[str, str] = {}
        for server in self.nats.live_servers:
            try:
                doc = server.monitor("jsz", streams=True, raft=True)
            except Exception:
                continue
            for account in doc.get("account_details") or []:
                for detail in account.get("stream_detail") or []:
                    leader = (detail.get("cluster") or {}).get("leader")
                    if leader == server.name:
                        leaders[detail["name"]] = leader
        return leaders

    def members_stream(self) -> str:
        return bucket_stream(self.name, "members")

    def inbox_stream(self) -> str:
        found = [s for s in self.stream_leaders() if "inbox" in s and self.name in s]
        assert found, f"no inbox stream among {sorted(self.stream_leaders())}"
        return found[0]

    def colocate_leaders(self, attempts: int = 8) -> NatsServer:
        """Move the inbox stream's leader onto the members stream's leader (stepdowns)
        so that one kill -9 takes both; return that server."""
        members = self.nats.wait_stream_leader(self.members_stream())
        inbox = self.inbox_stream()
        for _ in range(attempts):
            leader = self.nats.wait_stream_leader(inbox)
            if leader is members:
                return members
            asyncio.run(_step_down(self.nats, inbox, members.name))
            time.sleep(1.0)
        return members

    # -- the producer -----------------------------------------------------------------------

    def start_producer(self) -> None:
        argv = [
            "-m", "tests.faults.producer", "--url", self.nats.url, "--cluster", self.name,
            "--out", str(self.workdir), "--keys", str(self.keys),
            "--partitions", str(PARTITIONS), "--interval", str(self.interval),
        ]  # fmt: skip
        if self.special:
            argv += ["--special", self.special]
        self.producer = self.group.spawn_python(
            *argv, name="producer", env=self._python_env(), cwd=REPO
        )
        self.producer.wait_for_line("^producer started", timeout=30)

    def stop_producer(self, timeout: float = 60.0) -> None:
        """Stop casting; returns once every cast in flight was acknowledged."""
        assert self.producer is not None
        self.producer_stopped_at = time.monotonic()
        self.producer.send_signal(signal.SIGTERM)
        self.producer.wait_for_line("^producer done", timeout=timeout)

    # -- results ----------------------------------------------------------------------------

    def acked(self) -> dict[str, list[int]]:
        return checker.read_acked(self.workdir / "acked.log")

    def final_payloads(self, timeout: float = 40.0, quiet: float = 6.0) -> dict[str, list[int]]:
        """The stored payloads once they hold every acknowledged cast, or once they
        stopped changing for ``quiet`` seconds (a lost cast never arrives)."""
        return asyncio.run(self._final_payloads(timeout, quiet))

    async def _final_payloads(self, timeout: float, quiet: float) -> dict[str, list[int]]:
        backend = open_backend(self.nats.url, self.name, "checker", replicas=self.replicas)
        await backend.connect()
        try:
            kv = await backend.kv(f"mgr-{MANAGER}")
            acked = self.acked()
            deadline = time.monotonic() + timeout
            last: dict[str, list[int]] = {}
            changed = time.monotonic()
            while True:
                payloads = await _read_payloads(kv)
                if payloads != last:
                    last, changed = payloads, time.monotonic()
                complete = all(set(seqs) <= set(payloads.get(k, ())) for k, seqs in acked.items())
                now = time.monotonic()
                if complete or now > deadline or now - changed > quiet:
                    return payloads
                await asyncio.sleep(0.5)
        finally:
            await backend.close()

    def check(
        self, *, may_leave: Iterable[str] = (), fence_first: Iterable[str] = ()
    ) -> checker.Report:
        """Read everything the run left behind and check it (call after the drain)."""
        final = self.final_payloads()
        handlings = checker.read_journals(self.journal(n) for n in self.nodes)
        return checker.check(
            handlings=handlings,
            acked=self.acked(),
            writes=checker.read_writes(self.workdir / "writes.log"),
            final=final,
            events={n: self.events(n) for n in self.nodes},
            frozen=self.frozen,
            may_leave=may_leave,
            fence_first=fence_first,
            since=self.ready_at,
        )

    def handlings(self) -> list[checker.Handling]:
        return checker.read_journals(self.journal(n) for n in self.nodes)

    def owner_of(self, key: str) -> str | None:
        """The node that handled ``key`` last (from the journals)."""
        mine = [h for h in self.handlings() if h.key == key and h.kind == "cast"]
        return mine[-1].node if mine else None


async def _read_payloads(kv: Any) -> dict[str, list[int]]:
    payloads: dict[str, list[int]] = {}
    for entry in (await kv.entries(consistent=True)).values():
        try:
            stored = wire.decode(entry.value)
        except Exception:
            continue
        if isinstance(stored, dict) and isinstance(stored.get("payload"), list | tuple):
            payloads[str(stored.get("id"))] = [int(s) for s in stored["payload"]]
    return payloads


async def _step_down(nats: NatsCluster, stream: str, preferred: str) -> None:
    """Ask ``stream``'s leader to step down, preferring ``preferred`` (NATS 2.11+)."""
    import nats as nats_py

    client = await nats_py.connect(**nats.connect_kwargs())
    try:
        body = json.dumps({"placement": {"preferred": preferred}}).encode()
        await client.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", body, timeout=5)
    except Exception:
        pass  # the next attempt asks again
    finally:
        await client.close()


# -- the scenarios ------------------------------------------------------------------------------


def _casting(
    run: FaultRun, fault: Callable[[], tuple[float, str | None]]
) -> tuple[float, str | None]:
    """Cast, fault, cast on, stop casting: return ``(fault time, faulted node)``."""
    run.start_producer()
    time.sleep(WARMUP)
    at, faulted = fault()
    time.sleep(AFTER)
    run.stop_producer()
    return at, faulted


def _outcome(
    run: FaultRun,
    scenario: str,
    at: float,
    faulted: str | None,
    may_leave: Iterable[str],
    fence_first: Iterable[str] = (),
    faulted_key: str | None = None,
) -> Outcome:
    report = run.check(may_leave=may_leave, fence_first=fence_first)
    casts = run.handlings()
    # Stalls are measured while the producer cast (a drain's last handlings end early).
    until = run.producer_stopped_at or max((h.start for h in casts), default=at)
    found = checker.pauses(casts, at, until, faulted, faulted_key)
    return Outcome(scenario, report, found, at, notes={"restarts": run.restarts})


def sigstop_node(run: FaultRun) -> Outcome:
    """1. SIGSTOP a node (not the sentry) for 3x the failure timeout, then SIGCONT."""
    run.start_nodes()
    victim = next(n for n in NODES if n != run.sentry())
    at, _ = _casting(run, lambda: (run.freeze(victim, FREEZE), victim))
    return _outcome(run, "sigstop-node", at, victim, may_leave=[victim])


def sigstop_sentry(run: FaultRun) -> Outcome:
    """2. SIGSTOP the sentry for 3x the failure timeout, then SIGCONT."""
    run.start_nodes()
    victim = run.sentry()
    at, _ = _casting(run, lambda: (run.freeze(victim, FREEZE), victim))
    return _outcome(run, "sigstop-sentry", at, victim, may_leave=[victim])


def blocking_handler(run: FaultRun) -> Outcome:
    """3. One message's sync handler time.sleeps 2x the failure timeout."""
    run.start_nodes()
    key = key_name(5)
    run.special = f"{key}:{SPECIAL_SEQ}:{SLEEP}"

    def fault() -> tuple[float, str | None]:
        # The fault starts when the special message is stored (acknowledged).
        wait_for(lambda: _acked_at(run, key, SPECIAL_SEQ), 30, f"{key}:{SPECIAL_SEQ} acked")
        return _acked_at(run, key, SPECIAL_SEQ) or time.monotonic(), run.owner_of(key)

    at, faulted = _casting(run, fault)
    return _outcome(run, "blocking-handler", at, faulted, may_leave=[], faulted_key=key)


def _acked_at(run: FaultRun, key: str, seq: int) -> float | None:
    """When the producer's cast ``(key, seq)`` was acknowledged, if it was."""
    path = run.workdir / "acked.log"
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == key and int(parts[1]) == seq:
                return float(parts[2])
    return None


def cpu_bound_perform(run: FaultRun) -> Outcome:
    """4. A CPU-bound perform (0.5 s busy loop, every second) among many fast workers."""
    run.start_nodes()
    # The CPU-bound worker performs all along: the "fault" is the casting after the warm-up.
    at, _ = _casting(run, lambda: (time.monotonic(), None))
    return _outcome(run, "cpu-bound-perform", at, _cpu_node(run), may_leave=[])


def _cpu_node(run: FaultRun) -> str | None:
    nodes = [h.node for h in run.handlings() if h.kind == "perform"]
    return nodes[-1] if nodes else None


def kill_stream_leader(run: FaultRun) -> Outcome:
    """5. kill -9 the server leading the members and inbox streams, 10 s, restart."""
    run.start_nodes()
    server = run.colocate_leaders()
    notes = {"server": server.name, "leaders": run.stream_leaders()}

    def fault() -> tuple[float, str | None]:
        at = time.monotonic()
        server.kill()
        time.sleep(SERVER_DOWN)
        server.restart()
        run.nats.wait_ready()
        return at, None

    at, _ = _casting(run, fault)
    outcome = _outcome(run, "kill-stream-leader", at, None, may_leave=[])
    outcome.notes.update(notes)
    outcome.notes["leader_after"] = run.stream_leaders()
    return outcome


def kill_and_join(run: FaultRun) -> Outcome:
    """6. kill -9 a node, and a new node joins."""
    run.start_nodes()
    victim = next(n for n in NODES if n != run.sentry())

    def fault() -> tuple[float, str | None]:
        at = run.kill(victim)
        run.spawn("d")
        return at, victim

    at, _ = _casting(run, fault)
    return _outcome(run, "kill-9-and-join", at, victim, may_leave=[victim])


def network_partition(run: FaultRun) -> Outcome:
    """7. Cut one node off from every server for 3x the failure timeout."""
    run.start_nodes()
    victim = next(n for n in NODES if n != run.sentry())
    at, _ = _casting(run, lambda: (run.partition(victim, FREEZE), victim))
    return _outcome(run, "network-partition", at, victim, may_leave=[victim], fence_first=[victim])


@dataclass(frozen=True)
class Scenario:
    """A named scenario: how to set its run up, and what it does."""

    name: str
    play: Callable[[FaultRun], Outcome]
    netns: bool = False
    env: Mapping[str, str] = field(default_factory=dict)


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("sigstop-node", sigstop_node),
        Scenario("sigstop-sentry", sigstop_sentry),
        Scenario("blocking-handler", blocking_handler),
        Scenario(
            "cpu-bound-perform",
            cpu_bound_perform,
            env={"FAULTS_CPU": "0.5", "FAULTS_TICKS": "300", "FAULTS_TICK_EVERY": "0.1"},
        ),
        Scenario("kill-stream-leader", kill_stream_leader),
        Scenario("kill-9-and-join", kill_and_join),
        Scenario("network-partition", network_partition, netns=True),
    )
}


def play(scenario: str, workdir: Path) -> Outcome:
    """Run one scenario from start to end in ``workdir``; return what it found."""
    spec = SCENARIOS[scenario]
    name = f"f{scenario.replace('-', '')[:12]}"
    with FaultRun(workdir, name, netns=spec.netns, env=spec.env) as run:
        return spec.play(run)
