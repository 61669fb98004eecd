"""Limits checked at the API, and input that breaks them never kills or stalls a node.

Memory backend first (ids, keys that do not round-trip, records in the wrong partition,
unencodable state, malformed dead letters), then a real nats-server (an id longer than a
subject can carry, a cast at ``max_payload``, a state that outgrows it). After each attack
the node is alive and casts are still handled.
"""

from __future__ import annotations

import uuid
from contextlib import AsyncExitStack
from typing import Any

import pytest

from cloister import DynamicManager, Ok, Replace, wire
from cloister.backends.base import HEADROOM
from cloister.errors import ConfigurationError, InvalidIdError, MessageTooLargeError
from cloister.manager.spec import check_id
from cloister.store.inbox import MAX_ID_BYTES, MAX_MSG_ID_BYTES, check_worker_id
from cloister.testing import NatsServer, eventually
from tests._support.nodes import ClusterNodes

LONG_ID = "x" * 10_000
IDS: list[Any] = [8, "a", "b", ("t", 1), b"raw"]


class Sink(DynamicManager):
    """Adds up what it is cast; ``"unencodable"`` and ``("big", n)`` make bad states."""

    partitions = 8

    def children_specs(self) -> dict[Any, Any]:
        return {i: {"timeout": 0, "payload": 0} for i in IDS}

    def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        if message == "unencodable":
            return Replace({"a set": {1, 2}})
        if isinstance(message, list) and message[:1] == ["big"]:
            return Replace(b"x" * message[1])
        if isinstance(message, bytes):
            return Ok(None)  # bulk: only its size matters
        return Replace((payload if isinstance(payload, int) else 0) + message)

    def handle_call(self, message: Any, id: Any, payload: Any) -> Any:
        return Ok((id, payload))


async def one_node(stack: AsyncExitStack, url: str) -> tuple[ClusterNodes, Sink]:
    nodes = ClusterNodes(stack, url, cluster=f"lim{uuid.uuid4().hex[:6]}")
    manager = await nodes.start_manager("a", Sink)
    await eventually(lambda: len(manager) == len(IDS), 10, "every worker started")
    return nodes, manager


async def still_handles(manager: Sink, worker_id: Any = "a") -> None:
    """The node is alive and a cast is still handled (the payload moves by 1000)."""
    before = (await manager.call(worker_id, "?"))[1]
    before = before if isinstance(before, int) else 0
    await manager.cast(worker_id, 1000)

    async def moved() -> bool:
        return (await manager.call(worker_id, "?"))[1] == before + 1000

    await eventually(moved, 15, f"a cast to {worker_id!r} handled after the attack")


async def nats_node(stack: AsyncExitStack, url: str) -> tuple[ClusterNodes, Sink, int]:
    """One node on the nats-server at ``url``, and the server's ``max_payload``."""
    nodes, manager = await one_node(stack, url)
    limit = nodes.clusters["a"].backend.max_payload
    assert limit is not None  # known from the server's INFO
    return nodes, manager, limit


async def survived(nodes: ClusterNodes, manager: Sink, worker_id: Any = "a") -> None:
    """The node kept its connection, and casts are still handled."""
    assert not nodes.clusters["a"].crashed
    await still_handles(manager, worker_id)


def memory_url() -> str:
    return f"memory://limits-{uuid.uuid4().hex[:8]}"


# -- ids -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [LONG_ID, 8.0, True, 2**70, ("t", 1.0), [1], None, "\udc80" * 3, b"x" * (MAX_ID_BYTES + 1)],
)
def test_an_id_the_cluster_cannot_carry_is_refused_with_the_limit_named(bad: Any) -> None:
    with pytest.raises(InvalidIdError) as caught:
        check_id(bad)
    assert isinstance(caught.value, ConfigurationError) and isinstance(caught.value, TypeError)
    if bad is LONG_ID:
        assert str(MAX_ID_BYTES) in str(caught.value) and len(str(caught.value)) < 400


def test_ids_up_to_the_limit_pass() -> None:
    for good in ["x" * (MAX_ID_BYTES - 8), 2**64 - 1, -(2**63), ("t", 1, b"b"), "é" * 300]:
        assert check_worker_id(good) == good
        assert len(wire.encode(good)) <= MAX_ID_BYTES


async def test_the_api_refuses_bad_ids_and_the_node_goes_on() -> None:
    async with AsyncExitStack() as stack:
        _, manager = await one_node(stack, memory_url())
        for bad in (LONG_ID, 8.0, True):
            with pytest.raises(InvalidIdError):
                await manager.cast(bad, 1)
            with pytest.raises(InvalidIdError):
                await manager.call(bad, "?")
            with pytest.raises(InvalidIdError):
                await manager.put(bad)
            with pytest.raises(InvalidIdError):
                await manager.inbox.put(bad, 1)
        with pytest.raises(ConfigurationError, match=str(MAX_MSG_ID_BYTES)):
            await manager.cast("a", 1, msg_id="m" * (MAX_MSG_ID_BYTES + 1))
        await still_handles(manager)


async def test_children_specs_with_a_too_long_id_fail_the_start_clearly() -> None:
    class Bad(Sink):
        def children_specs(self) -> dict[Any, Any]:
            return {LONG_ID: {}}

    async with AsyncExitStack() as stack:
        nodes = ClusterNodes(stack, memory_url(), cluster="badspec")
        cluster = await nodes.start_cluster("a")
        with pytest.raises(InvalidIdError, match=str(MAX_ID_BYTES)):
            await Bad.start(cluster)


# -- records a hostile producer writes -------------------------------------------------------


async def test_a_float_key_is_not_coerced_to_the_int_worker() -> None:
    async with AsyncExitStack() as stack:
        _, manager = await one_node(stack, memory_url())
        inbox = manager.inbox
        assert inbox.log is not None
        await inbox.log.append(inbox.partition_of(8), wire.encode([8.0, 5, None]))
        await inbox.log.append(inbox.partition_of(1), wire.encode([True, 5, None]))

        async def parked() -> bool:
            return len(await manager.dead_letters()) == 2

        await eventually(parked, 10, "both records dead-lettered")
        letters = await manager.dead_letters()
        assert all("invalid worker id" in letter.reason for letter in letters)
        worker_id, payload = await manager.call(8, "?")
        assert payload == 0 and type(worker_id) is int  # untouched, still the int id
        await still_handles(manager, 8)
        assert await manager.replay() == 0  # nothing to put back under such a key


async def test_a_record_in_the_wrong_partition_is_dead_lettered() -> None:
    async with AsyncExitStack() as stack:
        _, manager = await one_node(stack, memory_url())
        inbox = manager.inbox
        assert inbox.log is not None
        wrong = (inbox.partition_of("a") + 1) % inbox.partitions
        for n in range(50):  # more than a fetch: they must not pile up in flight
            await inbox.log.append(wrong, wire.encode(["a", n, None]))

        async def parked() -> bool:
            return len(await manager.dead_letters()) == 50

        await eventually(parked, 15, "the misplaced records dead-lettered")
        letters = await manager.dead_letters()
        assert all("wrong partition" in letter.reason for letter in letters)
        await still_handles(manager)
        consumers = manager._region.consumers  # type: ignore[union-attr]
        await eventually(lambda: consumers.in_flight == 0, 10, "nothing left in flight")
        assert (await manager.call("a", "?"))[1] == 1000  # none of them reached the worker


async def test_malformed_dead_letters_are_skipped_not_fatal() -> None:
    async with AsyncExitStack() as stack:
        _, manager = await one_node(stack, memory_url())
        inbox = manager.inbox
        assert inbox.dead is not None
        await inbox.dead.put("garbage", b"\xc1\xc1")
        await inbox.dead.put("wrong-types", wire.encode({"attempts": "x", "at": "y"}))
        await inbox.dead.put("not-a-map", wire.encode([1, 2]))
        good = {"key": "b", "message": 7, "msg_id": None, "reason": "test", "attempts": 1}
        await inbox.dead.put("good", wire.encode({**good, "at": 1.0, "raw": None}))
        letters = await manager.dead_letters()
        assert [letter.id for letter in letters] == ["good"]
        assert inbox.bad_letters == 3
        assert await manager.replay() == 1

        async def replayed() -> bool:
            return (await manager.call("b", "?"))[1] == 7

        await eventually(replayed, 10, "the good letter replayed")
        await still_handles(manager)


# -- state that cannot be stored ----------------------------------------------------------------


async def test_an_unencodable_state_parks_its_message_and_the_node_goes_on() -> None:
    async with AsyncExitStack() as stack:
        _, manager = await one_node(stack, memory_url())
        await manager.cast("a", 5)
        await manager.cast("a", "unencodable")
        for worker_id in ("b", 8):
            await manager.cast(worker_id, 1)

        async def parked() -> bool:
            return len(await manager.dead_letters()) == 1

        await eventually(parked, 10, "the message that made the bad state parked")
        (letter,) = await manager.dead_letters()
        assert letter.key == "a" and letter.message == "unencodable"
        assert "cannot be encoded" in letter.reason
        await still_handles(manager, "a")
        assert (await manager.call("a", "?"))[1] == 1005  # went on from the stored state
        assert (await manager.call("b", "?"))[1] == 1
        assert (await manager.call(8, "?"))[1] == 1


# -- on a real nats-server ----------------------------------------------------------------------


async def test_nats_a_long_id_is_refused_before_it_reaches_the_server(
    nats_server: NatsServer,
) -> None:
    async with AsyncExitStack() as stack:
        nodes, manager = await one_node(stack, nats_server.url)
        with pytest.raises(InvalidIdError):
            await manager.cast(LONG_ID, 1)
        with pytest.raises(InvalidIdError):
            await manager.put(LONG_ID)
        longest = "y" * (MAX_ID_BYTES - 8)  # at the limit: stored, cast, handled
        await manager.put(longest, payload=0)
        await eventually(lambda: manager.get(longest) is not None, 15, "the long id started")
        await survived(nodes, manager, longest)


async def test_nats_a_cast_at_max_payload_is_refused_and_the_connection_lives(
    nats_server: NatsServer,
) -> None:
    async with AsyncExitStack() as stack:
        nodes, manager, limit = await nats_node(stack, nats_server.url)
        for size in (limit - 70, limit - 10, limit + 10):
            with pytest.raises(MessageTooLargeError, match="max_payload"):
                await manager.cast("b", b"z" * size)
        with pytest.raises(MessageTooLargeError):
            await manager.put("huge", payload=b"z" * limit)  # its spec record: refused too
        fits = limit - HEADROOM - 64  # the record's framing and key are a few bytes
        await manager.cast("b", ["big", 0], msg_id="m" * MAX_MSG_ID_BYTES)
        await manager.inbox.put("b", b"z" * fits)
        await survived(nodes, manager)


async def test_nats_a_state_outgrowing_max_payload_is_that_workers_problem(
    nats_server: NatsServer,
) -> None:
    async with AsyncExitStack() as stack:
        nodes, manager, limit = await nats_node(stack, nats_server.url)
        await manager.cast("b", 3)
        await manager.cast("b", ["big", limit])  # a small cast, a state the medium refuses
        for worker_id in (8, ("t", 1)):
            await manager.cast(worker_id, 2)

        async def parked() -> bool:
            return any(letter.key == "b" for letter in await manager.dead_letters())

        await eventually(parked, 20, "the cast that made b's state too large parked")
        letters = [x for x in await manager.dead_letters() if x.key == "b"]
        assert "not stored" in letters[0].reason and "bytes" in letters[0].reason
        assert letters[0].message == ["big", limit]
        for worker_id in (8, ("t", 1)):
            assert (await manager.call(worker_id, "?"))[1] == 2
        await survived(nodes, manager, "b")

        async def all_acked() -> bool:  # the batch is not re-queued forever
            return await manager.inbox.depth() == 0

        await eventually(all_acked, 20, "every record acked or parked")
        assert (await manager.call("b", "?"))[1] == 1003  # from the last state stored
        await still_handles(manager, 8)


async def test_nats_a_broker_message_too_large_to_park_whole_is_parked_truncated(
    nats_server: NatsServer,
) -> None:
    """A source's 2 MB message (RabbitMQ allows far more than NATS): the inbox refuses it
    by size, and its dead letter keeps the reason and the start of the body instead of
    failing to store — so the broker message is acked, not redelivered forever."""
    async with AsyncExitStack() as stack:
        nodes, manager = await one_node(stack, nats_server.url)
        body = b"{" + b"x" * 2_000_000
        with pytest.raises(MessageTooLargeError):
            await manager.inbox.put("a", body)
        letter = await manager.inbox.park_raw(
            body, "the inbox refused it: too large", source="rabbit", meta={"h": "v"}
        )
        (stored,) = [x for x in await manager.dead_letters() if x.id == letter.id]
        assert stored.source == "rabbit" and stored.raw is not None
        assert 0 < len(stored.raw) < len(body) and body.startswith(stored.raw)
        assert "too large" in stored.reason and str(len(body)) in stored.reason
        await survived(nodes, manager)


async def test_bad_state_records_do_not_stop_a_node_from_starting() -> None:
    """Records a foreign writer left in the state bucket: an id that is a float, a list
    (unhashable), a spec that does not validate, a watermark that is no number."""
    async with AsyncExitStack() as stack:
        nodes, manager = await one_node(stack, memory_url())
        kv = manager._region.table.kv  # type: ignore[union-attr]
        bad = [
            {"id": 8.0, "payload": 99, "has_payload": True},
            {"id": [1, 2], "spec": {}},
            {"id": "c", "spec": {"timeout": "soon"}},
            {"id": "d", "payload": 1, "has_payload": True, "w": "x"},
        ]
        for n, record in enumerate(bad):
            await kv.put(f"wbad{n}", wire.encode(record))
        second = await nodes.start_manager("b", Sink)
        await eventually(
            lambda: len(manager) + len(second) == len(IDS), 15, "the workers shared out"
        )
        assert second._region.table.bad_records >= 2  # type: ignore[union-attr]
        for node in (manager, second):
            await still_handles(node, 8)
        assert (await manager.call(8, "?"))[1] == 2000  # not the float record's 99
