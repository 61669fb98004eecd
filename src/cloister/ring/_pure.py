"""The pure-Python ring core: the fallback when the C accelerator is not built.

It gives exactly the results of ``_native.RingCore`` (same hash, same table, same rankings)
and differs only in cost. Its slot table is filled lazily: a slot's owner is computed (one
rendezvous pass over the nodes) the first time a key falls into it, so building a ring or
deriving one with ``add_node``/``remove_node`` is O(nodes) instead of O(slots x nodes),
and a fresh lazy table is by construction what an incremental update would give, the
table being a pure function of the members.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Collection, Iterable
from typing import NoReturn, Self

from cloister.errors import EmptyRingError
from cloister.ring import _hash
from cloister.ring._hash import SLOT_SHIFT, SLOTS, Key, key_hash

_UNSET = 0xFFFF  # never a node index: a ring has at most 0xFFFF nodes (0 .. 0xFFFE)
_UNSET_TABLE = array("H", [_UNSET]) * SLOTS


def _empty_ring() -> EmptyRingError:
    return EmptyRingError("ring has no nodes; add a node first")


def _all_excluded(n: int) -> EmptyRingError:
    return EmptyRingError(f"all {n} nodes of the ring are excluded; no node is left to pick")


def exclusion(exclude: Iterable[str] | None) -> Collection[object] | None:
    """Normalise an ``exclude`` argument: ``None`` when it excludes nothing."""
    if exclude is None:
        return None
    if isinstance(exclude, str | bytes):
        raise TypeError(
            f"exclude must be a collection of node names, not a {type(exclude).__name__}; "
            "write exclude={name} to exclude one node"
        )
    if not isinstance(exclude, set | frozenset | dict | list | tuple):
        exclude = list(exclude)
    return exclude if len(exclude) else None


def check_slot(slot: object) -> int:
    """Validate a slot number given by a caller."""
    if not isinstance(slot, int) or isinstance(slot, bool):
        raise TypeError(f"slot must be an int, not {type(slot).__name__}")
    if not 0 <= slot < SLOTS:
        raise ValueError(f"slot must be in range(0, {SLOTS}), got {slot}")
    return slot


class RingCore:
    """Members, seeds and slot table of a ring; lookups (pure-Python implementation)."""

    __slots__ = ("_equal", "_names", "_seeds", "_table", "_weights")

    _names: tuple[str, ...]
    _weights: tuple[float, ...]
    _seeds: tuple[int, ...]
    _equal: bool
    _table: array[int]

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"{type(self).__name__} is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"{type(self).__name__} is immutable; cannot delete {name!r}")

    @classmethod
    def _build(cls, names: tuple[str, ...], weights: tuple[float, ...]) -> Self:
        """A ring of ``names`` (sorted, distinct) with ``weights`` (validated floats)."""
        self = object.__new__(cls)
        init = object.__setattr__
        init(self, "_names", names)
        init(self, "_weights", weights)
        init(self, "_seeds", tuple(key_hash(name) for name in names))
        init(self, "_equal", len(set(weights)) <= 1)
        init(self, "_table", array("H", _UNSET_TABLE))
        return self

    def _with_node(self, name: str, weight: float) -> Self:
        """This ring plus ``name`` (not a member) weighing ``weight``."""
        at = bisect.bisect_left(self._names, name)
        names = (*self._names[:at], name, *self._names[at:])
        weights = (*self._weights[:at], weight, *self._weights[at:])
        return self._build(names, weights)

    def _without_node(self, name: str) -> Self:
        """This ring minus ``name`` (a member)."""
        at = bisect.bisect_left(self._names, name)
        names = self._names[:at] + self._names[at + 1 :]
        weights = self._weights[:at] + self._weights[at + 1 :]
        return self._build(names, weights)

    def _owner(self, slot: int) -> int:
        index = self._table[slot]
        if index == _UNSET:
            weights = None if self._equal else self._weights
            index = self._table[slot] = _hash.best_node(slot, self._seeds, weights)
        return index

    def _rank(self, slot: int) -> list[int]:
        return _hash.ranking(slot, self._seeds, None if self._equal else self._weights)

    def _excluded_indices(self, exclude: Collection[object]) -> set[int]:
        names = self._names
        found = set()
        for item in exclude:
            if isinstance(item, str):
                at = bisect.bisect_left(names, item)
                if at < len(names) and names[at] == item:
                    found.add(at)
        return found

    def key_to_node(self, key: Key, exclude: Iterable[str] | None = None) -> str:
        """The node that owns ``key``; with ``exclude``, the most preferred node not in it.

        Raises ``EmptyRingError`` on an empty ring (or when every node is excluded) and
        ``TypeError`` for a key that is not str, bytes, int or a tuple of them.
        """
        slot = key_hash(key) >> SLOT_SHIFT
        if not self._names:
            raise _empty_ring()
        owner = self._names[self._owner(slot)]
        excluded = exclusion(exclude)
        if excluded is None or owner not in excluded:
            return owner
        skip = self._excluded_indices(excluded)
        for index in self._rank(slot):
            if index not in skip:
                return self._names[index]
        raise _all_excluded(len(self._names))

    def key_to_nodes(self, key: Key, n: int, exclude: Iterable[str] | None = None) -> list[str]:
        """The ``n`` most preferred distinct nodes for ``key``, best first, skipping
        ``exclude``; fewer only when fewer nodes are left. The first is ``key_to_node(key)``.
        """
        slot = key_hash(key) >> SLOT_SHIFT
        if not isinstance(n, int) or isinstance(n, bool):
            raise TypeError(f"n must be an int, not {type(n).__name__}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if not self._names:
            raise _empty_ring()
        excluded = exclusion(exclude)
        skip = self._excluded_indices(excluded) if excluded is not None else set()
        picked = [self._names[i] for i in self._rank(slot) if i not in skip]
        return picked[:n]

    def owned_by(self, node: str, key: Key) -> bool:
        """True when ``node`` owns ``key`` (False on an empty ring)."""
        slot = key_hash(key) >> SLOT_SHIFT
        return bool(self._names) and self._names[self._owner(slot)] == node

    def slot_of(self, key: Key) -> int:
        """The slot (``0 <= slot < slots``) that ``key`` falls into; it depends on the key only."""
        return key_hash(key) >> SLOT_SHIFT

    def owner_of_slot(self, slot: int) -> str:
        """The node that owns ``slot``."""
        check_slot(slot)
        if not self._names:
            raise _empty_ring()
        return self._names[self._owner(slot)]

    def _slot_ranking(self, slot: int) -> list[str]:
        """All nodes in preference order for ``slot`` (its first is the slot's owner)."""
        check_slot(slot)
        return [self._names[i] for i in self._rank(slot)]

    def _table_bytes(self) -> bytes:
        """The whole slot table as little-endian uint16 node indices (b"" when empty)."""
        if not self._names:
            return b""
        for slot in range(SLOTS):
            self._owner(slot)
        table = array("H", self._table)
        if table.itemsize != 2:  # pragma: no cover - every supported platform has 2
            raise RuntimeError("array('H') is not 16-bit here")
        if array("H", [1]).tobytes() != b"\x01\x00":  # pragma: no cover - big-endian
            table.byteswap()
        return table.tobytes()

    def _counts(self) -> list[int]:
        """How many slots each node owns, in node order."""
        counts = [0] * len(self._names)
        if self._names:
            for slot in range(SLOTS):
                counts[self._owner(slot)] += 1
        return counts
