"""A control plane that heals (issue 13, item 2), on the memory backend.

Each test writes one malformed record into the ``members`` or ``control`` bucket through
the backend's KV API, as anybody with access to the medium could, and checks that the
cluster keeps converging, that a node started afterwards joins, that casts are still
handled where a manager runs, and that the bad record was counted by kind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import msgpack
import pytest

from cloister import Cluster
from cloister.backends import KeyValue
from cloister.cluster.control import EPOCH_KEY, SENTRY_KEY, decode_sentry
from cloister.cluster.membership import GhostMemberError, MemberRecord
from cloister.errors import NodeDiedError, WireFormatError
from cloister.testing import eventually
from tests._support.nodes import ClusterNodes
from tests._support.timing import MEMORY
from tests.hostile.support import exported, member
from tests.manager.test_fencing import Tally

IDS = [f"k{i}" for i in range(8)]  # among Tally's workers


@pytest.fixture
async def nodes() -> AsyncIterator[ClusterNodes]:
    async with AsyncExitStack() as stack:
        url = f"memory://hostile-{time.monotonic_ns()}"
        yield ClusterNodes(stack, url, cluster="hostile", timing=MEMORY)


async def bucket(cluster: Cluster, name: str) -> KeyValue:
    return await cluster.backend.kv(name, ttl_keys=True)


async def two_ready(nodes: ClusterNodes) -> tuple[Tally, Tally]:
    a = await nodes.start_manager("a", Tally)
    b = await nodes.start_manager("b", Tally)
    await eventually(lambda: nodes.agreed({"a", "b"}), what="a and b agree")
    return a, b


async def still_heals(
    nodes: ClusterNodes, managers: list[Tally], members: set[str], **options: Any
) -> None:
    """A third node (cluster ``options``) joins, everybody agrees, and casts from every
    node are handled."""
    c = await nodes.start_manager("c", Tally, **options)
    members = members | {"c"}
    await eventually(lambda: nodes.agreed(members), timeout=10, what=f"{members} agree")
    for n, manager in enumerate([*managers, c]):
        await manager.cast(IDS[n], n)

    async def handled() -> bool:
        for n, key in enumerate(IDS[: len(managers) + 1]):
            owner = nodes.managers[c.cluster.whois(key, manager=Tally)]
            worker = owner.get(key)
            if worker is None or n not in worker.payload:
                return False
        return True

    await eventually(handled, timeout=10, what="the casts were handled")
    for cluster in nodes.live():
        assert not cluster.crashed and cluster.failure is None


def holds(
    kv: KeyValue, key: str, check: Callable[[bytes | None], bool]
) -> Callable[[], Awaitable[bool]]:
    """A probe for ``eventually``: True once ``check(value of key)`` (None when absent)."""

    async def probe() -> bool:
        entry = await kv.get(key)
        return check(None if entry is None else entry.value)

    return probe


def absent(value: bytes | None) -> bool:
    return value is None


def a_map(value: bytes | None) -> bool:
    """The value decodes as a msgpack map (a record again, not garbage)."""
    try:
        return value is not None and isinstance(msgpack.unpackb(value), dict)
    except Exception:
        return False


def malformed(nodes: ClusterNodes, kind: str) -> int:
    return max(c.counters.malformed.get(kind, 0) for c in nodes.live())


# -- the schema -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"weight": 0}, "weight"),
        ({"weight": -1.5}, "weight"),
        ({"weight": float("nan")}, "weight"),
        ({"weight": float("inf")}, "weight"),
        ({"weight": 2**60}, None),
        ({"acked": "x"}, "acked"),
        ({"acked": -1}, "acked"),
        ({"acked": True}, "acked"),
        ({"groups": [1]}, "groups"),
        ({"state": 3}, "state"),
        ({"node": ""}, "length >= 1"),
        ({"started_at": float("nan")}, "finite"),
        ({"inc": "7"}, "inc"),
    ],
)
def test_member_records_are_validated_in_one_place(changes: dict[str, Any], error: str) -> None:
    data = member("a", **changes)
    if error is None:
        assert MemberRecord.decode(data, "a").weight > 0
        return
    with pytest.raises(WireFormatError, match=error):
        MemberRecord.decode(data, "a")


def test_a_member_record_under_another_key_is_a_ghost() -> None:
    with pytest.raises(GhostMemberError, match="ghost"):
        MemberRecord.decode(member("a"), "b")
    assert MemberRecord.decode(member("a"), "a").node == "a"


def test_a_sentry_lease_must_name_somebody() -> None:
    for value in (b"\xc1", msgpack.packb({"node": ""}), msgpack.packb({"node": 3}), b"?"):
        with pytest.raises(WireFormatError):
            decode_sentry(bytes(value))


# -- the cluster ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes", [{"weight": 0}, {"acked": "x"}, {"weight": float("nan")}, {"groups": [None]}]
)
async def test_a_malformed_member_record_is_counted_and_ignored(
    nodes: ClusterNodes, changes: dict[str, Any]
) -> None:
    a, b = await two_ready(nodes)
    kv = await bucket(a.cluster, "members")
    await kv.put("evil", member("evil", **changes))
    await eventually(lambda: malformed(nodes, "member") >= 1, what="the bad record counted")
    await still_heals(nodes, [a, b], {"a", "b"})
    assert all("evil" not in c.members_seen for c in nodes.live())
    # logged once per key and revision: re-listings do not count it again
    counted = {c.node: c.counters.malformed["member"] for c in nodes.live() if c.node != "c"}
    for cluster in nodes.live():
        cluster._control.resync.set()  # the test forces a re-listing
    await asyncio.sleep(3 * MEMORY.heartbeat)
    assert {c.node: c.counters.malformed["member"] for c in nodes.live() if c.node != "c"} == (
        counted
    )


async def test_a_node_starts_while_a_malformed_member_record_is_there(
    nodes: ClusterNodes,
) -> None:
    a = await nodes.start_manager("a", Tally)
    await a.cluster.wait_ready(5)
    kv = await bucket(a.cluster, "members")
    await kv.put("evil", member("evil", acked="x"))
    b = await nodes.start_manager("b", Tally)
    await eventually(lambda: nodes.agreed({"a", "b"}), what="b joined")
    assert b.cluster.counters.malformed["member"] == 1
    await still_heals(nodes, [a, b], {"a", "b"})


async def test_a_ghost_member_is_ignored_and_deleted_by_the_sentry(
    nodes: ClusterNodes,
) -> None:
    a, b = await two_ready(nodes)
    epoch = a.cluster.epoch
    kv = await bucket(a.cluster, "members")
    await kv.put("ghost", member("a", inc=99))  # a's name, under another key
    await eventually(lambda: malformed(nodes, "ghost_member") >= 1, what="the ghost counted")
    await eventually(holds(kv, "ghost", absent), what="the sentry deleted the ghost")
    assert a.cluster.epoch == epoch == b.cluster.epoch, "a ghost made the cluster rehash"
    assert {r for c in nodes.live() for r in c.members_seen} == {"a", "b"}
    await still_heals(nodes, [a, b], {"a", "b"})


async def test_a_garbage_epoch_record_is_overwritten_by_the_sentry(
    nodes: ClusterNodes,
) -> None:
    a, b = await two_ready(nodes)
    epoch = a.cluster.epoch
    kv = await bucket(a.cluster, "control")
    await kv.put(EPOCH_KEY, b"\xc1 not msgpack")
    await eventually(lambda: malformed(nodes, "epoch") >= 1, what="the garbage counted")

    await eventually(holds(kv, EPOCH_KEY, a_map), what="the sentry overwrote the garbage")
    await eventually(
        lambda: nodes.agreed({"a", "b"}) and a.cluster.epoch > epoch, what="a newer epoch"
    )
    # no busy loop of compare-and-sets: the epoch moved on once, not without end
    settled = a.cluster.epoch
    await asyncio.sleep(5 * MEMORY.heartbeat)
    assert a.cluster.epoch == settled
    await still_heals(nodes, [a, b], {"a", "b"})


@pytest.mark.parametrize(
    "garbage", [bytes(msgpack.packb({"node": "?"})) + b"\xff", b"\xc1", msgpack.packb([1])]
)
async def test_a_garbage_sentry_lease_without_ttl_is_claimed_over(
    nodes: ClusterNodes, garbage: bytes
) -> None:
    a, b = await two_ready(nodes)
    sentry = a.cluster if a.cluster.is_sentry else b.cluster
    survivor = b.cluster if sentry is a.cluster else a.cluster
    kv = await bucket(survivor, "control")
    await nodes.managers[sentry.node].stop()
    await sentry.stop()  # the lease is free; garbage (no TTL) takes its place at once
    entry = await kv.get(SENTRY_KEY)
    if entry is None:
        await kv.create(SENTRY_KEY, bytes(garbage))
    else:
        await kv.update(SENTRY_KEY, bytes(garbage), revision=entry.revision)
    await eventually(
        lambda: survivor.counters.malformed.get("sentry", 0) >= 1, what="the garbage counted"
    )

    ours = msgpack.packb({"node": survivor.node})
    await eventually(
        holds(kv, SENTRY_KEY, lambda value: value == ours),
        what="the survivor claimed the sentry over the garbage",
    )
    await eventually(lambda: survivor.is_sentry, what="the survivor is the sentry")
    survivor_manager = nodes.managers[survivor.node]
    await still_heals(nodes, [survivor_manager], {survivor.node})


async def test_a_garbage_sentry_lease_is_replaced_while_there_is_a_holder(
    nodes: ClusterNodes,
) -> None:
    a, b = await two_ready(nodes)
    kv = await bucket(a.cluster, "control")
    entry = await kv.get(SENTRY_KEY)
    assert entry is not None
    await kv.update(SENTRY_KEY, b"\xc1", revision=entry.revision)

    await eventually(holds(kv, SENTRY_KEY, a_map), what="a valid sentry lease again")
    await eventually(lambda: a.cluster.is_sentry or b.cluster.is_sentry, what="a sentry")
    await still_heals(nodes, [a, b], {"a", "b"})


async def test_a_garbage_sentry_lease_and_epoch_start_no_sentry_fight(
    nodes: ClusterNodes,
) -> None:
    """The holder of a lease overwritten by garbage stops acting as the sentry as soon as
    its watch shows the lease at a newer revision: the member that claims over the garbage
    is then the only one publishing (once seen: two sentries, a burst of epochs)."""
    a, b = await two_ready(nodes)
    epoch = a.cluster.epoch
    kv = await bucket(a.cluster, "control")
    entry = await kv.get(SENTRY_KEY)
    assert entry is not None
    await kv.update(SENTRY_KEY, b"\xc1", revision=entry.revision)
    await kv.put(EPOCH_KEY, b"\xc1 not an epoch")

    await eventually(holds(kv, SENTRY_KEY, a_map), what="a valid sentry lease again")
    await eventually(holds(kv, EPOCH_KEY, a_map), what="a valid epoch record again")
    await eventually(lambda: nodes.agreed({"a", "b"}), what="a and b agree")
    await asyncio.sleep(5 * MEMORY.heartbeat)
    sentries = [c.node for c in nodes.live() if c.is_sentry]
    assert len(sentries) == 1, sentries
    # one claim over the garbage lease and one over the garbage epoch: a few epochs, not
    # one per turn of a fight
    assert a.cluster.epoch - epoch <= 3, (epoch, a.cluster.epoch)
    await still_heals(nodes, [a, b], {"a", "b"})


# -- a task the node cannot live without ------------------------------------------------------


async def test_a_critical_task_that_dies_stops_its_node_loudly(
    nodes: ClusterNodes, caplog: pytest.LogCaptureFixture
) -> None:
    a = await nodes.start_cluster("a")
    await a.wait_ready(5)

    with caplog.at_level(logging.ERROR, logger="cloister"):
        original = a._step
        a._step = lambda settle: _raise()  # type: ignore[assignment, method-assign]
        a._wake.set()
        failure = await asyncio.wait_for(a.wait_dead(), 5)
        a._step = original  # type: ignore[method-assign]
    assert isinstance(failure, NodeDiedError) and "control" in str(failure)
    assert a.crashed and a.failure is failure
    assert any("stops" in r.getMessage() for r in caplog.records)


async def _raise() -> float:
    raise RuntimeError("a bug on purpose")


async def test_malformed_records_are_exported_by_kind(nodes: ClusterNodes) -> None:
    a = await nodes.start_cluster("a")
    await a.wait_ready(5)
    kv = await bucket(a, "members")
    await kv.put("evil", member("evil", weight=0))
    await kv.put("ghost", member("a"))
    await eventually(lambda: a.counters.malformed.get("ghost_member", 0) == 1, what="counted")
    malformed = exported(a, "malformed_records")
    assert (malformed("member"), malformed("ghost_member"), malformed("epoch")) == (1, 1, 0)
    assert a.counters.bad_records == 2


async def test_a_member_record_without_ttl_is_outwaited_and_deleted(nodes: ClusterNodes) -> None:
    a, b = await two_ready(nodes)
    kv = await bucket(a.cluster, "members")
    await kv.put("zombie", member("zombie", inc=5))  # valid, but nobody renews it: no TTL

    await eventually(
        holds(kv, "zombie", absent), timeout=10, what="the sentry deleted the unrenewed record"
    )
    await eventually(lambda: nodes.agreed({"a", "b"}), timeout=10, what="a and b again")
    await still_heals(nodes, [a, b], {"a", "b"})


async def test_renewed_member_records_are_never_expired_by_the_sentry(
    nodes: ClusterNodes,
) -> None:
    a, _ = await two_ready(nodes)
    epoch = a.cluster.epoch
    await asyncio.sleep(12 * MEMORY.failure_timeout)  # six times the expiry bound
    assert {c.node for c in nodes.live()} == {"a", "b"}
    assert nodes.agreed({"a", "b"}) and a.cluster.epoch == epoch
