"""Queries on tables: select / count / watch by prefix, filtered by the medium.

On both backends (``nodes``: a memory world, then a fresh nats-server). What the medium
read is measured with :attr:`KeyValue.entries_read` (on NATS: the messages the server
sent to the listing), never assumed.
"""

from __future__ import annotations

from typing import Any

import pytest

from cloister import wire
from cloister.errors import ConfigurationError
from cloister.store import TableOp
from cloister.store.table_keys import encode_table_key

from .support import Events, Nodes


async def collect(pairs: Any) -> list[tuple[Any, Any]]:
    return [pair async for pair in pairs]


async def test_select_by_prefix_where_and_limit(nodes: Nodes) -> None:
    (table,) = await nodes.tables("carts", "a")
    for key, value in {
        "user:1": {"vip": True},
        "user:2": {"vip": False},
        "user:10": {"vip": True},
        "users": {"vip": True},
        "item:1": {"vip": True},
        b"user:1": "bytes, not str",
        ("tenant", 7, "a"): 1,
        ("tenant", 7): 2,
        ("tenant", 70): 3,
        ("tenant", "7"): 4,
        7: "int",
    }.items():
        await table.put(key, value)
    assert sorted(await table.keys(prefix="user:")) == ["user:1", "user:10", "user:2"]
    assert sorted([k async for k, _ in table.select(prefix="user:1")]) == ["user:1", "user:10"]
    vips = await collect(table.select(prefix="user", where=lambda k, v: v["vip"]))
    assert sorted(vips) == [
        ("user:1", {"vip": True}),
        ("user:10", {"vip": True}),
        ("users", {"vip": True}),
    ]
    two = await collect(table.select(prefix="user", limit=2))
    assert len(two) == 2 and two == (await collect(table.select(prefix="user")))[:2]
    assert await collect(table.select(prefix="user", limit=0)) == []
    assert await collect(table.select(prefix=b"user")) == [(b"user:1", "bytes, not str")]
    tenant = dict(await collect(table.select(prefix=("tenant", 7))))
    assert tenant == {("tenant", 7, "a"): 1, ("tenant", 7): 2}
    assert await table.count(prefix=("tenant",)) == 4
    assert await table.count(prefix="") == 5  # every str key
    assert await table.count() == await table.size() == 11
    assert len(await collect(table.select())) == 11
    with pytest.raises(ConfigurationError, match="table prefix"):
        table.select(prefix=7)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="limit"):
        table.select(limit=-1)


async def test_watch_by_prefix_sees_only_the_keys_under_it(nodes: Nodes) -> None:
    a, b = await nodes.tables("carts", "a", "b")
    await a.put("user:old", 0)
    await a.put("item:old", 0)
    async with a.watch(prefix="user:", initial=True) as events:
        seen = Events(events)
        first = await seen.next()
        assert (first.key, first.value, first.op) == ("user:old", 0, TableOp.PUT)
        await b.put("item:1", 1)
        await b.put("user", 1)  # shorter than the prefix: not under it
        await b.put("user:1", 1)
        await b.delete("user:old")
        put, gone = await seen.next(), await seen.next()
        await seen.none()
        await seen.close()
    assert (put.key, put.value, put.op) == ("user:1", 1, TableOp.PUT)
    assert (gone.key, gone.op) == ("user:old", TableOp.DELETE)


async def test_a_prefix_of_100_keys_reads_100_of_100000(nodes: Nodes) -> None:
    (table,) = await nodes.tables("big", "a")
    value = wire.encode({"qty": 1})
    batch: dict[str, bytes] = {}
    for i in range(100_000):
        key = f"user:{i}" if i % 1000 == 0 else f"item:{i}"  # 100 users among 100,000
        batch[encode_table_key(key)] = value
        if len(batch) == 1000:
            await table.kv.put_many(batch)
            batch = {}
    before = table.kv.entries_read
    users = await collect(table.select(prefix="user:"))
    read = table.kv.entries_read - before
    assert len(users) == 100
    assert read == 100, f"selecting 100 keys read {read} entries of the medium"
    before = table.kv.entries_read
    assert await table.count(prefix="user:") == 100
    assert table.kv.entries_read - before == 100
    before = table.kv.entries_read
    assert await table.count(prefix="item:9999") == 1 + 10  # item:9999, item:99990-99999
    assert table.kv.entries_read - before == 11
    before = table.kv.entries_read
    assert await table.count() == 100_000  # the whole table, for comparison: reads it all
    assert table.kv.entries_read - before == 100_000
