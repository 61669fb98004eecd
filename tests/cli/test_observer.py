"""The Observer behind ``cloister status``, on the memory backend (in one process)."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import pytest

from cloister import wire
from cloister.backends.memory import world
from cloister.observer import OBSERVER_PREFIX, Observer
from cloister.testing import eventually
from tests._support import Harness

_worlds = itertools.count()


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    async with AsyncExitStack() as stack:
        yield Harness(stack, f"observer-test-{next(_worlds)}")


async def _three(harness: Harness) -> None:
    for name in "abc":
        await harness.start(name, consensus=3)
    await eventually(lambda: harness.agreed({"a", "b", "c"}), what="a, b, c ready")


async def test_status_of_a_ready_cluster(harness: Harness) -> None:
    await _three(harness)
    a = harness.nodes["a"]
    async with Observer("test", harness.url) as observer:
        assert observer.name.startswith(OBSERVER_PREFIX)
        status = await observer.status()
    assert status.epoch is not None and status.epoch.epoch == a.epoch
    assert status.fingerprint == a.ring.fingerprint
    assert [m.node for m in status.members] == ["a", "b", "c"]
    assert all(m.state == "ready" and m.info is not None for m in status.members)
    assert sum(m.share for m in status.members) == pytest.approx(1.0)
    assert status.sentry_lease == status.epoch.sentry == a.sentry
    assert [m.node for m in status.members if m.info and m.info.is_sentry] == [a.sentry]
    doc = json.loads(json.dumps(status.to_json()))
    assert doc["epoch"] == a.epoch and doc["epoch_members"] == ["a", "b", "c"]
    assert {m["acked"] for m in doc["members"]} == {a.epoch}
    assert "observer" not in " ".join(a.siblings())  # an observer never becomes a member


async def test_a_dead_member_is_reported_not_fatal(harness: Harness) -> None:
    await _three(harness)
    async with Observer("test", harness.url, request_timeout=0.2) as observer:
        world(harness.url.split("://")[1]).crash("c")
        status = await observer.status()
        dead = {m.node: m for m in status.members}["c"]
        assert dead.state == "unreachable" and dead.error and dead.record is not None
        assert {m.state for m in status.members if m.node != "c"} <= {"ready", "rehashing"}
        a = harness.nodes["a"]
        await eventually(lambda: a.siblings() == ("a", "b"), what="c expired and removed")
        status = await observer.status()
        assert [m.node for m in status.members] == ["a", "b"]


async def test_heartbeats_are_timed_and_bad_records_reported(harness: Harness) -> None:
    await harness.start("a")
    await eventually(lambda: harness.agreed({"a"}))
    async with Observer("test", harness.url) as observer:
        await eventually(lambda: "a" in observer._last_beat, what="a heartbeat seen")
        members_kv = await harness.nodes["a"].backend.kv("members", ttl_keys=True)
        await members_kv.put("junk", b"\xc1 not msgpack")
        await (await harness.nodes["a"].backend.kv("control")).put(
            "sentry", wire.encode({"node": 42})
        )
        status = await observer.status()
    age = {m.node: m.heartbeat_age for m in status.members}["a"]
    assert age is not None and 0 <= age < 1
    assert [m.node for m in status.members] == ["a"]
    assert any("junk" in p for p in status.problems)
    assert any("sentry lease" in p for p in status.problems)


async def test_a_cluster_without_members() -> None:
    async with Observer("nobody", "memory://observer-empty") as observer:
        status = await observer.status()
    assert status.members == () and status.live == () and status.epoch is None
    assert status.to_json()["members"] == []
