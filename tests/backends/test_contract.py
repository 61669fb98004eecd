"""The backend contract: the same behavioural tests against every backend.

Each test takes ``connect``, a factory of connected backends on one shared medium: a fresh
``memory://`` world, or a fresh nats-server from the ``nats_server`` fixture. Whatever
the cluster core relies on is pinned here, so the two implementations cannot drift apart.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from cloister.backends import (
    Backend,
    Guard,
    KVOp,
    Log,
    LogConsumer,
    LogRecord,
    PartitionBusyError,
    ServeLimits,
    open_backend,
)
from cloister.backends.base import TOPIC_PENDING_BYTES
from cloister.errors import (
    BackendUnavailableError,
    ConfigurationError,
    FencedError,
    FencedWriteError,
    KeyExistsError,
    NoSuchNodeError,
    RemoteError,
    RequestTimeoutError,
    RevisionMismatchError,
)
from cloister.testing import eventually
from tests.backends.support import watching

Connect = Callable[..., Awaitable[Backend]]
_worlds = itertools.count()

# Expiry is enforced by the medium: memory timers are exact, NATS expires on its own clock
# (whole seconds, up to ~0.25 s late) and the marker then has to reach the watcher.
EXPIRY_SLACK = 1.5


@pytest.fixture(params=["memory", "nats"])
async def connect(request: pytest.FixtureRequest) -> AsyncIterator[Connect]:
    """``await connect(cluster="c", node="n1")``: a connected backend on a shared medium."""
    if request.param == "memory":
        url = f"memory://contract-{next(_worlds)}-{time.monotonic_ns()}"
    else:
        url = request.getfixturevalue("nats_server").url
    made: list[Backend] = []

    async def make(cluster: str = "contract", node: str = "n1") -> Backend:
        backend = open_backend(url, cluster, node)
        await backend.connect()
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.close()


# -- key-value ----------------------------------------------------------------------------


async def test_create_is_exclusive_and_update_is_compare_and_set(connect: Connect) -> None:
    kv = await (await connect()).kv("members", ttl_keys=True)
    first = await kv.create("alpha", b"1")
    with pytest.raises(KeyExistsError):
        await kv.create("alpha", b"again")
    with pytest.raises(RevisionMismatchError):
        await kv.update("alpha", b"stale", revision=first + 100)
    second = await kv.update("alpha", b"2", revision=first)
    assert second > first
    with pytest.raises(RevisionMismatchError):
        await kv.update("alpha", b"lost race", revision=first)
    entry = await kv.get("alpha")
    assert entry is not None and (entry.value, entry.revision) == (b"2", second)
    with pytest.raises(RevisionMismatchError):
        await kv.update("never-written", b"x", revision=1)


async def test_revisions_increase_across_the_bucket(connect: Connect) -> None:
    kv = await (await connect()).kv("control")
    revisions = [await kv.put(f"k{i % 3}", b"v") for i in range(9)]
    revisions.append(await kv.create("fresh", b"v"))
    revisions.append(await kv.update("k0", b"w", revision=revisions[6]))
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)


async def test_get_and_entries_show_only_live_keys(connect: Connect) -> None:
    kv = await (await connect()).kv("control")
    assert await kv.get("missing") is None
    assert await kv.entries() == {}
    revisions = {key: await kv.put(key, key.encode()) for key in ("a", "b.c", "d=e", "f-g")}
    await kv.delete("a")
    listing = await kv.entries()
    assert set(listing) == {"b.c", "d=e", "f-g"}
    for key, entry in listing.items():
        assert (entry.key, entry.value, entry.revision) == (key, key.encode(), revisions[key])
    assert await kv.get("a") is None
    empty = await kv.put("empty", b"")
    assert await kv.get("empty") == (await kv.entries())["empty"]
    assert (await kv.entries())["empty"].revision == empty


async def test_put_many_stores_every_key_and_watchers_see_each(connect: Connect) -> None:
    kv = await (await connect()).kv("state")
    await kv.put("k0001", b"old")
    items = {f"k{i:04}": f"v{i}".encode() for i in range(2500)}  # more than one NATS batch
    async with watching(kv) as events:
        await kv.put_many(items)
        await kv.put_many({})  # nothing to write is fine
        await kv.put_many({"single": b"s"})
        listing = await kv.entries(consistent=True)
        assert {key: entry.value for key, entry in listing.items()} == {**items, "single": b"s"}
        seen = [await events.next(5) for _ in range(len(items) + 1)]
    assert {event.key for event in seen} == {*items, "single"}
    assert all(event.op is KVOp.PUT for event in seen)
    revisions = [event.revision for event in seen]
    assert revisions == sorted(revisions)


async def test_put_many_refuses_a_bad_key_before_writing_anything(connect: Connect) -> None:
    kv = await (await connect()).kv("state")
    with pytest.raises(ConfigurationError):
        await kv.put_many({"good": b"1", "bad key": b"2"})
    assert await kv.entries() == {}


# -- guarded writes (fencing at the medium) -------------------------------------------------


async def test_a_valid_guard_stores_and_a_stale_one_stores_nothing(connect: Connect) -> None:
    kv = await (await connect()).kv("mgr-guard")
    claim = await kv.create("c.1", b"node a, epoch 1")
    guard = Guard("c.1", claim)
    first = await kv.put("w1", b"by a", guard=guard)
    batch = {f"w{i}": f"a{i}".encode() for i in range(2, 40)}
    await kv.put_many(batch, guard=guard)
    await kv.put_many({"w40": b"one key, one put"}, guard=guard)
    assert (await kv.get("w1")).value == b"by a"  # type: ignore[union-attr]
    # Another node claims the partition: a's guard no longer holds, for a write of one key,
    # of a few, or of more than one NATS atomic batch.
    reclaim = await kv.update("c.1", b"node b, epoch 2", revision=claim)
    before = await kv.entries(consistent=True)
    with pytest.raises(FencedWriteError) as refused:
        await kv.put("w1", b"stale", guard=guard)
    assert refused.value.failed == {"c.1": (claim, reclaim)}
    assert "c.1" in str(refused.value) and "do not retry" in str(refused.value)
    with pytest.raises(FencedError):
        await kv.put_many({"w1": b"stale", "w2": b"stale", "fresh": b"x"}, guard=guard)
    with pytest.raises(FencedError):
        await kv.put_many({f"w{i}": b"stale" for i in range(1200)}, guard=guard)
    assert await kv.entries(consistent=True) == before  # nothing at all was stored
    # The new holder's guard holds.
    await kv.put_many({"w1": b"by b", "w2": b"by b"}, guard=Guard("c.1", reclaim))
    assert (await kv.get("w1", consistent=True)).value == b"by b"  # type: ignore[union-attr]
    assert first < reclaim


async def test_a_guard_at_revision_0_holds_only_while_the_key_was_never_written(
    connect: Connect,
) -> None:
    kv = await (await connect()).kv("mgr-guard")
    await kv.put("w1", b"unclaimed", guard=Guard("c.7", 0))
    await kv.put_many({"w2": b"x", "w3": b"y"}, guard=Guard("c.7", 0))
    claim = await kv.create("c.7", b"claimed")
    with pytest.raises(FencedWriteError):
        await kv.put("w1", b"too late", guard=Guard("c.7", 0))
    # A guard key deleted since is at its tombstone's revision: the old guard fails too.
    await kv.delete("c.7")
    for revision in (0, claim):
        with pytest.raises(FencedWriteError):
            await kv.put_many({"w1": b"a", "w2": b"b"}, guard=Guard("c.7", revision))
    assert (await kv.get("w1")).value == b"unclaimed"  # type: ignore[union-attr]


async def test_a_guarded_write_is_an_ordinary_write_of_its_own_key(connect: Connect) -> None:
    kv = await (await connect()).kv("mgr-guard")
    claim = await kv.create("c.2", b"claim")
    revision = await kv.create("w", b"v1")
    # The guard replaces the check on the written key, it does not add one: the write
    # does not depend on w's own revision, and it bumps it as any put does.
    newer = await kv.put("w", b"v2", guard=Guard("c.2", claim))
    assert newer > revision
    with pytest.raises(RevisionMismatchError):
        await kv.update("w", b"lost", revision=revision)
    assert await kv.update("w", b"v3", revision=newer) > newer
    with pytest.raises(KeyExistsError):
        await kv.create("w", b"again")
    # Writing the guarded keys never moves the guard: it holds for the next write too.
    await kv.put_many({"w": b"v4", "x": b"1"}, guard=Guard("c.2", claim))
    assert (await kv.get("c.2")).revision == claim  # type: ignore[union-attr]


async def test_keys_of_one_batch_may_carry_different_guards(connect: Connect) -> None:
    kv = await (await connect()).kv("mgr-guard")
    claims = {p: await kv.create(f"c.{p}", b"a") for p in range(3)}
    guards = {f"w{i}": Guard(f"c.{i % 3}", claims[i % 3]) for i in range(30)}
    items = {key: b"a" for key in guards}
    await kv.put_many(items, guards=guards)
    await kv.update("c.1", b"b", revision=claims[1])  # one of the three is claimed again
    before = await kv.entries(consistent=True)
    with pytest.raises(FencedWriteError) as refused:
        await kv.put_many({key: b"stale" for key in guards}, guards=guards)
    assert set(refused.value.failed) == {"c.1"}  # which guard failed, precisely
    for size in (2, 1200):  # one atomic batch, more than one
        mixed = {f"x{i}": b"x" for i in range(size)}
        with pytest.raises(FencedWriteError):
            await kv.put_many(mixed, guard=Guard("c.0", claims[0]), guards={"x1": guards["w1"]})
    assert await kv.entries(consistent=True) == before  # nothing of any of them stored
    held = {k: g for k, g in guards.items() if g.key != "c.1"}
    await kv.put_many({key: b"fresh" for key in held}, guards=held)
    assert (await kv.get("w0", consistent=True)).value == b"fresh"  # type: ignore[union-attr]


async def test_a_guard_must_name_a_revision() -> None:
    with pytest.raises(ConfigurationError):
        Guard("c.1", -1)
    with pytest.raises(ConfigurationError):
        Guard("c.1", True)


async def test_delete_semantics(connect: Connect) -> None:
    kv = await (await connect()).kv("members", ttl_keys=True)
    await kv.delete("never-there")  # absent, no revision: nothing to do
    with pytest.raises(RevisionMismatchError):
        await kv.delete("never-there", revision=3)
    revision = await kv.create("n1", b"x", ttl=30)
    with pytest.raises(RevisionMismatchError):
        await kv.delete("n1", revision=revision + 50)
    assert await kv.get("n1") is not None
    await kv.delete("n1", revision=revision)
    assert await kv.get("n1") is None
    again = await kv.create("n1", b"y", ttl=30)  # re-create over the tombstone
    assert again > revision
    await kv.delete("n1")
    assert await kv.get("n1") is None


async def test_watch_sees_only_new_changes_in_order(connect: Connect) -> None:
    """Every change after the watch began, in revision order; nothing from before.

    A watcher may skip superseded changes of a key it has not caught up with (NATS keeps
    one message per key), but it always sees each key's latest change.
    """
    kv = await (await connect()).kv("members", ttl_keys=True)
    await kv.put("old", b"before the watch")
    async with watching(kv) as events:
        await events.none()
        r1 = await kv.create("n1", b"a")
        r2 = await kv.update("n1", b"b", revision=r1)
        r3 = await kv.put("n2", b"c")
        await kv.delete("n1", revision=r2)
        await kv.delete("old")
        seen = [await events.next()]
        while (seen[-1].op, seen[-1].key) != (KVOp.DELETE, "old"):
            seen.append(await events.next())
        await events.none()
    changes = [
        (KVOp.PUT, "n1", b"a", r1),
        (KVOp.PUT, "n1", b"b", r2),
        (KVOp.PUT, "n2", b"c", r3),
        (KVOp.DELETE, "n1", None, None),
        (KVOp.DELETE, "old", None, None),
    ]
    remaining = iter(changes)
    for event in seen:  # a subsequence of the changes, revisions where known
        assert any(
            (op, key, value) == (event.op, event.key, event.value)
            and revision in (None, event.revision)
            for op, key, value, revision in remaining
        ), f"unexpected or out-of-order event {event} in {seen}"
    assert [e.revision for e in seen] == sorted({e.revision for e in seen})
    latest = {e.key: (e.op, e.value) for e in seen}
    assert latest == {"n1": (KVOp.DELETE, None), "n2": (KVOp.PUT, b"c"), "old": (KVOp.DELETE, None)}


async def test_a_prefix_lists_counts_and_watches_only_the_keys_under_it(connect: Connect) -> None:
    """A prefix is whole tokens: ``a.`` covers ``a.x`` and ``a.b.c``, never ``ab.x`` nor
    ``a`` itself; the medium reads only those keys (:attr:`KeyValue.entries_read`)."""
    kv = await (await connect()).kv("tbl-prefix")
    await kv.put_many({"a.x": b"1", "a.b.c": b"2", "ab.x": b"3", "a": b"4", "b.a.x": b"5"})
    await kv.put("a.gone", b"6")
    await kv.delete("a.gone")
    for consistent in (False, True):
        before = kv.entries_read
        found = await kv.entries(prefix="a.", consistent=consistent)
        assert sorted(found) == ["a.b.c", "a.x"]
        assert found["a.b.c"].value == b"2"
        assert kv.entries_read - before <= 3  # the two keys, and the tombstone of a.gone
    assert sorted(await kv.entries(prefix="a.b.")) == ["a.b.c"]
    assert await kv.entries(prefix="zz.") == {}
    assert sorted(await kv.entries(prefix="")) == ["a", "a.b.c", "a.x", "ab.x", "b.a.x"]
    assert await kv.count(prefix="a.") == 2
    assert await kv.count() == 5
    for bad in ("a", ".a.", "a..", "a.*.", "a.>"):
        with pytest.raises(ConfigurationError, match="invalid key prefix"):
            await kv.entries(prefix=bad)
        with pytest.raises(ConfigurationError, match="invalid key prefix"):
            kv.watch(prefix=bad)
    async with watching(kv, prefix="a.") as events:
        await kv.put("ab.y", b"not under a.")
        await kv.put("a", b"not under a. either")
        revision = await kv.put("a.y", b"7")
        await kv.delete("a.x")
        first, second = await events.next(), await events.next()
        await events.none()
    assert (first.op, first.key, first.value, first.revision) == (KVOp.PUT, "a.y", b"7", revision)
    assert (second.op, second.key) == (KVOp.DELETE, "a.x")


async def test_two_watchers_see_the_same_changes(connect: Connect) -> None:
    one, two = await connect(node="n1"), await connect(node="n2")
    kv1, kv2 = await one.kv("members", ttl_keys=True), await two.kv("members", ttl_keys=True)
    async with watching(kv1) as events1, watching(kv2) as events2:
        revision = await kv1.create("n1", b"x", ttl=30)
        for events in (events1, events2):
            event = await events.next()
            assert (event.op, event.key, event.value, event.revision) == (
                KVOp.PUT,
                "n1",
                b"x",
                revision,
            )


async def test_ttl_expiry_is_seen_as_expire(connect: Connect) -> None:
    writer, observer = await connect(node="n1"), await connect(node="n2")
    kv = await writer.kv("members", ttl_keys=True)
    watched = await observer.kv("members", ttl_keys=True)
    async with watching(watched) as events:
        started = time.monotonic()
        await kv.create("n1", b"alive", ttl=1)
        assert (await events.next()).op is KVOp.PUT
        event = await events.next(timeout=1 + EXPIRY_SLACK + 1)
        elapsed = time.monotonic() - started
    assert (event.op, event.key, event.value) == (KVOp.EXPIRE, "n1", None)
    assert 0.9 <= elapsed <= 1 + EXPIRY_SLACK
    assert await watched.get("n1") is None
    assert "n1" not in await watched.entries()
    with pytest.raises(RevisionMismatchError):  # the old revision is gone for good
        await kv.update("n1", b"late", revision=event.revision - 1)
    reborn = await kv.create("n1", b"back", ttl=5)  # over the expiry marker
    assert reborn > event.revision
    entry = await watched.get("n1")
    assert entry is not None and entry.value == b"back"


async def test_update_with_ttl_keeps_a_key_alive(connect: Connect) -> None:
    kv = await (await connect()).kv("members", ttl_keys=True)
    revision = await kv.create("n1", b"0", ttl=1)
    async with watching(kv) as events:
        deadline = time.monotonic() + 3.0
        beat = 0
        while time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            beat += 1
            revision = await kv.update("n1", str(beat).encode(), revision=revision, ttl=1)
        ops = [(await events.next()).op for _ in range(beat)]
        assert ops == [KVOp.PUT] * beat, "a refreshed key must not expire"
        entry = await kv.get("n1")
        assert entry is not None and entry.revision == revision
        event = await events.next(timeout=1 + EXPIRY_SLACK + 1)  # stop refreshing
        assert (event.op, event.key) == (KVOp.EXPIRE, "n1")


async def test_update_without_ttl_makes_a_key_permanent(connect: Connect) -> None:
    kv = await (await connect()).kv("control", ttl_keys=True)
    revision = await kv.create("epoch", b"1", ttl=1)
    await kv.update("epoch", b"2", revision=revision)
    await asyncio.sleep(1 + EXPIRY_SLACK)
    entry = await kv.get("epoch")
    assert entry is not None and entry.value == b"2"


async def test_fractional_ttl_is_accepted(connect: Connect) -> None:
    kv = await (await connect()).kv("members", ttl_keys=True)
    revision = await kv.create("short", b"x", ttl=0.3)
    await kv.update("short", b"y", revision=revision, ttl=1.5)
    assert (await kv.get("short")) is not None


# -- request / reply ----------------------------------------------------------------------


async def test_request_reply(connect: Connect) -> None:
    server, client = await connect(node="n1"), await connect(node="n2")

    async def echo(payload: bytes) -> bytes:
        return b"echo:" + payload

    await server.serve(echo)
    assert await client.request("n1", b"hi", timeout=2) == b"echo:hi"
    replies = await asyncio.gather(*(client.request("n1", b"%d" % i, timeout=2) for i in range(50)))
    assert replies == [b"echo:%d" % i for i in range(50)]


async def test_requests_are_answered_concurrently(connect: Connect) -> None:
    server, client = await connect(node="n1"), await connect(node="n2")
    release = asyncio.Event()

    async def handler(payload: bytes) -> bytes:
        if payload == b"wait":
            await release.wait()
        else:
            release.set()
        return payload

    await server.serve(handler)
    slow = asyncio.ensure_future(client.request("n1", b"wait", timeout=2))
    assert await client.request("n1", b"go", timeout=2) == b"go"
    assert await slow == b"wait"


async def test_requests_past_the_limit_are_refused_at_once(connect: Connect) -> None:
    server, client = await connect(node="n1"), await connect(node="n2")
    release = asyncio.Event()
    refused: list[bytes] = []

    async def held(payload: bytes) -> bytes:
        await release.wait()
        return b"ran:" + payload

    def refuse(payload: bytes) -> bytes:
        refused.append(payload)
        return b"busy"

    await server.serve(held, ServeLimits(2, 1024 * 1024, refuse))
    running = [asyncio.ensure_future(client.request("n1", b"%d" % i, timeout=5)) for i in (1, 2)]
    await asyncio.sleep(0.2)  # both are running (and holding the two slots)
    started = time.monotonic()
    assert await client.request("n1", b"3", timeout=5) == b"busy"
    assert time.monotonic() - started < 1.0, "a refusal must be fast"
    assert refused == [b"3"]
    release.set()
    assert await asyncio.gather(*running) == [b"ran:1", b"ran:2"]
    assert await client.request("n1", b"4", timeout=5) == b"ran:4", "slots are given back"


async def test_request_to_nobody_fails_fast(connect: Connect) -> None:
    client = await connect(node="n2")
    started = time.monotonic()
    with pytest.raises(NoSuchNodeError):
        await client.request("ghost", b"?", timeout=5)
    assert time.monotonic() - started < 0.5


async def test_request_timeout(connect: Connect) -> None:
    server, client = await connect(node="n1"), await connect(node="n2")

    async def sleepy(payload: bytes) -> bytes:
        await asyncio.sleep(5)
        return payload

    await server.serve(sleepy)
    started = time.monotonic()
    with pytest.raises(RequestTimeoutError):
        await client.request("n1", b"zzz", timeout=0.3)
    assert 0.25 <= time.monotonic() - started < 1.5


async def test_failing_handler_gives_remote_error(connect: Connect) -> None:
    server, client = await connect(node="n1"), await connect(node="n2")

    async def broken(payload: bytes) -> bytes:
        raise ValueError("boom")

    await server.serve(broken)
    with pytest.raises(RemoteError, match="boom"):
        await client.request("n1", b"x", timeout=2)


async def test_close_stops_serving(connect: Connect) -> None:
    server, client = await connect(node="n1"), await connect(node="n2")

    async def echo(payload: bytes) -> bytes:
        return payload

    await server.serve(echo)
    assert await client.request("n1", b"x", timeout=2) == b"x"
    await server.close()
    await server.close()  # safe twice
    with pytest.raises(NoSuchNodeError):
        await client.request("n1", b"x", timeout=2)
    with pytest.raises(BackendUnavailableError):
        await server.request("n2", b"x", timeout=1)
    with pytest.raises(BackendUnavailableError):
        await server.kv("members")


# -- topics -------------------------------------------------------------------------------


async def test_publish_reaches_every_subscriber_in_order(connect: Connect) -> None:
    one, two = await connect(node="n1"), await connect(node="n2")
    got: dict[str, list[bytes]] = {"one": [], "two": []}
    done = asyncio.Event()

    def collector(name: str) -> Callable[[bytes], Awaitable[None]]:
        async def handle(payload: bytes) -> None:
            await asyncio.sleep(0)  # a handler that yields must still see messages in order
            got[name].append(payload)
            if len(got["one"]) == len(got["two"]) == 100:
                done.set()

        return handle

    await one.subscribe("news", collector("one"))
    sub = await two.subscribe("news", collector("two"))
    for i in range(100):
        await one.publish("news", b"%d" % i)
    await asyncio.wait_for(done.wait(), 3)
    assert got["one"] == got["two"] == [b"%d" % i for i in range(100)]
    await sub.close()
    await one.publish("news", b"after close")
    await asyncio.sleep(0.2)
    assert got["two"][-1] == b"99"
    assert got["one"][-1] == b"after close"


async def test_a_subscriber_that_falls_behind_a_flood_drops_past_its_bound(
    connect: Connect,
) -> None:
    publisher, subscriber = await connect(node="n1"), await connect(node="n2")
    release = asyncio.Event()
    got: list[bytes] = []

    async def slow(payload: bytes) -> None:
        await release.wait()
        got.append(payload)

    await subscriber.subscribe("flood", slow)
    body = b"x" * 4096
    sent = 2 * TOPIC_PENDING_BYTES // len(body)  # twice what the queue holds
    for _ in range(sent):
        await publisher.publish("flood", body)
    await publisher.publish("flood", b"last")
    await asyncio.sleep(0.5)
    release.set()
    await asyncio.sleep(0.5)
    assert 0 < len(got) <= TOPIC_PENDING_BYTES // len(body) + 1, len(got)
    await publisher.publish("flood", b"after")  # and the subscription still works
    await eventually(lambda: got[-1:] == [b"after"], 5, "a message after the flood")


async def test_a_failing_subscriber_keeps_receiving(connect: Connect) -> None:
    backend = await connect()
    got: list[bytes] = []

    async def flaky(payload: bytes) -> None:
        got.append(payload)
        if payload == b"bad":
            raise RuntimeError("subscriber bug")

    await backend.subscribe("t", flaky)
    for payload in (b"bad", b"good"):
        await backend.publish("t", payload)
    for _ in range(50):
        if len(got) == 2:
            break
        await asyncio.sleep(0.02)
    assert got == [b"bad", b"good"]


# -- namespacing --------------------------------------------------------------------------


async def test_clusters_never_see_each_other(connect: Connect) -> None:
    a, b = await connect(cluster="alpha", node="n1"), await connect(cluster="beta", node="n1")
    kv_a, kv_b = await a.kv("members", ttl_keys=True), await b.kv("members", ttl_keys=True)
    async with watching(kv_b) as events_b:
        await kv_a.create("n1", b"alpha's", ttl=30)
        await events_b.none()
        assert await kv_b.get("n1") is None and await kv_b.entries() == {}
        await kv_b.create("n1", b"beta's", ttl=30)  # same key, other cluster: no conflict
        assert (await events_b.next()).value == b"beta's"
    entry_a = await kv_a.get("n1")
    assert entry_a is not None and entry_a.value == b"alpha's"

    async def answer_a(payload: bytes) -> bytes:
        return b"alpha"

    await a.serve(answer_a)  # node "n1" of alpha serves; beta's "n1" does not
    other = await connect(cluster="beta", node="n2")
    with pytest.raises(NoSuchNodeError):
        await other.request("n1", b"?", timeout=1)

    heard: list[bytes] = []

    async def listen(payload: bytes) -> None:
        heard.append(payload)

    await b.subscribe("multicast", listen)
    await a.publish("multicast", b"for alpha only")
    await other.publish("multicast", b"for beta")
    await asyncio.sleep(0.2)
    assert heard == [b"for beta"]


# -- partitioned logs ---------------------------------------------------------------------


async def settles(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 3.0) -> None:
    """Wait until ``await check()`` holds (NATS applies acks asynchronously)."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout}s"
        await asyncio.sleep(0.02)


async def depth_is(log: Log, partition: int | None, value: int) -> bool:
    return await log.depth(partition) == value


async def fetch_all(consumer: LogConsumer, expected: int, batch: int = 100) -> list[LogRecord]:
    """Fetch until ``expected`` records came (or a fetch came back empty)."""
    records: list[LogRecord] = []
    while len(records) < expected:
        got = await consumer.fetch(batch, 2.0)
        if not got:
            break
        records.extend(got)
    return records


async def test_log_appends_are_fetched_in_order_per_partition(connect: Connect) -> None:
    producer, consumer = await connect(node="n1"), await connect(node="n2")
    log = await producer.log("orders", partitions=4)
    assert (log.name, log.partitions) == ("orders", 4)
    sequences = [await log.append(i % 2, b"r%d" % i) for i in range(20)]
    assert sequences == sorted(sequences) and len(set(sequences)) == 20
    theirs = await consumer.log("orders", partitions=4)
    assert await theirs.depth() == 20
    assert [await theirs.depth(p) for p in range(4)] == [10, 10, 0, 0]
    for partition in (0, 1):
        claim = await theirs.claim(partition, "n2")
        assert (claim.partition, claim.name) == (partition, "n2")
        records = await fetch_all(claim, 10, batch=3)
        assert [r.data for r in records] == [b"r%d" % i for i in range(partition, 20, 2)]
        assert [r.sequence for r in records] == sequences[partition::2]
        assert all(r.partition == partition and r.msg_id is None for r in records)
        assert all(r.deliveries >= 1 for r in records)
        assert await claim.fetch(10, 0.2) == []  # delivered once, acked or not
    empty = await theirs.claim(2, "n2")
    assert await empty.fetch(10, 0.2) == []  # partitions are isolated
    with pytest.raises(ConfigurationError):
        await log.append(4, b"no such partition")


async def test_log_ack_removes_records(connect: Connect) -> None:
    log = await (await connect()).log("acks", partitions=2)
    for i in range(6):
        await log.append(0, b"%d" % i)
    await log.append(1, b"other")
    claim = await log.claim(0, "n1")
    records = await fetch_all(claim, 6)
    assert len(records) == 6
    for record in records[:4]:
        await claim.ack(record)
    await settles(lambda: depth_is(log, 0, 2), "acked records leaving the partition")
    assert await log.depth(1) == 1 and await log.depth() == 3
    for record in records[4:]:
        await claim.ack(record)
    await settles(lambda: depth_is(log, None, 1), "the partition emptying")


async def test_log_drops_duplicate_message_ids(connect: Connect) -> None:
    one, two = await connect(node="n1"), await connect(node="n2")
    log1, log2 = await one.log("dedup", partitions=2), await two.log("dedup", partitions=2)
    first = await log1.append(0, b"payment", msg_id="pay-1")
    assert await log2.append(0, b"payment again", msg_id="pay-1") == first  # another node
    assert await log1.append(0, b"payment", msg_id="pay-1") == first
    second = await log1.append(0, b"refund", msg_id="pay-2")
    assert second > first
    assert await log1.depth(0) == 2
    claim = await log2.claim(0, "n2")
    records = await fetch_all(claim, 2)
    assert [(r.data, r.msg_id, r.sequence) for r in records] == [
        (b"payment", "pay-1", first),
        (b"refund", "pay-2", second),
    ]
    await claim.ack(records[0])
    await settles(lambda: depth_is(log1, 0, 1), "the ack")
    assert await log1.append(0, b"late retry", msg_id="pay-1") == first  # even once acked


async def test_log_partition_has_one_consumer_at_a_time(connect: Connect) -> None:
    one, two = await connect(node="n1"), await connect(node="n2")
    log1, log2 = await one.log("busy", partitions=3), await two.log("busy", partitions=3)
    await log1.claim(0, "n1")
    with pytest.raises(PartitionBusyError):
        await log2.claim(0, "n2")
    assert await log2.claimants(0) == ["n1"]
    assert await log2.claimants(1) == []
    await log2.claim(1, "n2")  # other partitions stay free
    assert await log1.claimants(1) == ["n2"]
    again = await log1.claim(0, "n1")  # a consumer may re-claim its own claim
    assert again.name == "n1" and await log1.claimants(0) == ["n1"]
    odd = "node.7=blue"  # names NATS cannot take as they are come back intact
    await log2.claim(2, odd)
    assert await log1.claimants(2) == [odd]
    with pytest.raises(PartitionBusyError):
        await log1.claim(2, "node.7")
    # every claim in one look: what claimants() says partition by partition
    assert await log2.claimed() == {0: ["n1"], 1: ["n2"], 2: [odd]}


async def test_log_release_hands_unacked_records_to_the_next_consumer(connect: Connect) -> None:
    one, two = await connect(node="n1"), await connect(node="n2")
    log1, log2 = await one.log("handoff", partitions=2), await two.log("handoff", partitions=2)
    for i in range(10):
        await log1.append(0, b"%d" % i)
    first = await log1.claim(0, "n1")
    records = await fetch_all(first, 10, batch=4)
    assert len(records) == 10
    for index in (0, 1, 2, 5):
        await first.ack(records[index])
    await first.release()
    assert await log2.claimants(0) == []
    second = await log2.claim(0, "n2")
    again = await fetch_all(second, 6)
    assert [r.data for r in again] == [b"3", b"4", b"6", b"7", b"8", b"9"]
    assert [r.sequence for r in again] == [records[i].sequence for i in (3, 4, 6, 7, 8, 9)]
    assert await second.fetch(10, 0.2) == []
    await log1.append(0, b"10")
    assert [r.data for r in await second.fetch(10, 2.0)] == [b"10"]
    with pytest.raises(PartitionBusyError):
        await first.ack(records[3])  # the released claim acknowledges nothing any more


async def test_log_evicting_a_dead_consumer_frees_its_partition(connect: Connect) -> None:
    dead, alive = await connect(node="n1"), await connect(node="n2")
    log1, log2 = await dead.log("evict", partitions=2), await alive.log("evict", partitions=2)
    for i in range(5):
        await log1.append(1, b"%d" % i)
    stale = await log1.claim(1, "n1")
    assert len(await fetch_all(stale, 5)) == 5  # delivered, never acked: then it "dies"
    with pytest.raises(PartitionBusyError):
        await log2.claim(1, "n2")
    await log2.evict(1, "n1")
    await log2.evict(1, "n1")  # evicting what is gone is harmless
    assert await log2.claimants(1) == []
    successor = await log2.claim(1, "n2")
    assert [r.data for r in await fetch_all(successor, 5)] == [b"%d" % i for i in range(5)]
    with pytest.raises(PartitionBusyError):
        await stale.fetch(10, 1.0)  # the evicted claim learns it lost the partition


async def test_log_reclaim_starts_again_from_the_oldest_unacked(connect: Connect) -> None:
    log = await (await connect()).log("reclaim", partitions=1)
    for i in range(4):
        await log.append(0, b"%d" % i)
    first = await log.claim(0, "n1")
    records = await fetch_all(first, 4)
    await first.ack(records[0])
    second = await log.claim(0, "n1")  # e.g. the node restarted under the same name
    assert [r.data for r in await fetch_all(second, 3)] == [b"1", b"2", b"3"]
    with pytest.raises(PartitionBusyError):
        await first.fetch(1, 0.2)  # the earlier claim object is superseded


async def test_log_fetch_waits_for_records_and_times_out_empty(connect: Connect) -> None:
    producer, consumer = await connect(node="n1"), await connect(node="n2")
    log = await producer.log("wait", partitions=2)
    claim = await (await consumer.log("wait", partitions=2)).claim(0, "n2")
    started = time.monotonic()
    assert await claim.fetch(10, 0.3) == []
    assert 0.25 <= time.monotonic() - started < 2.5
    await log.append(0, b"stored")
    assert [r.data for r in await claim.fetch(10, 0)] == [b"stored"]  # no wait: what is there
    waiting = asyncio.ensure_future(claim.fetch(10, 5.0))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    appended = time.monotonic()
    await log.append(0, b"late")
    assert [r.data for r in await waiting] == [b"late"]
    assert time.monotonic() - appended < 2.5  # woken by the record, not by the timeout
    # a fetch cancelled while waiting loses nothing
    cancelled = asyncio.ensure_future(claim.fetch(10, 5.0))
    await asyncio.sleep(0.1)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    await log.append(0, b"after the cancel")
    assert [r.data for r in await fetch_all(claim, 1)] == [b"after the cancel"]


async def test_log_partition_count_is_fixed(connect: Connect) -> None:
    one, two = await connect(node="n1"), await connect(node="n2")
    await one.log("fixed", partitions=4)
    with pytest.raises(ConfigurationError, match="partitions"):
        await two.log("fixed", partitions=8)
    with pytest.raises(ConfigurationError):
        await one.log("bad", partitions=0)


async def test_consistent_reads_see_the_latest_writes(connect: Connect) -> None:
    writer, reader = await connect(node="n1"), await connect(node="n2")
    kv = await writer.kv("members", ttl_keys=True)
    other = await reader.kv("members", ttl_keys=True)
    assert await other.get("missing", consistent=True) is None
    assert await other.entries(consistent=True) == {}
    revisions = {key: await kv.put(key, b"v1") for key in ("a", "b.c", "d=e", "gone")}
    revisions["a"] = await kv.update("a", b"v2", revision=revisions["a"])
    revisions["b.c"] = await kv.put("b.c", b"v3")
    await kv.delete("gone")
    await kv.create("short", b"x", ttl=1)
    listing = await other.entries(consistent=True)
    assert set(listing) == {"a", "b.c", "d=e", "short"}
    assert {k: (e.key, e.value, e.revision) for k, e in listing.items() if k != "short"} == {
        "a": ("a", b"v2", revisions["a"]),
        "b.c": ("b.c", b"v3", revisions["b.c"]),
        "d=e": ("d=e", b"v1", revisions["d=e"]),
    }
    for key, entry in listing.items():
        assert await other.get(key, consistent=True) == entry
    assert await other.get("gone", consistent=True) is None
    # After the expiry (and its marker) the key is gone from consistent reads too.
    await asyncio.sleep(1 + EXPIRY_SLACK)
    assert await other.get("short", consistent=True) is None
    assert "short" not in await other.entries(consistent=True)
    # Over a tombstone and over an expiry marker.
    await kv.create("gone", b"back")
    await kv.create("short", b"again")
    final = await other.entries(consistent=True)
    assert {k: e.value for k, e in final.items()} == {
        "a": b"v2",
        "b.c": b"v3",
        "d=e": b"v1",
        "gone": b"back",
        "short": b"again",
    }
    assert final == await other.entries()  # the default agrees once things settled
