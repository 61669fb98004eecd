"""``Client`` on both backends: casts reach the inbox and calls the owner, and the cluster
never notices the client (no member record, no epoch change, never the sentry)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import pytest

from cloister import Client, DynamicManager, Ok, Replace
from cloister.cluster import State
from cloister.errors import (
    ClusterNotReadyError,
    InvalidIdError,
    MessageTooLargeError,
    NotRunningError,
    UnknownHandlerError,
    UnknownManagerError,
    UnknownWorkerError,
)
from cloister.testing import NatsServer, eventually
from tests._support.nodes import ClusterNodes
from tests._support.timing import MEMORY, NATS

KEYS = [f"k{i}" for i in range(12)]


class Ledger(DynamicManager):
    """Each worker keeps the list of messages it was cast; a call returns it."""

    name = "ledger"
    partitions = 16  # not the default: a client must read it from the class
    executor = "loop"

    def children_specs(self) -> dict[Any, Any]:
        return {key: {"payload": []} for key in KEYS}

    def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        return Replace([*payload, message])

    def handle_call(self, message: Any, id: Any, payload: Any) -> Any:
        return Ok(payload if message == "history" else [id, message])


class Idle(DynamicManager):
    """A manager no node runs."""


@pytest.fixture(params=["memory", "nats"])
async def url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    if request.param == "memory":
        yield f"memory://client-{secrets.token_hex(3)}"
    else:
        server: NatsServer = request.getfixturevalue("nats_server")
        yield server.url


async def _ledger_cluster(stack: AsyncExitStack, url: str, nodes: str = "ab") -> ClusterNodes:
    timing = NATS if url.startswith("nats://") else MEMORY
    cluster = ClusterNodes(stack, url, cluster="shop", timing=timing)
    for node in nodes:
        await cluster.start_manager(node, Ledger)
    names = set(nodes)
    await eventually(lambda: cluster.agreed(names), 20, f"nodes {names} agree")
    await eventually(
        lambda: all(m.state == "up" for m in cluster.managers.values()), 20, "managers up"
    )
    return cluster


async def test_casts_and_calls_reach_the_owner_and_the_cluster_never_notices(url: str) -> None:
    async with AsyncExitStack() as stack:
        nodes = await _ledger_cluster(stack, url)
        epoch = nodes.clusters["a"].epoch
        async with Client("shop", backend=url) as client:
            for n in range(20):  # by name, then by class: the same manager
                await client.cast("ledger" if n % 2 else Ledger, KEYS[n % 4], n)
            ids = await client.cast_many(Ledger, [(KEYS[5], n) for n in range(30)])
            assert len(set(ids)) == 30  # one generated message id per cast

            async def history(key: str) -> Any:
                return await client.call("ledger", key, "history")

            for k in range(4):
                expected = list(range(k, 20, 4))
                await eventually(lambda k=k, e=expected: _equal(history(KEYS[k]), e), 10)
            await eventually(lambda: _equal(history(KEYS[5]), list(range(30))), 10)
            assert await client.call(Ledger, KEYS[7], "hi") == [KEYS[7], "hi"]

            members = await client.members()
            assert sorted(members) == ["a", "b"]
            status = (await client.status()).to_json()
            assert sorted(m["node"] for m in status["members"]) == ["a", "b"]
            assert status["epoch"] == epoch and status["sentry"] in ("a", "b")
            assert status["sentry_lease"] in ("a", "b")
        for cluster in nodes.clusters.values():
            assert cluster.epoch == epoch and cluster.state is State.READY
            assert sorted(cluster.siblings()) == ["a", "b"]


async def _equal(answer: Any, expected: Any) -> bool:
    return bool(await answer == expected)


async def test_typed_errors(url: str) -> None:
    async with AsyncExitStack() as stack:
        await _ledger_cluster(stack, url, "a")
        async with Client("shop", backend=url) as client:
            with pytest.raises(UnknownWorkerError, match="nope"):
                await client.call(Ledger, "nope", "history")
            with pytest.raises(UnknownManagerError, match="'Missing'"):
                await client.call("Missing", "k1", "history")  # never creates its inbox
            with pytest.raises(UnknownManagerError, match="'Missing'"):
                await client.cast("Missing", "k1", "lost?")
            with pytest.raises(UnknownHandlerError, match="'Idle'"):
                await client.call(Idle, "k1", "history", timeout=0.5)  # no node runs it
            with pytest.raises(InvalidIdError):
                await client.cast(Ledger, 8.0, "float ids are no ids")
            with pytest.raises(InvalidIdError):
                await client.call(Ledger, True, "nor bools")
            if url.startswith("nats://"):
                with pytest.raises(MessageTooLargeError):
                    await client.cast(Ledger, "k1", b"x" * 2_000_000)
                with pytest.raises(MessageTooLargeError):  # checked before any is sent
                    await client.cast_many(Ledger, [("k2", 1), ("k1", b"x" * 2_000_000)])
        async with Client("empty", backend=url) as client:
            with pytest.raises(ClusterNotReadyError, match="no epoch"):
                await client.call(Ledger, "k1", "history", timeout=0.3)
        with pytest.raises(NotRunningError):
            await client.call(Ledger, "k1", "history")


async def test_a_repeated_msg_id_is_stored_once(url: str) -> None:
    async with AsyncExitStack() as stack:
        await _ledger_cluster(stack, url, "a")
        async with Client("shop", backend=url) as client:
            first = await client.cast(Ledger, "k3", "once", msg_id="order-17")
            assert first == "order-17"
            await client.cast(Ledger, "k3", "once", msg_id="order-17")
            await client.cast_many(Ledger, [("k3", "once", "order-17"), ("k3", "then")])
            await eventually(
                lambda: _equal(client.call(Ledger, "k3", "history"), ["once", "then"]), 10
            )


async def test_calls_follow_a_handoff(url: str) -> None:
    async with AsyncExitStack() as stack:
        nodes = await _ledger_cluster(stack, url, "a")
        async with Client("shop", backend=url) as client:
            for key in KEYS:
                assert await client.call(Ledger, key, "x") == [key, "x"]
            await nodes.start_manager("b", Ledger)
            await eventually(lambda: nodes.agreed({"a", "b"}), 20, "b joined")
            # The client's epoch is behind now: owners that moved answer "not mine".
            for key in KEYS:
                assert await client.call(Ledger, key, "y") == [key, "y"]
            owners = {nodes.managers["a"].owner_of(key) for key in KEYS}
            assert owners == {"a", "b"}


class Volatile(Ledger):
    """``durable = False``: casts go straight to the owner's mailbox, not through an inbox."""

    name = "volatile"
    durable = False


async def test_a_cast_to_a_manager_without_inbox_goes_to_the_owner() -> None:
    url = f"memory://client-{secrets.token_hex(3)}"
    async with AsyncExitStack() as stack:
        nodes = ClusterNodes(stack, url, cluster="shop", timing=MEMORY)
        for node in "ab":
            await nodes.start_manager(node, Volatile)
        await eventually(lambda: nodes.agreed({"a", "b"}), 20, "a and b agree")
        async with Client("shop", backend=url) as client:
            assert await client.cast(Volatile, "k1", "direct") == ""  # nothing stored
            await eventually(lambda: _equal(client.call(Volatile, "k1", "history"), ["direct"]), 10)
