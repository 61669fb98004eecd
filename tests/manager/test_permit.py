"""Work is checked against the lease when it happens (the engine's permit): nothing
starts after the lease ran out, and a result that comes back too late is discarded —
not applied, not acked, not stored — so a paused process cannot undo the new owner."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from typing import Any

import pytest

from cloister import DynamicManager, Ok
from cloister.cluster import State
from cloister.errors import FencedError, RemoteError
from cloister.manager.responses import Replace
from tests._support.nodes import ClusterNodes
from tests._support.timing import FAST

from ._standalone import until
from .test_engine import FakeInbox, add, callbacks, engine, record


class Lease:
    def __init__(self, seconds: float) -> None:
        self.lease_until = time.monotonic() + seconds


async def test_nothing_starts_after_the_lease_ran_out_and_it_resumes_when_renewed() -> None:
    inbox = FakeInbox()
    handled: list[Any] = []

    def handle_cast(message: Any, _id: Any, payload: Any) -> Any:
        handled.append(message)
        return Replace(payload + 1)

    forgotten: list[int] = []
    ports = inbox.ports()
    ports.forget = forgotten.append
    async with engine(callbacks(handle_cast=handle_cast), ports) as eng:
        lease = Lease(-1.0)  # already run out
        eng.permit = lease
        await add(eng, "a", timeout=0, payload=0)
        eng.deliver_record(record("a", "one", 1), None)  # type: ignore[arg-type]
        eng.deliver_record(record("a", "two", 2), None)  # type: ignore[arg-type]
        await asyncio.sleep(0.2)
        assert handled == [] and inbox.acked == [] and inbox.marked == []
        lease.lease_until = time.monotonic() + 60  # renewed: the held work runs, in order
        await until(lambda: handled == ["one", "two"])
        await until(lambda: [s for s, _ in inbox.acked] == [1, 2])
        assert eng.counters.casts == 2 and eng.counters.late_results == 0


async def test_a_result_that_comes_back_after_the_lease_is_discarded() -> None:
    inbox = FakeInbox()
    forgotten: list[int] = []
    ports = inbox.ports()
    ports.forget = forgotten.append
    lease = Lease(60)

    async def slow(message: Any, _id: Any, payload: Any) -> Any:
        await asyncio.sleep(0.1)  # the process is paused here, say
        return Replace(payload + 1)

    async with engine(callbacks(handle_cast=slow), ports) as eng:
        eng.permit = lease
        await add(eng, "a", timeout=0, payload=0)
        eng.deliver_record(record("a", "late", 1), None)  # type: ignore[arg-type]
        await asyncio.sleep(0.02)
        lease.lease_until = time.monotonic() + 0.03  # runs out before the handler returns
        await until(lambda: eng.counters.late_results == 1)
        assert inbox.acked == [] and inbox.marked == [] and forgotten == [1]
        info = eng.info("a")
        assert info is not None and info.payload == 0  # the stale result was not applied


async def test_the_fencing_token_grows_from_one_owner_to_the_next() -> None:
    tokens: dict[str, list[tuple[str, int]]] = {}

    class Writer(DynamicManager):
        def children_specs(self) -> dict[Any, Any]:
            return {f"k{i}": {"timeout": 0.01} for i in range(40)}

        def perform(self, id: Any, payload: Any) -> Any:
            tokens.setdefault(id, []).append((self.cluster.node, self.fence))  # type: ignore[union-attr]
            return Ok(None)

    async with AsyncExitStack() as stack:
        nodes = ClusterNodes(stack, "memory://fence-token", cluster="fence-token", timing=FAST)
        for name in "ab":
            await nodes.start_manager(name, Writer)
            await until(lambda n=name: nodes.clusters[n].state is State.READY)
            await asyncio.sleep(0.1)
        await until(lambda: len(tokens) == 40)
        await asyncio.sleep(0.2)
    moved = {k: t for k, t in tokens.items() if len({n for n, _ in t}) == 2}
    assert moved, "some keys moved from a to b"
    for key, seen in moved.items():
        # in the order performed: the token never goes down, and b's is above all of a's
        assert [f for _, f in seen] == sorted(f for _, f in seen), key
        assert min(f for n, f in seen if n == "b") > max(f for n, f in seen if n == "a"), key
        assert all(f > 0 for _, f in seen)


async def test_a_handoff_from_an_older_epoch_is_refused() -> None:
    class Held(DynamicManager):
        name = "held"

        def children_specs(self) -> dict[Any, Any]:
            return {f"k{i}": {} for i in range(10)}

    async with AsyncExitStack() as stack:
        nodes = ClusterNodes(stack, "memory://handoff-epoch", cluster="handoff-epoch", timing=FAST)
        for name in "ab":
            await nodes.start_manager(name, Held)
        clusters = [nodes.clusters["a"], nodes.clusters["b"]]
        a, b = clusters
        await until(
            lambda: all(c.state is State.READY and len(c.siblings()) == 2 for c in clusters)
        )
        handler = "cloister.manager.held.handoff"
        stale = {"epoch": b.epoch - 1, "workers": [["k1", 99, [], 7]]}
        with pytest.raises(FencedError, match="refused"):
            await a.call("b", handler, stale)
        with pytest.raises(RemoteError, match="handoff"):
            await a.call("b", handler, [["k1", 99, [], 7]])  # the old, unversioned shape
        current = {"epoch": b.epoch, "workers": [["k1", 99, [], 7]]}
        assert await a.call("b", handler, current) == 1
