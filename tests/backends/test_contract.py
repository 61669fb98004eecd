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

from cloister.backends import Backend, KVOp, open_backend
from cloister.errors import (
    BackendUnavailableError,
    KeyExistsError,
    NoSuchNodeError,
    RemoteError,
    RequestTimeoutError,
    RevisionMismatchError,
)
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
