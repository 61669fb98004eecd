"""Partition claims: the pure rule (hypothesis), and claiming by compare-and-set on a
memory bucket — concurrently, stale claimants refused, malformed records overwritten."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloister.backends import Guard, KeyValue, open_backend
from cloister.errors import FencedWriteError, WireFormatError
from cloister.manager.claims import (
    Claim,
    Claims,
    Malformed,
    PartitionsFencedError,
    Verdict,
    claim_key,
    decide,
    is_claim_key,
)
from cloister.manager.state import StateTable, Stored, storage_key

NODES = st.sampled_from(["a", "b", "c"])
EPOCHS = st.integers(min_value=0, max_value=20)
RECORDS = st.none() | st.builds(Malformed, st.text(max_size=5)) | st.builds(Claim, NODES, EPOCHS)
_worlds = itertools.count()


@given(RECORDS, NODES, EPOCHS)
def test_a_claim_never_overwrites_a_newer_epoch_nor_another_node_in_ours(
    current: Claim | Malformed | None, node: str, epoch: int
) -> None:
    verdict = decide(current, node, epoch)
    if current is None:
        assert verdict is Verdict.CREATE
    elif isinstance(current, Malformed):
        assert verdict is Verdict.OVERWRITE
    elif current.epoch > epoch or (current.epoch == epoch and current.node != node):
        assert verdict is Verdict.STALE
    else:  # older, or our own of this epoch (a new revision ends any token we dropped)
        assert verdict is Verdict.OVERWRITE


@given(st.lists(st.tuples(NODES, EPOCHS), max_size=30))
def test_claims_in_any_order_keep_the_newest_epoch_and_one_winner_per_epoch(
    attempts: list[tuple[str, int]],
) -> None:
    record: Claim | None = None
    winners: dict[int, set[str]] = {}
    for node, epoch in attempts:  # each attempt reads the record, then writes by CAS
        if decide(record, node, epoch) is not Verdict.STALE:
            assert record is None or record.epoch <= epoch  # the epoch never goes down
            record = Claim(node, epoch)
            winners.setdefault(epoch, set()).add(node)
    if attempts:
        assert record is not None and record.epoch == max(e for _, e in attempts)
    assert all(len(nodes) == 1 for nodes in winners.values()), winners


@given(st.builds(Claim, st.text(min_size=1, max_size=10), st.integers(0, 2**40)))
def test_a_claim_survives_the_wire(claim: Claim) -> None:
    assert Claim.decode(claim.encode()) == claim


@pytest.mark.parametrize(
    "data", [b"", b"\x01", b"\x81\xa4node\xa1a", b"\x82\xa4node\xa0\xa5epoch\x01"]
)
def test_a_malformed_claim_is_refused_clearly(data: bytes) -> None:
    with pytest.raises(WireFormatError):
        Claim.decode(data)


def test_claim_keys_never_collide_with_worker_keys() -> None:
    for worker_id in ["c.1", "c", 1, ("c.", 2), b"c.3", "", 0]:
        assert not is_claim_key(storage_key(worker_id))
    assert is_claim_key(claim_key(7)) and claim_key(7) == "c.7"


async def _bucket() -> KeyValue:
    backend = open_backend(f"memory://claims-{next(_worlds)}-{time.monotonic_ns()}", "t", "n")
    await backend.connect()
    return await backend.kv("mgr-x")


async def test_claiming_creates_then_updates_and_the_revision_is_the_token() -> None:
    kv = await _bucket()
    a, b = Claims(kv, "a"), Claims(kv, "b")
    assert await a.claim(range(4), epoch=1) == set()
    tokens = a.tokens
    assert sorted(tokens) == [0, 1, 2, 3]
    for partition, token in tokens.items():
        entry = await kv.get(claim_key(partition))
        assert entry is not None and entry.revision == token
        assert Claim.decode(entry.value) == Claim("a", 1)
    assert await a.claim(range(4), epoch=2) == set()  # kept: no round trip, same tokens
    assert a.tokens == tokens
    assert await b.claim({2, 3}, epoch=2) == set()  # b takes two in a newer epoch
    assert a.guard(2) is not None and b.guard(2) is not None
    with pytest.raises(FencedWriteError):  # a's guard no longer holds at the medium
        await kv.put("w", b"stale", guard=a.guard(2))
    await kv.put("w", b"fresh", guard=b.guard(2))
    # a stale claimant is refused, and its token for those partitions is not made up
    a.keep_only({0, 1})
    assert await a.claim({0, 1, 2, 3}, epoch=1) == {2, 3}
    assert sorted(a.tokens) == [0, 1]


async def test_two_nodes_claiming_at_once_in_one_epoch_get_one_winner_each() -> None:
    kv = await _bucket()
    a, b = Claims(kv, "a"), Claims(kv, "b")
    denied_a, denied_b = await asyncio.gather(
        a.claim(range(16), epoch=5), b.claim(range(16), epoch=5)
    )
    assert denied_a | denied_b == set(range(16))  # every partition claimed by one of them
    assert not denied_a & denied_b
    assert set(a.tokens) == set(range(16)) - denied_a
    assert set(b.tokens) == set(range(16)) - denied_b


async def test_a_malformed_claim_is_overwritten_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kv = await _bucket()
    await kv.put(claim_key(3), b"\xc1 not msgpack")
    claims = Claims(kv, "a")
    with caplog.at_level(logging.WARNING, "cloister.manager.claims"):
        assert await claims.claim({3}, epoch=1) == set()
        await kv.put(claim_key(3), b"\xc1 again")
        claims.clear()
        assert await claims.claim({3}, epoch=2) == set()
    assert caplog.text.count("malformed claim c.3") == 1
    entry = await kv.get(claim_key(3))
    assert entry is not None and Claim.decode(entry.value) == Claim("a", 2)


async def test_the_state_table_does_not_load_claims_as_workers() -> None:
    kv = await _bucket()
    await Claims(kv, "a").claim(range(8), epoch=1)
    await kv.put(storage_key("w1"), Stored("w1", None, 5, True).encode())
    table = StateTable(kv)
    await table.load()
    assert list(table.mirror) == ["w1"] and table.bad_records == 0


class ByPartition:
    """A fencing over ``claims`` with worker ``kN`` in partition ``N % 4``."""

    def __init__(self, claims: Claims) -> None:
        self.claims = claims
        self.refusals: list[tuple[int, int]] = []

    def guard_of(self, worker_id: Any) -> tuple[int, Guard | None]:
        partition = int(worker_id[1:]) % 4
        return partition, self.claims.guard(partition)

    def refused(self, partition: int, guard: Guard, records: int) -> None:
        self.refusals.append((partition, records))


async def test_a_flush_over_many_partitions_drops_only_the_refused_ones() -> None:
    kv = await _bucket()
    mine = ByPartition(Claims(kv, "a"))
    await mine.claims.claim(range(3), epoch=1)  # partition 3 is not claimed here at all
    assert await Claims(kv, "b").claim({1}, epoch=2) == set()  # b took partition 1 over
    table = StateTable(kv, mine)
    for i in range(12):
        table.mark(Stored(f"k{i}", None, i, True))
    with pytest.raises(PartitionsFencedError) as refused:
        await table.flush()
    assert refused.value.partitions == {1, 3} and refused.value.unavailable is None
    assert mine.refusals == [(1, 3)]  # refused by the medium: reported once, 3 records
    await table.load()
    assert sorted(table.mirror) == sorted(f"k{i}" for i in range(12) if i % 4 in (0, 2))
    assert not table.dirty  # nothing queued again: refused and unclaimed are dropped
