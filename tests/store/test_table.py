"""Replicated tables (``cluster.table``) across the nodes of a cluster.

The core behaviour runs on both backends (``nodes``: a memory world, then a fresh
nats-server); failure injection, the listener and error cases run on memory.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
import pytest

from cloister import Cluster, ClusterInfo, State
from cloister.backends._names import bucket_stream
from cloister.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
    NotRunningError,
    WireFormatError,
)
from cloister.store import Table, TableOp, UpdateConflictError, open_table
from cloister.store.table_keys import encode_table_key
from cloister.testing import NatsCluster, NatsServer, eventually

from .support import Events, Nodes

T = TypeVar("T")

# -- on every backend ---------------------------------------------------------------------


async def test_put_on_one_node_get_on_another(nodes: Nodes) -> None:
    a, b = await nodes.tables("carts", "a", "b")
    assert await b.get("cart-1") is None
    assert await b.get("cart-1", default={}) == {}
    await a.put("cart-1", {"apples": 3, "pears": [1, 2.5, None], "note": "ok", "raw": b"\0"})
    assert await b.get("cart-1") == {
        "apples": 3,
        "pears": [1, 2.5, None],
        "note": "ok",
        "raw": b"\0",
    }
    await b.put("cart-1", "replaced")
    assert await a.get("cart-1") == "replaced"
    await a.put("none", None)
    assert await b.get("none", default="absent") is None  # None is a value, not absence
    assert await b.size() == 2


async def test_concurrent_updates_from_three_nodes_lose_nothing(nodes: Nodes) -> None:
    tables = await nodes.tables("counters", "a", "b", "c")

    async def increment(old: int) -> int:
        await asyncio.sleep(0)  # let the others read the same revision: a real race
        return old + 1

    results = await asyncio.gather(
        *(table.update("hits", increment, default=0) for table in tables for _ in range(50))
    )
    assert await tables[0].get("hits") == 150
    # every update saw a distinct value: none was applied on top of a stale read
    assert sorted(results) == list(range(1, 151))


async def test_delete_and_update_to_delete(nodes: Nodes) -> None:
    a, b = await nodes.tables("stock", "a", "b")
    await a.put("pears", 2)
    await b.delete("pears")
    assert await a.get("pears") is None
    await b.delete("pears")  # deleting an absent key is a no-op
    await a.put("apples", 2)

    def take_one(old: int) -> Any:
        return Table.DELETE if old <= 1 else old - 1

    assert await b.update("apples", take_one) == 1
    assert await b.update("apples", take_one, default=0) == 0  # deleted: default back
    assert await a.get("apples") is None
    assert await a.update("apples", lambda old: Table.DELETE, default="none") == "none"
    assert await a.keys() == []


async def test_keys_items_and_size(nodes: Nodes) -> None:
    a, b, c = await nodes.tables("inventory", "a", "b", "c")
    await a.put("x", 1)
    await b.put(2, [2])
    await c.put(("tenant", 3), {"n": 3})
    await c.put("gone", 0)
    await a.delete("gone")
    for table in (a, b, c):
        assert sorted(map(repr, await table.keys())) == sorted(map(repr, ["x", 2, ("tenant", 3)]))
        assert await table.items() == {"x": 1, 2: [2], ("tenant", 3): {"n": 3}}
        assert await table.size() == 3
    other = (await nodes.tables("other", "a"))[0]
    assert await other.size() == 0 and await other.items() == {}  # tables are separate


async def test_key_types_round_trip(nodes: Nodes) -> None:
    a, b = await nodes.tables("keys", "a", "b")
    keys: list[Any] = [
        "plain",
        "ünïcødé ☃ with spaces/and.dots",
        "",
        b"\x00\xffbytes",
        b"",
        0,
        -7,
        2**63 + 5,
        ("tenant", 7),
        ("nested", (1, b"x", ("deep",))),
        (),
    ]
    for i, key in enumerate(keys):
        await a.put(key, i)
    for i, key in enumerate(keys):
        assert await b.get(key) == i, key
    items = await b.items()
    assert len(items) == len(keys)
    for i, key in enumerate(keys):
        found = [k for k in items if k == key and type(k) is type(key)]
        assert found and items[found[0]] == i
    # similar keys of different types are different keys
    await a.put("1", "str")
    await a.put(1, "int")
    await a.put(b"1", "bytes")
    await a.put(("1",), "tuple")
    assert [await b.get(k) for k in ("1", 1, b"1", ("1",))] == ["str", "int", "bytes", "tuple"]


async def test_watch_sees_puts_and_deletes_from_other_nodes(nodes: Nodes) -> None:
    a, b, c = await nodes.tables("orders", "a", "b", "c")
    async with a.watch() as events:
        seen = Events(events)
        await b.put(("order", 1), {"qty": 1})
        await c.put(("order", 1), {"qty": 2})
        await c.delete(("order", 1))
        await b.update("count", lambda n: n + 1, default=0)
        got = await seen.take(4)
        await seen.close()
    assert [(e.key, e.value, e.op) for e in got] == [
        (("order", 1), {"qty": 1}, TableOp.PUT),
        (("order", 1), {"qty": 2}, TableOp.PUT),
        (("order", 1), None, TableOp.DELETE),
        ("count", 1, TableOp.PUT),
    ]
    assert got[2].op == "delete" and got[0].op == "put"
    assert [e.revision for e in got] == sorted({e.revision for e in got})


async def test_watch_initial_lists_first_then_follows(nodes: Nodes) -> None:
    a, b = await nodes.tables("profiles", "a", "b")
    await a.put("u1", "ann")
    await a.put("u2", "bob")
    await a.put("u1", "anna")
    async with b.watch(initial=True) as events:
        seen = Events(events)
        first = await seen.take(2)
        assert {(e.key, e.value, e.op) for e in first} == {
            ("u1", "anna", TableOp.PUT),
            ("u2", "bob", TableOp.PUT),
        }
        await a.delete("u2")
        await a.put("u3", "cy")
        later = await seen.take(2)
        assert [(e.key, e.value, e.op) for e in later] == [
            ("u2", None, TableOp.DELETE),
            ("u3", "cy", TableOp.PUT),
        ]
        await seen.none(0.2)
        await seen.close()


async def test_random_operations_match_a_dict(nodes: Nodes) -> None:
    tables = await nodes.tables("model", "a", "b", "c")
    rng = random.Random(6)
    universe: list[Any] = ["a", "b", b"a", 1, 2, ("t", 1), ("t", (2, b"x"))]
    model: dict[Any, Any] = {}
    for step in range(150):
        table = rng.choice(tables)
        key = rng.choice(universe)
        action = rng.random()
        if action < 0.35:
            value = rng.choice([step, str(step), [step], {"s": step}, None])
            await table.put(key, value)
            model[key] = value
        elif action < 0.5:
            await table.delete(key)
            model.pop(key, None)
        elif action < 0.75:

            def pair(old: Any, step: int = step) -> list[Any]:
                return [old, step]

            new = await table.update(key, pair, default="none")
            model[key] = [model.get(key, "none"), step]
            assert new == model[key]
        else:
            assert await table.get(key, "absent") == model.get(key, "absent")
    for table in tables:
        assert await table.items() == model
        assert await table.size() == len(model)


# -- failures and the listener (memory backend) -------------------------------------------


async def test_a_node_crash_loses_nothing_written_before(memory_nodes: Nodes) -> None:
    a, b, c = await memory_nodes.tables("ledger", "a", "b", "c")
    for i in range(100):
        await (a, b)[i % 2].put(("entry", i), {"amount": i})
    await a.update("total", lambda t: t + 100, default=0)
    memory_nodes.world.crash("a")
    with pytest.raises(BackendUnavailableError):
        await a.put("after", 1)  # the dead node writes nothing more
    expected = {("entry", i): {"amount": i} for i in range(100)} | {"total": 100}
    assert await b.items() == expected
    assert await c.items() == expected
    # the survivors carry on at once: no rebuild step, no blackout
    assert await c.update("total", lambda t: t + 1) == 101
    await eventually(lambda: set(memory_nodes.clusters["b"].siblings()) == {"b", "c"})
    assert await b.get("total") == 101 and await b.size() == 101
    # a new node sees everything too
    d = (await memory_nodes.tables("ledger", "d"))[0]
    assert await d.items() == expected | {"total": 101}


async def test_contended_updates_with_slow_nodes(memory_nodes: Nodes) -> None:
    tables = await memory_nodes.tables("slow", "a", "b", "c")
    for name, delay in (("a", 0.001), ("b", 0.002), ("c", 0.0)):
        memory_nodes.world.delay(name, delay)
    await asyncio.gather(
        *(t.update("n", lambda n: n + 1, default=0) for t in tables for _ in range(30))
    )
    assert await tables[2].get("n") == 90


class TableSetup:
    """A listener doing the seed's "extra setup" on ready: it records itself in a table."""

    def __init__(self) -> None:
        self.cluster: Cluster | None = None
        self.done = asyncio.Event()
        self.seen: list[tuple[State, State]] = []

    async def on_state_change(self, from_state: State, to_state: State, info: ClusterInfo) -> None:
        self.seen.append((from_state, to_state))
        if to_state is State.READY and self.cluster is not None:
            table = await self.cluster.table("setup")
            await table.update("ready", lambda nodes: sorted({*nodes, info.node}), default=[])
            await table.put(("epoch", info.node), info.epoch)
            self.done.set()


async def test_listener_can_write_to_a_table_when_ready(memory_nodes: Nodes) -> None:
    listeners = {name: TableSetup() for name in "ab"}
    for name, listener in listeners.items():
        cluster = Cluster(
            "test",
            name,
            backend=memory_nodes.url,
            listener=listener,
            heartbeat=memory_nodes.heartbeat,
            failure_timeout=memory_nodes.failure_timeout,
        )
        listener.cluster = cluster  # the listener needs the cluster for its setup
        await cluster.start()
        memory_nodes.clusters[name] = cluster
    try:
        await asyncio.wait_for(asyncio.gather(*(x.done.wait() for x in listeners.values())), 5)
        table = (await memory_nodes.tables("setup", "c"))[0]
        assert await table.get("ready") == ["a", "b"]
        assert {k for k in await table.keys() if k != "ready"} == {("epoch", "a"), ("epoch", "b")}
        assert all(c.listener_errors == 0 for c in memory_nodes.clusters.values())
    finally:
        for name in "ab":
            await memory_nodes.clusters[name].stop()


# -- errors -------------------------------------------------------------------------------


async def test_clear_errors_for_bad_names_keys_and_values(memory_nodes: Nodes) -> None:
    a = await memory_nodes.start("a")
    for bad in ("", "has space", "dots.no", "x" * 61, 7):
        with pytest.raises(ConfigurationError, match="invalid table name"):
            await a.table(bad)  # type: ignore[arg-type]
    table = await a.table("t")
    for key in (1.5, True, None, ["list"], ("ok", 2.0), {"a": 1}):
        with pytest.raises(ConfigurationError, match="invalid table key"):
            await table.put(key, 1)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="invalid table key"):
            await table.get(key)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="too long"):
        await table.put("k" * 2000, 1)
    with pytest.raises(WireFormatError, match=r"table 't': cannot store the value of key 'k'"):
        await table.put("k", object())
    with pytest.raises(WireFormatError, match="cannot store"):
        await table.update("k", lambda old: {1, 2})
    assert await table.get("k") is None  # nothing was written
    with pytest.raises(ConfigurationError, match="replicas"):
        await a.table("t", replicas=0)
    with pytest.raises(ConfigurationError, match="attempts"):
        Table(table.kv, "t", attempts=0)

    def boom(old: Any) -> Any:
        raise RuntimeError("user code failed")

    with pytest.raises(RuntimeError, match="user code failed"):
        await table.update("k", boom)
    await a.stop()
    with pytest.raises(NotRunningError, match="not running"):
        await a.table("t")


async def test_update_gives_up_after_its_attempts(memory_nodes: Nodes) -> None:
    a = await memory_nodes.start("a")
    table = Table((await a.table("hot")).kv, "hot", attempts=3, backoff=(0.001, 0.002))
    calls = 0

    async def interfered(old: int) -> int:
        nonlocal calls
        calls += 1
        await table.put("k", random.random())  # somebody always writes in between
        return old + 1

    await table.put("k", 0)
    with pytest.raises(UpdateConflictError, match=r"'k' in table 'hot' lost .* 3 times"):
        await table.update("k", interfered)
    assert calls == 3


async def test_undecodable_records_are_skipped_and_counted(
    memory_nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    a = await memory_nodes.start("a")
    table = await a.table("mixed")
    raw = await a.backend.kv("tbl-mixed")
    await table.put("good", 1)
    await raw.put("not-a-table-key", b"\x01")
    await raw.put("kNOT_BASE64_MSGPACK", b"\x01")
    await raw.put("k.f.1", b"\x01")  # no such type: a float is no table key
    await raw.put(encode_table_key("b") + ".A", b"\x01")  # not canonical
    await raw.put(encode_table_key("b"), b"\xc1")  # the key "b", a value msgpack refuses
    with caplog.at_level(logging.WARNING, "cloister.store.table"):
        assert await table.items() == {"good": 1}
        assert await table.keys() in (["good", "b"], ["b", "good"])
    assert table.bad_records >= 5
    assert "cannot decode" in caplog.text
    with pytest.raises(WireFormatError, match="stored value of key 'b'"):
        await table.get("b")
    async with table.watch() as events:
        seen = Events(events)
        await raw.put("junk", b"x")
        await table.put("after", 2)
        event = await seen.next()
        await seen.close()
    assert (event.key, event.value) == ("after", 2)


async def test_replicas_are_ignored_where_the_backend_cannot_set_them(
    memory_nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    a = await memory_nodes.start("a")
    with caplog.at_level(logging.WARNING, "cloister.store.table"):
        table = await a.table("r", replicas=3)
    if "replicas" not in inspect.signature(a.backend.kv).parameters:
        assert "replicas=3 of table 'r' is ignored" in caplog.text
    await table.put("k", "v")
    assert await (await open_table(a.backend, "r")).get("k") == "v"


# -- NATS only ------------------------------------------------------------------------------


async def test_nats_table_survives_a_server_crash(nats_server: NatsServer) -> None:
    async with Nodes(nats_server.url) as nodes:
        a, b = await nodes.tables("durable", "a", "b")
        for i in range(20):
            await a.put(("k", i), i)
        await a.update("total", lambda t: t + 20, default=0)
        nats_server.kill()  # kill -9: only what JetStream acknowledged counts
        await nats_server.restart_async()

        async def read_back() -> dict[Any, Any] | None:
            try:
                return await b.items()
            except Exception:
                return None

        found: dict[Any, Any] | None = None
        for _ in range(100):
            found = await read_back()
            if found is not None:
                break
            await asyncio.sleep(0.1)
        assert found == {("k", i): i for i in range(20)} | {"total": 20}
        # a's connection may still be reconnecting after b already reads again
        total = await _until_done(
            lambda: a.update("total", lambda t: t + 1), 10, "update after the restart"
        )
        assert total == 21


async def _until_done(step: Callable[[], Awaitable[T]], within: float, what: str) -> T:
    """Run ``step`` until it stops raising a backend error (a NATS leader election)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await step()
        except BackendError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: still failing after {within}s: {exc}") from exc
            await asyncio.sleep(0.1)


async def _expect(read: Awaitable[Any], expected: Any) -> None:
    """Raise a BackendError (so that :func:`_until_done` tries again) until ``read`` is right."""
    found = await read
    if found != expected:
        raise BackendError(f"read {found!r}, expected {expected!r}")


async def test_nats_r3_table_survives_the_loss_of_its_stream_leader(
    nats_cluster: NatsCluster,
) -> None:
    async with Nodes(nats_cluster.url) as nodes:
        a = await nodes.start("a", backend_options={"replicas": 3})
        b = await nodes.start("b", backend_options={"replicas": 3})
        # creating an R3 stream on a young cluster can outlast one request: try again
        ta = await _until_done(lambda: a.table("r3", replicas=3), 30, "open the table")
        tb = await _until_done(lambda: b.table("r3", replicas=3), 30, "open the table")
        stream = bucket_stream("test", "tbl-r3")
        nc = await nats.connect(**nats_cluster.connect_kwargs())
        try:
            info = await nc.jetstream().stream_info(stream)
            assert info.config.num_replicas == 3
        finally:
            await nc.close()
        leader = await nats_cluster.wait_stream_leader_async(stream)  # writable from now
        for i in range(30):
            await ta.put(i, {"n": i})
        await tb.update("total", lambda t: t + 30, default=0)
        leader.kill()  # kill -9 the server leading the table's stream
        expected = {i: {"n": i} for i in range(30)} | {"total": 30}
        # Reads are direct gets, answered by any replica: one that lagged behind the
        # quorum may answer with an older listing until it catches up. Nothing is lost.
        await _until_done(lambda: _expect(ta.items(), expected), 30, "read back on a")
        await _until_done(lambda: _expect(tb.items(), expected), 30, "read back on b")
        # writes resume once a new leader is elected (puts may be repeated: idempotent)
        await _until_done(lambda: ta.put("after-a", 1), 30, "write after leader loss")
        await _until_done(lambda: tb.put("after-b", 2), 30, "write after leader loss")
        assert await tb.update("total", lambda t: t + 1) == 31
        assert await ta.size() == 33
