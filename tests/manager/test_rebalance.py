"""The rebalance set algebra (pure: no backend, no cluster)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cloister.manager.ownership import rebalance

partitions = st.frozensets(st.integers(min_value=0, max_value=127))


@given(partitions, partitions, st.integers(min_value=0))
def test_assigned_and_revoked_split_the_change(
    previous: frozenset[int], new: frozenset[int], epoch: int
) -> None:
    moves = rebalance(epoch, previous, new)
    assert moves.epoch == epoch and moves.owned == new
    assert not moves.assigned & moves.revoked
    assert moves.assigned | (previous - moves.revoked) == new
    assert moves.revoked <= previous and not moves.revoked & new
    assert moves.assigned <= new and not moves.assigned & previous


@given(partitions, st.integers(min_value=0))
def test_the_same_placement_moves_nothing(owned: frozenset[int], epoch: int) -> None:
    moves = rebalance(epoch, owned, owned)
    assert moves.assigned == moves.revoked == frozenset()


def test_an_example() -> None:
    moves = rebalance(7, {1, 2, 3}, {3, 4})
    assert (moves.assigned, moves.revoked) == ({4}, {1, 2})
