"""Bounded RPC: a node runs at most ``max_concurrent_requests`` requests at once, refuses
the rest at once with a typed ``busy`` error, never runs a handler longer than its caller
waits, and keeps its memory flat and its pings answered under a flood from an attacker
with a connection to the same NATS server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import nats
import psutil
import pytest

from cloister import Cluster
from cloister.backends import _names
from cloister.cluster.rpc import MAX_HANDLER_SECONDS, Handlers, decode_request, encode_request
from cloister.errors import (
    ConfigurationError,
    NodeBusyError,
    RequestTimeoutError,
    WireFormatError,
)
from cloister.testing import NatsServer, ProcessGroup, eventually
from tests._support.timing import FAST
from tests.cli.support import cloister
from tests.hostile.support import cast, metric, run_app

# -- on the memory backend: the rules -----------------------------------------------------


@contextlib.asynccontextmanager
async def _pair(**options: Any) -> AsyncIterator[tuple[Cluster, Cluster]]:
    """Nodes ``a`` (with ``options``) and ``b`` of one memory cluster."""
    url = f"memory://flood-{time.monotonic_ns()}"
    async with (
        Cluster("flood", "a", backend=url, **options, **FAST.options()) as a,
        Cluster("flood", "b", backend=url, **FAST.options()) as b,
    ):
        yield a, b


async def test_past_the_limit_a_call_is_refused_busy_and_counted() -> None:
    async with _pair(max_concurrent_requests=2) as (a, b):
        release = asyncio.Event()

        async def held(_payload: Any) -> str:
            await release.wait()
            return "done"

        a.register_handler("held", held)
        running = [asyncio.ensure_future(b.call("a", "held", timeout=5)) for _ in range(2)]
        await asyncio.sleep(0.1)
        started = time.monotonic()
        with pytest.raises(NodeBusyError, match="node a is busy"):
            await b.call("a", "held", timeout=5)
        assert time.monotonic() - started < 1.0, "a refusal must come at once"
        assert a.counters.requests_refused == 1
        # a busy node still answers pings and its info (cloister status)
        assert await b.call("a", "cloister.ping") == "pong"
        assert (await b.states())["a"].state == "ready"  # type: ignore[union-attr]
        release.set()
        assert await asyncio.gather(*running) == ["done", "done"]
        assert await b.call("a", "held", timeout=5) == "done"


async def test_a_handler_runs_no_longer_than_its_caller_waits() -> None:
    async with _pair(max_concurrent_requests=1) as (a, b):
        cancelled = asyncio.Event()

        async def hangs(_payload: Any) -> None:
            try:
                await asyncio.Event().wait()
            finally:
                cancelled.set()

        a.register_handler("hangs", hangs)
        a.register_handler("quick", lambda _payload: "quick")
        with pytest.raises(RequestTimeoutError):
            await b.call("a", "hangs", timeout=0.2)
        # abandoned past what the caller waits (+ 1 s of grace): its slot is free again
        await asyncio.wait_for(cancelled.wait(), 3)
        # The one slot is free again — though a probe's ping may hold it a moment (the
        # nodes ping each other every 0.2 s): a busy answer then is right, and passes.
        deadline = time.monotonic() + 3
        while True:
            try:
                assert await b.call("a", "quick") == "quick"
                break
            except NodeBusyError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)


async def test_a_hanging_multicast_handler_does_not_stop_the_next_ones() -> None:
    url = f"memory://flood-{time.monotonic_ns()}"
    async with Cluster("flood", "a", backend=url, request_timeout=0.3, **FAST.options()) as a:
        seen: list[int] = []

        async def handler(n: int) -> None:
            if n == 0:
                await asyncio.Event().wait()
            seen.append(n)

        a.register_handler("m", handler)
        for n in range(3):
            await a.multicast("m", n)
        await eventually(lambda: seen == [1, 2], 5, "the multicasts after the hung one")


def test_handler_deadlines_are_what_the_caller_waits_within_bounds() -> None:
    handlers = Handlers("a", default_timeout=5.0)

    def deadline(waits: object) -> float:
        return handlers._deadline(decode_request(msgpack.packb({"h": "x", "t": waits})))

    assert deadline(2) == 3.0
    for foreign in (None, -1, 0, float("nan")):
        assert deadline(foreign) == 6.0
    assert deadline(1e9) == MAX_HANDLER_SECONDS
    assert deadline(float("inf")) == MAX_HANDLER_SECONDS
    for malformed in ("x", True, [1]):  # refused at the schema boundary, never run
        with pytest.raises(WireFormatError):
            deadline(malformed)


def test_limits_are_checked() -> None:
    for bad in (0, -1, 1.5, True, "8"):
        with pytest.raises(ConfigurationError, match="max_concurrent_requests"):
            Cluster("flood", "a", max_concurrent_requests=bad)
    with pytest.raises(ConfigurationError, match="max_queued_request_bytes"):
        Cluster("flood", "a", max_queued_request_bytes=1000)
    with pytest.raises(ConfigurationError, match="only synchronous built-in"):
        Handlers("a").register("x", lambda _p: None, exempt=True)


# -- a flood from an attacker on NATS, against a real process ---------------------------------

FLOOD_APP = """
import asyncio

from cloister import DynamicManager, Ok, Replace


class Shop(DynamicManager):
    def children_specs(self):
        return {"slow": {}, "c": {"payload": 0}}

    async def handle_call(self, message, id, payload):
        await asyncio.sleep(1.0)  # holds a request slot for a second
        return Ok(payload)

    def handle_cast(self, message, id, payload):
        print(f"cast handled {message}", flush=True)
        return Replace(payload + 1)
"""

REQUESTS = 20_000
SIZE = 4096
SECONDS = 5.0
RSS_BOUND = 40 * 1024 * 1024
MAX_CONCURRENT = 64  # set through $CLOISTER_MAX_CONCURRENT_REQUESTS


async def _flood(url: str, subject: str) -> dict[str, int]:
    """20,000 requests of 4 KB in 5 s: half hold a worker for a second (a valid call of
    the manager's handler), half are garbage; return the replies by kind."""
    nc = await nats.connect(url, name="attacker")
    replies: dict[str, int] = {}

    async def count(msg: Any) -> None:
        try:
            kind = msgpack.unpackb(msg.data).get("e", "ok")
        except Exception:
            kind = "undecodable"
        replies[kind] = replies.get(kind, 0) + 1

    await nc.subscribe("attacker.replies.>", cb=count)
    call = encode_request(
        "cloister.manager.Shop.call", {"id": "slow", "m": "x" * SIZE}, "attacker", timeout=30
    )
    garbage = b"\xc1" * SIZE
    loop = asyncio.get_running_loop()
    started = loop.time()
    batch = 200
    for sent in range(0, REQUESTS, batch):
        for i in range(sent, sent + batch):
            await nc.publish(subject, call if i % 2 else garbage, reply=f"attacker.replies.{i}")
        await nc.flush()
        ahead = started + SECONDS * (sent + batch) / REQUESTS - loop.time()
        if ahead > 0:
            await asyncio.sleep(ahead)
    await asyncio.sleep(3)  # the replies of what was queued
    await nc.close()
    return replies


async def _pings(url: str, subject: str, until: asyncio.Event) -> list[float]:
    """Ping the node every 0.2 s until ``until``; the round trip of each."""
    nc = await nats.connect(url, name="pinger")
    times = []
    try:
        while not until.is_set():
            started = time.monotonic()
            reply = await nc.request(
                subject, encode_request("cloister.ping", None, "p", timeout=3), 3
            )
            assert msgpack.unpackb(reply.data) == {"r": "pong"}
            times.append(time.monotonic() - started)
            await asyncio.sleep(0.2)
    finally:
        await nc.close()
    return times


def _status(url: str) -> dict[str, Any]:
    done = cloister("status", "--json", "--backend", url, "--cluster", "flood", timeout=30)
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


async def _attack(url: str, subject: str, rss: Any) -> tuple[dict[str, int], list[float], int]:
    stop = asyncio.Event()
    pings = asyncio.ensure_future(_pings(url, subject, stop))
    peak = 0

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss())
            await asyncio.sleep(0.05)

    sampler = asyncio.ensure_future(sample())
    flood = asyncio.ensure_future(_flood(url, subject))
    await asyncio.sleep(1.0)
    for seq in (1, 2, 3):  # casts sent during the flood
        await cast(url, "flood", "c", seq, msg_id=f"c:{seq}")
    status = await asyncio.to_thread(_status, url)  # cloister status, during the flood
    member = {m["node"]: m for m in status["members"]}["a"]
    assert member["state"] == "ready" and member["error"] is None, status
    replies = await flood
    stop.set()
    await sampler
    return replies, await pings, peak


def test_a_flood_of_requests_keeps_the_node_flat_alive_and_answering(
    nats_server: NatsServer, node_processes: ProcessGroup, tmp_path: Path
) -> None:
    url = nats_server.url
    limit = {"CLOISTER_MAX_CONCURRENT_REQUESTS": str(MAX_CONCURRENT)}
    node = run_app(
        node_processes, tmp_path, FLOOD_APP, url, "flood", "--metrics-port", "0", env=limit
    )
    assert node.pid is not None
    process = psutil.Process(node.pid)
    before = process.memory_info().rss
    subject = _names.node_subject("flood", "a")
    replies, pings, peak = asyncio.run(
        _attack(nats_server.url, subject, lambda: process.memory_info().rss)
    )
    growth = peak - before
    print(
        f"\nflood: RSS {before / 2**20:.1f} MB -> peak {peak / 2**20:.1f} MB "
        f"(+{growth / 2**20:.1f} MB); replies {replies}; "
        f"{len(pings)} pings, slowest {max(pings):.3f} s"
    )
    assert node.returncode is None, node.tail()
    assert growth < RSS_BOUND, f"RSS grew by {growth / 2**20:.1f} MB under the flood"
    # every request got an answer but those still running (held by the slow worker):
    # the garbage is answered bad_request, or busy while the slots are all taken
    assert sum(replies.values()) >= REQUESTS - MAX_CONCURRENT, replies
    assert replies.get("busy", 0) > REQUESTS // 2, replies
    assert replies.get("bad_request", 0) > 0, replies
    # every ping got its pong within 3 s (_pings fails otherwise), all through the flood
    assert len(pings) >= 5, pings
    for seq in (1, 2, 3):
        node.wait_for_line(rf"^cast handled {seq}$", timeout=20)
    # the refusals are counted, in the metric too, and logged once (not once each)
    refused = metric(node, "cloister_requests_refused_total")
    assert refused >= replies["busy"], refused
    logged = [line.text for line in node.lines if "is busy" in line.text]
    assert len(logged) == 1 and f"{MAX_CONCURRENT} requests running" in logged[0], logged
