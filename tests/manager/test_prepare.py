"""Inbox partitions claimed ahead of the settle (``PartitionConsumers.prepare``).

A node that adopts an epoch claims its new partitions as soon as their previous holders
give them up, so that the settle only starts fetching. What must hold: a member's claim
is never taken ahead (the handoff barrier has not passed), a non-member's is; nothing is
delivered before the settle takes the partition; a prepared claim evicted meanwhile is
claimed anew, never adopted dead; claims prepared for an epoch that moved on are given up.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest

from cloister._tasks import Supervisor
from cloister.backends import Log, LogConsumer, open_backend
from cloister.backends.base import Entry
from cloister.manager.consumer import PartitionConsumers, claimant_name, claimant_node
from cloister.manager.state import StateTable
from cloister.store.inbox import Inbox, InboxMessage
from cloister.testing import eventually

PARTITIONS = 4
_worlds = itertools.count()

Make = Callable[[str], Any]


class Node:
    """One node's partition consumers, and what they delivered."""

    def __init__(self, consumers: PartitionConsumers, inbox: Inbox, log: Log) -> None:
        self.consumers = consumers
        self.inbox = inbox
        self.log = log
        self.delivered: list[InboxMessage] = []

    async def put(self, partition: int) -> None:
        """Store a message for a key of ``partition``."""
        key = next(
            k for i in itertools.count() if self.inbox.partition_of(k := f"k{i}") == partition
        )
        await self.inbox.put(key, "hello")

    @property
    def claimant(self) -> str:
        return self.consumers.claimant

    async def holders(self, partition: int) -> list[str]:
        return await self.log.claimants(partition)


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    url = f"memory://prepare-{next(_worlds)}"
    async with AsyncExitStack() as stack:

        async def start(node: str) -> Node:
            backend = open_backend(url, "prep", node)
            await backend.connect()
            stack.push_async_callback(backend.close)
            supervisor = Supervisor(node)
            stack.push_async_callback(supervisor.close)
            inbox = Inbox(backend, "m", partitions=PARTITIONS)
            await inbox.open()
            assert inbox.log is not None
            made: Node

            def deliver(message: InboxMessage, consumer: LogConsumer) -> None:
                made.delivered.append(message)

            consumers = PartitionConsumers(
                inbox, node, deliver, supervisor, claimant=claimant_name(node, 1)
            )
            made = Node(consumers, inbox, inbox.log)
            return made

        yield start


async def test_a_members_claim_is_waited_for_and_nothing_is_fetched_before_the_take(
    make: Make,
) -> None:
    a, b = await make("a"), await make("b")
    await a.consumers.take({0, 1})
    await b.put(1)
    await b.consumers.prepare({1, 3}, members={"a", "b"})
    # 3 is free: once b holds it, b has looked at 1 too (one listing for all of them)
    await eventually(lambda: b.holders(3), what="b claims the free partition 3")
    assert await b.holders(1) == [a.claimant]  # a member's claim is not taken ahead
    await a.consumers.release({1})
    await eventually(lambda: b.holders(1), what="b claims partition 1 once a gave it up")
    assert await b.holders(1) == [b.claimant]
    assert b.consumers.partitions == set() and b.delivered == []  # claimed, not fetched
    assert await b.consumers.take({1}) == 1  # 3 is not ours after all: given up
    assert b.consumers.partitions == {1} and await b.holders(1) == [b.claimant]
    assert await b.holders(3) == []
    await eventually(lambda: len(b.delivered) == 1, what="the record delivered after the take")


async def test_giving_one_prepared_partition_up_keeps_the_members_claims(make: Make) -> None:
    a, b = await make("a"), await make("b")
    await a.consumers.take({0, 1})
    await b.consumers.prepare({0, 1, 3}, members={"a", "b"})
    await eventually(lambda: b.holders(3), what="b claims the free partition 3")
    await b.consumers.release({3})  # (the preparing goes on for 0 and 1)
    await a.consumers.release({0})

    async def claimed_by_b() -> bool:
        return await b.holders(0) == [b.claimant]

    await eventually(claimed_by_b, what="b claims 0 once a gave it up")
    assert await b.holders(1) == [a.claimant]  # still a member's: never evicted ahead


async def test_a_claim_of_a_node_the_epoch_left_out_is_evicted_ahead(make: Make) -> None:
    gone, b = await make("gone"), await make("b")
    await gone.consumers.take({2})
    await b.consumers.prepare({2}, members={"a", "b"})

    async def claimed_by_b() -> bool:
        return await b.holders(2) == [b.claimant]

    await eventually(claimed_by_b, what="the claim of a node outside the epoch evicted")
    assert await b.consumers.take({2}) == 1


async def test_a_prepared_claim_evicted_meanwhile_is_claimed_anew(make: Make) -> None:
    b = await make("b")
    await b.consumers.prepare({3}, members={"b"})
    await eventually(lambda: b.holders(3), what="partition 3 prepared")
    # A node still settling an older epoch takes the partition (rightly, from its view).
    await b.log.evict(3, b.claimant)
    await b.put(3)
    assert await b.consumers.take({3}) == 1
    assert await b.holders(3) == [b.claimant]
    await eventually(lambda: len(b.delivered) == 1, what="the new claim delivers")


async def test_claims_prepared_for_an_epoch_that_moved_on_are_given_up(make: Make) -> None:
    b = await make("b")
    await b.consumers.prepare({0, 1}, members={"b"})
    await eventually(lambda: b.consumers.held_or_wanted == {0, 1}, what="both prepared")

    async def both_claimed() -> bool:
        return all([await b.holders(0), await b.holders(1)])

    await eventually(both_claimed, what="both claimed")
    await b.consumers.prepare({1}, members={"b"})  # the next epoch moves 0 away
    assert await b.holders(0) == [] and await b.holders(1) == [b.claimant]
    await b.consumers.release({1})  # suspended, or leaving: everything goes
    assert await b.holders(1) == [] and b.consumers.held_or_wanted == set()
    b.consumers.reset()  # nothing held or wanted: allowed


def test_claimant_names_name_their_node() -> None:
    assert claimant_node(claimant_name("node.7", 0x1234)) == "node.7"
    assert claimant_node("n2") is None and claimant_node("n.xyz") is None


class _Listing:
    """A bucket whose replica listing lags behind its leader's."""

    def __init__(self, replica: int, leader: int) -> None:
        self.revisions = {False: replica, True: leader}
        self.asked: list[bool] = []

    async def entries(self, *, consistent: bool = False, prefix: str = "") -> dict[str, Entry]:
        self.asked.append(consistent)
        return {"c.0": Entry("c.0", b"claim", self.revisions[consistent])}


@pytest.mark.parametrize(
    ("seen", "asked", "source"),
    [
        (None, [True], "leader"),
        (0, [False], "replica"),
        (3, [False], "replica"),
        (5, [False, True], "leader, a replica lagged"),
    ],
)
async def test_a_state_load_reads_a_replica_only_if_it_holds_our_claim(
    seen: int | None, asked: list[bool], source: str
) -> None:
    kv = _Listing(replica=3, leader=5)
    table = StateTable(kv)  # type: ignore[arg-type]
    assert await table.load(seen=seen) == set()
    assert kv.asked == asked and table.loaded_from == source
