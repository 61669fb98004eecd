"""Members authenticated (issue 13, item 7), on the memory backend.

A cluster with a secret seals every record it writes and every internal request; a
client of the same medium without the secret can neither join, call internal handlers,
nor forge records: what it writes is refused at the one decode boundary, counted by kind
once, logged once, and the cluster goes on. Without a secret, the bytes are as before.
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from typing import Any

import msgpack
import pytest

from cloister import schema
from cloister.backends import Backend, open_backend
from cloister.cluster.control import EPOCH_KEY, SENTRY_KEY, decode_sentry
from cloister.cluster.rpc import decode_reply, encode_request
from cloister.errors import ConfigurationError, WireFormatError
from cloister.schema import Keyring, UnauthenticatedRecordError
from cloister.store.inbox import Inbox
from cloister.store.table_keys import encode_table_key
from cloister.testing import eventually
from tests._support.nodes import ClusterNodes
from tests._support.timing import MEMORY
from tests.hostile.support import exported, member
from tests.hostile.test_control_plane import IDS, nodes, still_heals
from tests.manager.test_fencing import Tally

SECRET = "correct horse battery staple"
__all__ = ["nodes"]  # the fixture: memory nodes of cluster "hostile"


async def outsider(nodes: ClusterNodes, stack: AsyncExitStack) -> Backend:
    """A client of the same medium without the secret (what an attacker has)."""
    backend = open_backend(nodes.url, "hostile", "mallory")
    await backend.connect()
    stack.push_async_callback(backend.close)
    return backend


def unauthenticated(nodes: ClusterNodes, kind: str) -> list[int]:
    return [c.counters.unauthenticated.get(kind, 0) for c in nodes.live()]


async def test_every_record_of_a_sealed_cluster_is_sealed(nodes: ClusterNodes) -> None:
    a = await nodes.start_manager("a", Tally, secret=SECRET)
    b = await nodes.start_manager("b", Tally, secret=SECRET)
    await eventually(lambda: nodes.agreed({"a", "b"}), what="a and b agree")
    table = await a.cluster.table("prices")
    await table.put("apple", {"eur": 3})
    assert await (await b.cluster.table("prices")).get("apple") == {"eur": 3}
    for n, manager in enumerate((a, b)):
        await manager.cast(IDS[n], n)
    await eventually(lambda: a.cluster.whois(IDS[0], manager=Tally) is not None)

    async def handled() -> bool:
        for n, key in enumerate(IDS[:2]):
            worker = nodes.managers[a.cluster.whois(key, manager=Tally)].get(key)
            if worker is None or n not in worker.payload:
                return False
        return True

    await eventually(handled, what="both casts handled")
    world = nodes.world
    state = world.bucket("hostile", "mgr-tally").items
    await eventually(lambda: any(key.startswith("w") for key in state), what="a stored worker")
    stored = 0
    for bucket in ("members", "control", "mgr-tally", "tbl-prices"):
        for key, item in world.bucket("hostile", bucket).items.items():
            assert item.value[:1] == b"\xc1", f"{bucket}/{key} is not sealed"
            stored += 1
    assert stored >= 2 + 2 + 1 + 1
    reply = await b.cluster.call("a", "cloister.ping", None)
    assert reply == "pong"  # requests between members are sealed and answered
    assert all(count == 0 for c in nodes.live() for count in c.counters.unauthenticated.values())


async def test_without_a_secret_the_bytes_are_as_before(nodes: ClusterNodes) -> None:
    a = await nodes.start_cluster("a")
    await eventually(lambda: nodes.agreed({"a"}))
    item = nodes.world.bucket("hostile", "members").items["a"]
    record = schema.decode(schema.MEMBER, item.value)
    fields = {
        "node": "a",
        "inc": record.inc,
        "weight": 1.0,
        "groups": [],
        "started_at": record.started_at,
        "acked": record.acked,
        "state": record.state,
        "ttl": MEMORY.failure_timeout,
    }
    assert item.value == msgpack.packb(fields, use_bin_type=True)  # what 0.1 wrote
    assert a.keyring.signing is False


async def test_rotation_first_secret_signs_all_verify(nodes: ClusterNodes) -> None:
    # step 1 of a rotation: every node accepts both, some already sign with the new one
    a = await nodes.start_manager("a", Tally, secret="old,new")
    b = await nodes.start_manager("b", Tally, secret=["new", "old"])
    await eventually(lambda: nodes.agreed({"a", "b"}), what="a and b agree")
    await b.cast(IDS[0], "x")
    await eventually(
        lambda: "x" in (nodes.managers[a.cluster.whois(IDS[0], manager=Tally)].get(IDS[0]).payload)
    )
    assert all(not c.counters.unauthenticated for c in nodes.live())


@pytest.mark.parametrize("secret", [None, "another secret"])
async def test_a_node_without_the_secret_cannot_join(
    nodes: ClusterNodes, secret: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(schema.SECRET_ENV, raising=False)
    await nodes.start_manager("a", Tally, secret=SECRET)
    await nodes.start_manager("b", Tally, secret=SECRET)
    await eventually(lambda: nodes.agreed({"a", "b"}))
    with pytest.raises(ConfigurationError, match="cannot join cluster 'hostile'"):
        await nodes.start_cluster("c", secret=secret)
    assert "c" not in nodes.world.bucket("hostile", "members").items
    assert nodes.agreed({"a", "b"})


async def test_a_node_with_a_secret_does_not_join_a_cluster_without(nodes: ClusterNodes) -> None:
    await nodes.start_cluster("a")
    await eventually(lambda: nodes.agreed({"a"}))
    with pytest.raises(ConfigurationError, match="has a secret they do not share"):
        await nodes.start_cluster("b", secret=SECRET)


async def test_the_secret_comes_from_the_environment(
    nodes: ClusterNodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(schema.SECRET_ENV, f"{SECRET}, older")
    a = await nodes.start_cluster("a")
    assert a.keyring.signing
    item = nodes.world.bucket("hostile", "members").items["a"]
    assert schema.decode(schema.MEMBER, item.value, Keyring([SECRET])).node == "a"
    assert schema.decode(schema.MEMBER, item.value, Keyring(["older", SECRET])).node == "a"


async def test_forged_records_and_requests_are_refused_counted_and_logged_once(
    nodes: ClusterNodes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cloister.schema")
    a = await nodes.start_manager("a", Tally, secret=SECRET)
    b = await nodes.start_manager("b", Tally, secret=SECRET)
    await eventually(lambda: nodes.agreed({"a", "b"}))
    called: list[Any] = []
    for cluster in (a.cluster, b.cluster):
        cluster.handle("probe")(called.append)
    async with AsyncExitStack() as stack:
        mallory = await outsider(nodes, stack)
        members = await mallory.kv("members", ttl_keys=True)
        control = await mallory.kv("control", ttl_keys=True)
        # a well-formed member record, with a TTL, in its own name: still no member
        await members.create("mallory", member("mallory", ttl=60.0), ttl=60)
        # an epoch record naming only mallory, and a sentry lease without TTL
        epoch = schema.encode(schema.EPOCH, {"epoch": 99, "sentry": "mallory", "members": {}})
        current = await control.get(EPOCH_KEY)
        assert current is not None
        await control.update(EPOCH_KEY, epoch, revision=current.revision)
        await control.put(SENTRY_KEY, schema.encode(schema.SENTRY, {"node": "mallory"}))
        # an inbox record for a worker, and a table value
        inbox = Inbox(mallory, "tally", partitions=a.inbox.partitions)
        await inbox.open()
        await inbox.put(IDS[0], "forged")
        table = await mallory.kv("tbl-prices")
        await table.put(encode_table_key("apple"), schema.encode(schema.TABLE, "free"))
        # internal handlers: a plain envelope is refused, the handler never runs
        reply = await mallory.request("a", encode_request("probe", "hi", "mallory"), timeout=2)
        result = decode_reply("a", reply)
        assert isinstance(result.error, WireFormatError)  # sealed: mallory cannot read it
        replies = await mallory.request("b", encode_request("probe", "hi", "mallory"), timeout=2)
        assert decode_reply("b", replies, Keyring([SECRET])).error is not None

        controls = nodes.world.bucket("hostile", "control").items

        def repaired() -> bool:
            sentry, epoch_record = controls.get(SENTRY_KEY), controls.get(EPOCH_KEY)
            return (
                sentry is not None
                and epoch_record is not None
                and decode_sentry(sentry.value, Keyring([SECRET])) in ("a", "b")
                and schema.decode(schema.EPOCH, epoch_record.value, Keyring([SECRET])).sentry
                in ("a", "b")
            )

        await eventually(repaired, timeout=10, what="the sentry overwrote the forgeries")
        await eventually(
            lambda: any(n >= 1 for n in unauthenticated(nodes, "inbox")), what="inbox refused"
        )
        letters = await a.dead_letters()
        assert any("not written by a member" in letter.reason for letter in letters)
        worker = nodes.managers[a.cluster.whois(IDS[0], manager=Tally)].get(IDS[0])
        assert worker is None or "forged" not in worker.payload
        with pytest.raises(UnauthenticatedRecordError):
            await (await a.cluster.table("prices")).get("apple")
        assert called == []
        for kind in ("member", "epoch", "sentry", "request"):
            assert max(unauthenticated(nodes, kind)) >= 1, kind
        # each record once, however often the watches and listings read it again
        assert max(unauthenticated(nodes, "member")) == 1
        await still_heals(nodes, [a, b], {"a", "b"}, secret=SECRET)
        assert max(unauthenticated(nodes, "member")) == 1
        assert "mallory" not in set(a.cluster.siblings())
    warned = [r for r in caplog.records if "unauthenticated member record" in r.getMessage()]
    assert 1 <= len(warned) <= 3  # once per node that read it (a, b, c)


async def test_unauthenticated_records_are_exported_by_kind(nodes: ClusterNodes) -> None:
    a = await nodes.start_cluster("a", secret=SECRET)
    async with AsyncExitStack() as stack:
        mallory = await outsider(nodes, stack)
        members = await mallory.kv("members", ttl_keys=True)
        await members.put("mallory", member("mallory", ttl=60.0))
        await members.put("mallory", member("mallory", ttl=60.0, inc=8))  # another record
        await eventually(lambda: a.counters.unauthenticated.get("member", 0) == 2)
    unauthenticated = exported(a, "unauthenticated_records")
    assert (unauthenticated("member"), unauthenticated("inbox")) == (2, 0)
    assert a.counters.malformed.get("member", 0) == 0  # counted once, as unauthenticated
