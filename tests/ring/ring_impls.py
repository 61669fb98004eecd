"""The two ring implementations side by side, and strategies shared by the ring tests."""

from __future__ import annotations

from array import array
from typing import Any

from hypothesis import strategies as st

from cloister.ring import _pure
from cloister.ring._ring import RingMethods


class PureRing(RingMethods, _pure.RingCore):
    """HashRing on the pure-Python core, whatever the environment selects."""

    __slots__ = ()


NativeRing: Any
try:
    from cloister.ring import _native
except ImportError:  # pragma: no cover - exercised only without a C compiler
    NativeRing = None
else:

    class NativeRing(RingMethods, _native.RingCore):  # type: ignore[no-redef]
        """HashRing on the C core."""

        __slots__ = ()


def table(ring: Any) -> array[int]:
    """The ring's slot table as an array of node indices."""
    return array("H", ring._table_bytes())


NAMES = [f"node-{i}" for i in range(12)] + ["a", "b", "é", "\U0001f600", "z" * 40]

names = st.sampled_from(NAMES)
member_sets = st.sets(names, min_size=1, max_size=8)
weights = st.sampled_from([1.0, 1.0, 1.0, 0.5, 2.0, 3.0, 0.1, 7.25])
weighted_members = st.dictionaries(names, weights, min_size=1, max_size=8)

keys = st.recursive(
    st.text(max_size=12)
    | st.binary(max_size=12)
    | st.integers(min_value=-(2**70), max_value=2**70),
    lambda children: st.tuples(children) | st.lists(children, max_size=3).map(tuple),
    max_leaves=6,
)
