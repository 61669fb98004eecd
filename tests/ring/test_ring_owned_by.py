"""``owned_by(node, key)``: the one-call ownership check behind ``Cluster.mine``."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st


@given(keys=st.lists(st.text() | st.binary() | st.integers(), min_size=1, max_size=50))
def test_owned_by_agrees_with_key_to_node(ring_cls: Any, keys: list[Any]) -> None:
    ring = ring_cls(["a", "b", "c"])
    for key in keys:
        owner = ring.key_to_node(key)
        assert ring.owned_by(owner, key)
        assert not any(ring.owned_by(other, key) for other in "abc" if other != owner)
        assert not ring.owned_by("not-a-member", key)


def test_owned_by_on_an_empty_ring_and_bad_keys(ring_cls: Any) -> None:
    assert ring_cls([]).owned_by("a", "k") is False
    with pytest.raises(TypeError):
        ring_cls(["a"]).owned_by("a", 1.5)
    assert ring_cls(["a"]).owned_by(None, "k") is False
