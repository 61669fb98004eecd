"""The Python half of ``HashRing``: argument checks, value semantics, views of the members.

``RingMethods`` is mixed into a core class (``_native.RingCore`` or ``_pure.RingCore``)
that holds the members and the slot table and answers lookups. The mixin defines no
lookup method, so ``ring.key_to_node`` resolves straight to the core's.
"""

from __future__ import annotations

import bisect
import math
import numbers
import struct
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Self

from cloister.errors import CloisterError, ConfigurationError
from cloister.ring._hash import MAX_NODES, SLOTS
from cloister.ring._select import key_hash


class UnknownNodeError(CloisterError, ValueError, KeyError):
    """A node name that is not a member of the ring was removed or asked about.

    It is a ``ValueError`` (a bad argument) and a ``KeyError`` (a missing member).
    """

    def __str__(self) -> str:
        return Exception.__str__(self)


def check_name(name: object) -> str:
    """A node name: a non-empty str (returned as a plain str)."""
    if not isinstance(name, str) or not name:
        hint = " (pass a mapping to give weights)" if isinstance(name, tuple) else ""
        raise ConfigurationError(f"node names must be non-empty str, got {name!r}{hint}")
    return str(name)


def check_weight(name: str, weight: object) -> float:
    """A node weight: a finite number > 0, as a float."""
    value = math.nan
    if isinstance(weight, numbers.Real) and not isinstance(weight, bool):
        try:
            value = float(weight)
        except (OverflowError, ValueError):
            value = math.nan
    if not (math.isfinite(value) and value > 0.0):
        raise ConfigurationError(
            f"the weight of node {name!r} must be a finite number > 0, got {weight!r}"
        )
    return value


def normalize(nodes: object) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Check ``HashRing(nodes)``'s argument; return (sorted names, their weights)."""
    if isinstance(nodes, RingMethods):
        return nodes._names, nodes._weights
    if isinstance(nodes, str | bytes):
        raise TypeError(
            f"nodes must be an iterable of node names or a mapping name -> weight, not a "
            f"{type(nodes).__name__}; write [{nodes!r}] for a single node"
        )
    if isinstance(nodes, Mapping):
        pairs: Iterable[tuple[object, object]] = nodes.items()
    elif isinstance(nodes, Iterable):
        pairs = ((name, 1.0) for name in nodes)
    else:
        raise TypeError(
            f"nodes must be an iterable of node names or a mapping name -> weight, "
            f"not {type(nodes).__name__}"
        )
    members: dict[str, float] = {}
    for raw_name, raw_weight in pairs:
        name = check_name(raw_name)
        if name in members:
            raise ConfigurationError(f"node {name!r} is given twice; node names must be unique")
        members[name] = check_weight(name, raw_weight)
    if len(members) > MAX_NODES:
        raise ConfigurationError(f"a ring holds at most {MAX_NODES} nodes, got {len(members)}")
    names = tuple(sorted(members))
    return names, tuple(members[name] for name in names)


def _number(weight: float) -> float | int:
    return int(weight) if weight.is_integer() else weight


class RingMethods:
    """Everything of ``HashRing`` that is not a lookup. See ``cloister.ring``."""

    __slots__ = ()

    slots: ClassVar[int] = SLOTS
    """The number of slots keys are hashed into (2**18)."""

    if TYPE_CHECKING:
        # Provided by the core class this is mixed into (see _pure.RingCore).
        _names: tuple[str, ...]
        _weights: tuple[float, ...]

        @classmethod
        def _build(cls, names: tuple[str, ...], weights: tuple[float, ...]) -> Self: ...
        def _with_node(self, name: str, weight: float) -> Self: ...
        def _without_node(self, name: str) -> Self: ...
        def _counts(self) -> list[int]: ...

    def __new__(cls, nodes: Iterable[str] | Mapping[str, float] = ()) -> Self:
        names, weights = normalize(nodes)
        return cls._build(names, weights)

    # -- deriving rings ------------------------------------------------------------------

    def add_node(self, name: str, weight: float = 1) -> Self:
        """A new ring with ``name`` added, weighing ``weight``; this ring is unchanged.

        Only slots that the new node wins move, all of them to it. Raises ``ValueError``
        for a bad name or weight or a name already in the ring.
        """
        name = check_name(name)
        value = check_weight(name, weight)
        if name in self:
            raise ConfigurationError(
                f"node {name!r} is already in the ring; remove it first or use another name"
            )
        if len(self._names) >= MAX_NODES:
            raise ConfigurationError(f"a ring holds at most {MAX_NODES} nodes")
        return self._with_node(name, value)

    def remove_node(self, name: str) -> Self:
        """A new ring without ``name``; this ring is unchanged.

        Only the removed node's slots move, each to its next preferred node. Raises
        ``UnknownNodeError`` (a ``ValueError`` and ``KeyError``) when ``name`` is not a member.
        """
        self._index(name)
        return self._without_node(name)

    # -- the members ---------------------------------------------------------------------

    @property
    def nodes(self) -> tuple[str, ...]:
        """The member names, sorted."""
        return self._names

    def weight(self, name: str) -> float:
        """The weight of member ``name``; ``UnknownNodeError`` if it is not a member."""
        return self._weights[self._index(name)]

    def shares(self) -> dict[str, float]:
        """Each member's fraction of the slots (hence of the keys), in node order."""
        counts = self._counts()
        return {name: count / SLOTS for name, count in zip(self._names, counts, strict=True)}

    @property
    def fingerprint(self) -> str:
        """A short hex digest of members and weights, the same in every process."""
        return f"{self._digest():016x}"

    def _digest(self) -> int:
        members = tuple(
            (name, struct.pack("<d", weight))
            for name, weight in zip(self._names, self._weights, strict=True)
        )
        return key_hash(("cloister.ring/1", members))

    def _index(self, name: object) -> int:
        at = bisect.bisect_left(self._names, name) if isinstance(name, str) else len(self._names)
        if at == len(self._names) or self._names[at] != name:
            shown = ", ".join(map(repr, self._names[:10]))
            more = f", ... ({len(self._names)} in all)" if len(self._names) > 10 else ""
            raise UnknownNodeError(f"node {name!r} is not in the ring (members: {shown}{more})")
        return at

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        at = bisect.bisect_left(self._names, name)
        return at < len(self._names) and self._names[at] == name

    # -- value semantics -----------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RingMethods):
            return NotImplemented
        return self._names == other._names and self._weights == other._weights

    def __hash__(self) -> int:
        return self._digest()

    def __repr__(self) -> str:
        cls = type(self).__name__
        if all(weight == 1.0 for weight in self._weights):
            return f"{cls}({list(self._names)!r})"
        members = {n: _number(w) for n, w in zip(self._names, self._weights, strict=True)}
        return f"{cls}({members!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (dict(zip(self._names, self._weights, strict=True)),))

    def __copy__(self) -> Self:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Self:
        return self
