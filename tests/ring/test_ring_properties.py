"""Properties of the ring, on both implementations: minimal disruption, rankings, exclusion,
history independence, and agreement between the C and the pure-Python cores."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ring_impls import (
    NAMES,
    NativeRing,
    PureRing,
    keys,
    member_sets,
    names,
    table,
    weighted_members,
    weights,
)

from cloister.ring import SLOTS

SAMPLE_KEYS = [f"foo_{i}" for i in range(400)] + list(range(100)) + [("t", i) for i in range(50)]
native_only = pytest.mark.skipif(NativeRing is None, reason="C accelerator not built")
members = member_sets.map(list) | weighted_members
slots = st.integers(min_value=0, max_value=SLOTS - 1)


def owners(ring: Any) -> list[str]:
    return [ring.key_to_node(k) for k in SAMPLE_KEYS]


def as_mapping(ring: Any) -> dict[str, float]:
    return {n: ring.weight(n) for n in ring.nodes}


@given(data=st.data(), start=members, new=names, weight=weights)
def test_add_moves_keys_only_to_the_new_node(
    ring_cls: Any, data: Any, start: Any, new: str, weight: float
) -> None:
    ring = ring_cls(start)
    if new in ring:
        return
    grown = ring.add_node(new, weight)
    for key, old, now in zip(SAMPLE_KEYS, owners(ring), owners(grown), strict=True):
        assert now in (old, new), key
    slot = data.draw(slots)
    assert grown.owner_of_slot(slot) in (ring.owner_of_slot(slot), new)


@given(start=members, data=st.data())
def test_remove_moves_only_the_removed_nodes_keys(ring_cls: Any, start: Any, data: Any) -> None:
    ring = ring_cls(start)
    gone = data.draw(st.sampled_from(ring.nodes))
    shrunk = ring.remove_node(gone)
    for key, old, now in zip(
        SAMPLE_KEYS, owners(ring), owners(shrunk) if shrunk else [], strict=False
    ):
        if old != gone:
            assert now == old, key
        else:
            assert now == ring.key_to_node(key, exclude={gone}), key


@native_only
@settings(max_examples=40, deadline=None)
@given(start=members, new=names, weight=weights)
def test_native_tables_move_minimally(start: Any, new: str, weight: float) -> None:
    ring = NativeRing(start)
    if new in ring:
        return
    grown = ring.add_node(new, weight)
    at = grown.nodes.index(new)
    before, after = table(ring), table(grown)
    for old, now in zip(before, after, strict=True):  # indices shift past the new name
        assert now == at or grown.nodes[now] == ring.nodes[old]
    assert table(grown.remove_node(new)) == before


@native_only
@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(names, weights), min_size=1, max_size=10))
def test_native_incremental_updates_equal_a_fresh_build(ops: list[tuple[str, float]]) -> None:
    ring = NativeRing([])
    for name, weight in ops:  # toggle membership: add when absent, remove when present
        ring = ring.remove_node(name) if name in ring else ring.add_node(name, weight)
        fresh = NativeRing(as_mapping(ring))
        assert table(ring) == table(fresh)
        assert ring == fresh


@given(start=members, key=keys, n=st.integers(min_value=0, max_value=10))
def test_key_to_nodes_is_a_prefix_of_the_slot_ranking(
    ring_cls: Any, start: Any, key: Any, n: int
) -> None:
    ring = ring_cls(start)
    picked = ring.key_to_nodes(key, n)
    assert len(picked) == min(n, len(ring))
    assert len(set(picked)) == len(picked)
    ranking = ring._slot_ranking(ring.slot_of(key))
    assert sorted(ranking) == list(ring.nodes)
    assert picked == ranking[:n]
    assert ranking[0] == ring.key_to_node(key) == ring.owner_of_slot(ring.slot_of(key))


@given(start=members, key=keys, data=st.data())
def test_removing_a_node_keeps_the_order_of_the_others(
    ring_cls: Any, start: Any, key: Any, data: Any
) -> None:
    ring = ring_cls(start)
    gone = data.draw(st.sampled_from(ring.nodes))
    full = ring.key_to_nodes(key, len(ring))
    if len(ring) > 1:
        assert ring.remove_node(gone).key_to_nodes(key, len(ring)) == [n for n in full if n != gone]
    grown = ring.add_node("newcomer", 1.5)
    assert [n for n in grown.key_to_nodes(key, len(grown)) if n != "newcomer"] == full


CONTAINERS = [set, frozenset, list, tuple, iter, dict.fromkeys, lambda s: (x for x in s)]


@given(
    start=members,
    key=keys,
    excluded=st.sets(st.sampled_from([*NAMES, "stranger"])),
    n=st.integers(min_value=1, max_value=10),
    container=st.sampled_from(CONTAINERS),
)
def test_exclude_picks_the_next_preferred_nodes(
    ring_cls: Any, start: Any, key: Any, excluded: set[str], n: int, container: Any
) -> None:
    ring = ring_cls(start)
    eligible = [x for x in ring.key_to_nodes(key, len(ring)) if x not in excluded]
    assert ring.key_to_nodes(key, n, exclude=container(excluded)) == eligible[:n]
    if eligible:
        assert ring.key_to_node(key, exclude=container(excluded)) == eligible[0]
    else:
        with pytest.raises(LookupError, match="excluded"):
            ring.key_to_node(key, exclude=container(excluded))
    assert ring.key_to_node(key, exclude=container(set())) == ring.key_to_node(key)


def test_exclude_ignores_strangers_and_non_names(ring_cls: Any) -> None:
    ring = ring_cls(["a", "b", "c"])
    for key in SAMPLE_KEYS[:100]:
        owner = ring.key_to_node(key)
        assert ring.key_to_node(key, exclude=["zz", 1, None, (owner,)]) == owner
        second = ring.key_to_nodes(key, 2)[1]
        assert ring.key_to_node(key, exclude=[owner, 1, None]) == second


@settings(max_examples=60)
@given(start=members, data=st.data())
def test_native_and_pure_agree(start: Any, data: Any) -> None:
    if NativeRing is None:
        pytest.skip("C accelerator not built")
    native, pure = NativeRing(start), PureRing(start)
    assert native == pure and native.fingerprint == pure.fingerprint
    for _ in range(5):
        slot = data.draw(slots)
        assert native.owner_of_slot(slot) == pure.owner_of_slot(slot)
        assert native._slot_ranking(slot) == pure._slot_ranking(slot)
    key = data.draw(keys)
    excluded = data.draw(st.sets(names))
    assert native.key_to_node(key) == pure.key_to_node(key)
    assert native.key_to_nodes(key, 4, exclude=excluded) == pure.key_to_nodes(
        key, 4, exclude=excluded
    )
    assert owners(native)[:100] == [pure.key_to_node(k) for k in SAMPLE_KEYS[:100]]


@native_only
@pytest.mark.parametrize("nodes", [["a", "b", "node-1"], {"a": 1, "b": 2.5, "c": 0.3}], ids=repr)
def test_full_tables_agree(nodes: Any) -> None:
    native, pure = NativeRing(nodes), PureRing(nodes)
    assert native._table_bytes() == pure._table_bytes()
    assert native.shares() == pure.shares()
