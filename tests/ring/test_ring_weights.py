"""Balance and weights: shares of the slots (hence of the keys)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from ring_impls import weighted_members

from cloister.ring import SLOTS


def test_equal_nodes_are_balanced(native_cls: Any) -> None:
    ring = native_cls([f"node{i}" for i in range(10)])
    shares = ring.shares()
    assert list(shares) == list(ring.nodes)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert max(shares.values()) * 10 <= 1.02
    counts = Counter(ring.key_to_node(f"foo_{i}") for i in range(200_000))
    assert max(counts.values()) / (200_000 / 10) <= 1.03


@pytest.mark.parametrize(
    "members",
    [
        {"a": 1, "b": 2},
        {"a": 1, "b": 1, "c": 2, "d": 4},
        {"tiny": 0.01, "huge": 1, "mid": 0.5},
        {f"n{i}": 1 for i in range(9)} | {"heavy": 2},
    ],
    ids=repr,
)
def test_shares_follow_the_weights(native_cls: Any, members: dict[str, float]) -> None:
    ring = native_cls(members)
    total = sum(members.values())
    for name, share in ring.shares().items():
        expected = members[name] / total
        # binomial noise over 2**18 slots: 4 standard deviations, relative
        sigma = (expected * (1 - expected) / SLOTS) ** 0.5
        assert abs(share - expected) <= 4 * sigma, (name, share, expected)


@settings(max_examples=25, deadline=None)
@given(members=weighted_members)
def test_shares_sum_to_one_and_slots_are_counted(native_cls: Any, members: Any) -> None:
    ring = native_cls(members)
    shares = ring.shares()
    assert set(shares) == set(members)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert all(share * SLOTS == int(share * SLOTS) for share in shares.values())


def test_scaling_all_weights_changes_nothing(native_cls: Any) -> None:
    one = native_cls(["a", "b", "c"])
    scaled = native_cls({"a": 3.5, "b": 3.5, "c": 3.5})
    assert one._table_bytes() == scaled._table_bytes()
    assert one != scaled  # different weights, different value
