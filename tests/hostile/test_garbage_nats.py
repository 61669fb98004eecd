"""Garbage on every subject, stream and bucket the NATS backend uses, against real
``cloister run`` processes on a real nats-server.

An attacker with a plain nats-py connection to the same account sends garbage,
truncated, wrong-shape, oversized and deeply nested payloads to the node RPC subjects,
the multicast subject, the inbox stream, and writes them into the members, control,
state, dead-letter and table buckets (:mod:`cloister.backends._names` names them all).
After each attack every node is alive, membership still agrees, casts are still
handled, and the bad input is counted where a counter exists and logged once — not once
per message or per retry. One cluster serves every attack, to keep the module short.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import nats
import pytest

from cloister import wire
from cloister.backends import _names, open_backend
from cloister.cluster.control import EPOCH_KEY, SENTRY_KEY
from cloister.cluster.rpc import encode_request
from cloister.manager.state import storage_key
from cloister.testing import NatsServer, NodeProcess, ProcessGroup, wait_for
from tests.hostile.support import cast, member, metric, run_app
from tests.nats.support import Nodes

CLUSTER = "garbage"
NODES = ("a", "b")

APP = """
from cloister import DynamicManager, Replace


class Shop(DynamicManager):
    def children_specs(self):
        return {f"k{i}": {"payload": 0} for i in range(8)}

    async def handle_call(self, message, id, payload):
        if message == "table":  # what the node reads back from a garbage table
            if not hasattr(self, "prices"):
                self.prices = await self.cluster.table("prices")  # opened once, as apps do
            return {str(k): v for k, v in (await self.prices.items()).items()}
        if message == "dead":
            return len(await self.dead_letters())
        return payload

    def handle_cast(self, message, id, payload):
        print(f"cast handled {message}", flush=True)
        return Replace(payload + 1)
"""


def _deep(levels: int) -> bytes:
    """An array nested ``levels`` deep: what overflowed the C stack once."""
    return b"\x91" * levels + b"\xc0"


def payloads(max_payload: int) -> Iterator[tuple[str, bytes]]:
    """The hostile payloads, by name: garbage, truncated, wrong shape, oversized, deep."""
    yield "garbage", b"\xc1" * 64
    yield "empty", b""
    yield "truncated", wire.encode({"h": "cloister.ping", "p": list(range(50))})[:-7]
    yield "a list", msgpack.packb([1, 2, 3])
    yield "a string", msgpack.packb("hello")
    yield "handler not a str", msgpack.packb({"h": 5, "p": None})
    yield "deep", _deep(5000)
    yield "deep tuples", _tuple_bomb(200)
    yield "oversized", msgpack.packb({"h": "cloister.ping", "p": b"x" * (max_payload - 4096)})


def _tuple_bomb(levels: int) -> bytes:
    """Tuples (the wire's extension type 1) nested ``levels`` deep, built by hand."""
    data = msgpack.packb(None)
    for _ in range(levels):
        data = msgpack.packb(msgpack.ExtType(1, b"\x91" + data))
    return bytes(data)


WRONG_SHAPED_CALLS = [
    ("cloister.manager.Shop.call", "not a map"),
    ("cloister.manager.Shop.call", {"id": ["unhashable"], "m": 1}),
    ("cloister.manager.Shop.cast", {"nothing": 1}),
    ("cloister.manager.Shop.put", {"id": "k1", "spec": "not a spec"}),
    ("cloister.manager.Shop.delete", {"id": {"a": 1}}),
    ("cloister.manager.Shop.handoff", {"epoch": "x", "workers": [[1]]}),
    ("cloister.manager.Shop.handoff", {"epoch": 10**9, "workers": [["k1", "junk", 3]]}),
    ("cloister.manager.Shop.handoff", [1, 2]),
    ("cloister.info", {"p": _deep(100)}),
]


class Attacker:
    """A raw nats-py connection (no cloister code on the sending side)."""

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.replies: list[bytes] = []
        self._ids = itertools.count()

    async def request_all(self, subject: str, bodies: list[bytes]) -> list[bytes]:
        """Send each body as a request; the replies (every one must come)."""
        answers = await asyncio.gather(
            *(self.nc.request(subject, body, timeout=10) for body in bodies)
        )
        return [bytes(a.data) for a in answers]

    async def publish_all(self, subject: str, bodies: list[bytes]) -> None:
        for body in bodies:
            await self.nc.publish(subject, body)
        await self.nc.flush()


async def _kv_put(url: str, bucket: str, key: str, value: bytes) -> None:
    # Through a KV client of our own, as any client of the account could write it.
    backend = open_backend(url, CLUSTER, "attacker")
    await backend.connect()
    try:
        await (await backend.kv(bucket)).put(key, value)
    finally:
        await backend.close()


class Cluster:
    """The two ``cloister run`` nodes under attack, and the checks after each attack."""

    def __init__(self, group: ProcessGroup, url: str, directory: Path) -> None:
        self.url = url
        self.group, self.directory = group, directory
        self.nodes = Nodes(group, url, CLUSTER)
        for name in NODES:
            self.nodes.procs[name] = run_app(
                group, directory, APP, url, CLUSTER, "--metrics-port", "0", name=name
            )
        self.casts = itertools.count(1)

    def proc(self, name: str) -> NodeProcess:
        return self.nodes.procs[name]

    def lines(self, pattern: str) -> dict[str, int]:
        """How many lines containing ``pattern`` each node logged."""
        procs = self.nodes.procs
        return {n: sum(pattern in line.text for line in p.lines) for n, p in procs.items()}

    def survived(self, what: str) -> None:
        """Every node alive, membership agrees on both, a cast to every key handled."""
        for name in NODES:
            assert self.proc(name).returncode is None, f"{what}: {self.proc(name).tail()}"
        self.nodes.wait_ready(NODES, timeout=20)
        seqs = [next(self.casts) for _ in range(8)]
        for i, seq in enumerate(seqs):
            asyncio.run(cast(self.url, CLUSTER, f"k{i}", seq, msg_id=f"check:{seq}"))

        def handled() -> bool | None:
            seen = {
                line.text
                for name in NODES
                for line in self.proc(name).lines
                if line.text.startswith("cast handled ")
            }
            return True if all(f"cast handled {seq}" in seen for seq in seqs) else None

        wait_for(handled, 20, f"after {what}: casts handled")

    def logged_once(self, pattern: str, what: str) -> None:
        """``pattern`` logged at least once by some node and at most once by each."""
        counts = self.lines(pattern)
        assert sum(counts.values()) >= 1, f"{what}: nothing logged ({pattern!r})"
        assert max(counts.values()) <= 1, f"{what}: logged {counts} times ({pattern!r})"


@pytest.fixture
def cluster(
    nats_server: NatsServer, node_processes: ProcessGroup, tmp_path: Path
) -> Iterator[Cluster]:
    yield Cluster(node_processes, nats_server.url, tmp_path)


async def _attack_rpc(url: str) -> tuple[list[bytes], list[bytes]]:
    nc = await nats.connect(url, name="attacker")
    try:
        attacker = Attacker(nc)
        bodies = [body for _, body in payloads(nc.max_payload)]
        bodies += [encode_request(h, p, "attacker", timeout=5) for h, p in WRONG_SHAPED_CALLS]
        answers_a = await attacker.request_all(_names.node_subject(CLUSTER, "a"), bodies * 3)
        answers_b = await attacker.request_all(_names.node_subject(CLUSTER, "b"), bodies)
        multicast = _names.topic_subject(CLUSTER, "multicast")
        await attacker.publish_all(multicast, bodies * 3)
        return answers_a, answers_b
    finally:
        await nc.close()


async def _attack_inbox(url: str) -> int:
    nc = await nats.connect(url, name="attacker")
    try:
        js = nc.jetstream()
        subject = _names.log_subjects(CLUSTER, "inbox-Shop")
        bodies = [body for _, body in payloads(nc.max_payload - 1024)]
        bodies += [
            msgpack.packb(["k1", "message", 5]),  # msg_id not a str
            msgpack.packb([["unhashable"], 1, None]),
            msgpack.packb(["k1", 1, None, "extra"]),
            msgpack.packb(["k3", 1, None]),  # well-formed, in the wrong partition
        ]
        for partition, body in zip(itertools.cycle((0, 1, 5)), bodies, strict=False):
            await js.publish(f"{subject}.{partition}", body)
        return len(bodies)
    finally:
        await nc.close()


def _call(url: str, worker: str, message: Any) -> dict[str, Any]:
    """``manager.call(worker, message)`` by hand: the owner's answer (the other node
    answers not_owner)."""

    async def ask() -> dict[str, Any]:
        nc = await nats.connect(url)
        try:
            body = encode_request(
                "cloister.manager.Shop.call", {"id": worker, "m": message}, "t", timeout=10
            )
            answers = []
            for node in NODES:
                reply = await nc.request(_names.node_subject(CLUSTER, node), body, timeout=10)
                answers.append(msgpack.unpackb(reply.data, strict_map_key=False))
            owned = [a for a in answers if a.get("e") != "not_owner"]
            assert len(owned) == 1, answers
            answer: dict[str, Any] = owned[0]
            return answer
        finally:
            await nc.close()

    return asyncio.run(ask())


def test_garbage_everywhere_kills_no_node(cluster: Cluster) -> None:
    url = cluster.url
    cluster.survived("start")

    # 1. node RPC subjects and the multicast subject
    answers_a, answers_b = asyncio.run(_attack_rpc(url))
    for answer in answers_a + answers_b:  # every request answered, each with an error
        assert "e" in msgpack.unpackb(answer) or "r" in msgpack.unpackb(answer), answer
    cluster.survived("garbage requests and multicasts")
    cluster.logged_once("rejected a malformed request", "garbage requests")
    cluster.logged_once("rejected a malformed multicast", "garbage multicasts")
    for name in NODES:  # counted: every bad request and multicast
        assert metric(cluster.proc(name), "cloister_request_errors_total") >= 10

    # 2. the members and control buckets
    for key, value in [
        ("junk", b"\xc1\xc1"),
        ("deep", _deep(5000)),
        ("zero", member("zero", weight=0)),
    ]:
        asyncio.run(_kv_put(url, "members", key, value))
    asyncio.run(_kv_put(url, "control", SENTRY_KEY, _deep(5000)))
    asyncio.run(_kv_put(url, "control", EPOCH_KEY, b"\xc1 not an epoch"))
    cluster.survived("garbage control records")
    for name in NODES:
        assert metric(cluster.proc(name), "cloister_bad_records_total") >= 3
    counts = cluster.lines("ignoring a malformed member record")
    assert counts == {"a": 3, "b": 3}, counts  # three bad records, each logged once

    # 3. the state bucket of the manager: worker records, claims, foreign keys
    for key, value in [
        (storage_key("k1"), b"\xc1"),
        (storage_key("k2"), _deep(5000)),
        (storage_key("k3"), msgpack.packb({"spec": "not a spec", "w": "x"})),
        ("c.5", msgpack.packb({"epoch": "x"})),
        ("c.6", b"\xc1"),
        ("foreign", b"\x00"),
    ]:
        asyncio.run(_kv_put(url, "mgr-Shop", key, value))
    cluster.survived("garbage state records")  # read on the next settle: see the end

    # 4. the inbox stream: undecodable, wrong-shape and misplaced records are parked
    sent = asyncio.run(_attack_inbox(url))
    cluster.survived("garbage inbox records")

    answers: list[dict[str, Any]] = []

    def parked() -> int | None:
        answers.append(_call(url, "k0", "dead"))
        count = answers[-1].get("r")
        return count if isinstance(count, int) and count >= sent else None

    try:
        wait_for(parked, 20, f"all {sent} garbage inbox records parked as dead letters")
    finally:
        print(f"\ndead letters: {answers[-1:]}")
    cluster.logged_once("parked as a dead letter", "garbage inbox records")

    # 5. the dead-letter bucket: a node still lists (skipping) the malformed letters
    for key, value in [("9-9", b"\xc1"), ("9-10", _deep(5000)), ("9-11", msgpack.packb([1]))]:
        asyncio.run(_kv_put(url, "dead-Shop", key, value))
    for _ in range(2):  # listed twice: each malformed letter logged once
        answer = _call(url, "k0", "dead")
        assert answer.get("r", -1) >= sent, answer
    cluster.survived("garbage dead letters")
    cluster.logged_once("skipping malformed dead letter '9-9'", "garbage dead letters")

    # 6. a table bucket the app reads
    for key, value in [("junk", b"\xc1"), ("kdeep", _deep(5000)), ("k" + "A" * 200, b"\x01")]:
        asyncio.run(_kv_put(url, "tbl-prices", key, value))
    for _ in range(2):  # read twice: each bad record logged once
        answer = _call(url, "k0", "table")
        assert "r" in answer, answer  # the good records, the bad ones skipped
    cluster.survived("garbage table records")
    cluster.logged_once("bucket key 'junk' is not a table key", "garbage table records")

    # a node started after all that joins and takes its share
    newcomer = run_app(cluster.group, cluster.directory, APP, url, CLUSTER, name="c")
    cluster.nodes.procs["c"] = newcomer
    cluster.nodes.wait_ready(("a", "b", "c"), timeout=30)
    # every node read the garbage state on the settles since (the garbage under worker
    # keys is overwritten by their owners' next flush; a foreign key stays): logged once
    cluster.logged_once("malformed stored worker (key foreign)", "state records")
