"""Epochs: the member set the sentry publishes, and the rings every node derives from it.

Every node builds its rings from the *published* epoch record, never from its own view
of the member records: the record is one value in the backend, so every node that has
adopted epoch ``E`` has exactly the same rings (same fingerprint). Only the sentry turns
membership changes into new epochs, through a compare-and-set on the record.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cloister import wire
from cloister.cluster.placement import DEFAULT_PARTITIONS, Placement
from cloister.errors import WireFormatError
from cloister.ring import HashRing


@dataclass(frozen=True, slots=True)
class MemberSpec:
    """What the ring needs to know about a member. A restart changes ``incarnation``."""

    weight: float
    groups: tuple[str, ...]
    incarnation: int

    def to_wire(self) -> list[Any]:
        return [self.weight, list(self.groups), self.incarnation]

    @classmethod
    def from_wire(cls, data: Any) -> MemberSpec:
        what = "epoch record: member spec"
        if (
            not isinstance(data, list)
            or len(data) != 3
            or not isinstance(data[0], int | float)
            or isinstance(data[0], bool)
            or not isinstance(data[1], list)
            or not all(isinstance(g, str) and g for g in data[1])
            or not isinstance(data[2], int)
            or isinstance(data[2], bool)
        ):
            raise WireFormatError(f"epoch record: malformed member spec {data!r}")
        return cls(member_weight(data[0], what), tuple(data[1]), data[2])


def member_weight(value: float, what: str) -> float:
    """``value`` as a ring weight: a finite number > 0, or :class:`WireFormatError`."""
    try:
        weight = float(value)
    except OverflowError:
        weight = math.inf
    if not (math.isfinite(weight) and weight > 0):
        raise WireFormatError(f"{what}: weight should be a finite number > 0, got {value!r}")
    return weight


@dataclass(frozen=True, slots=True)
class EpochRecord:
    """The published topology: epoch number, the sentry that wrote it, the members."""

    epoch: int
    sentry: str
    members: Mapping[str, MemberSpec]

    def encode(self) -> bytes:
        return wire.encode(
            {
                "epoch": self.epoch,
                "sentry": self.sentry,
                "members": {name: spec.to_wire() for name, spec in self.members.items()},
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> EpochRecord:
        what = "epoch record"
        message = wire.decode_map(data, what, ("epoch", "sentry", "members"))
        members = wire.field(message, "members", dict, what)
        epoch = wire.field(message, "epoch", int, what)
        if epoch < 0:
            raise WireFormatError(f"{what}: negative epoch {epoch}")
        sentry = wire.field(message, "sentry", str, what)
        if not all(isinstance(name, str) and name for name in members):
            raise WireFormatError(f"{what}: member names should be non-empty strings")
        return cls(
            epoch=epoch,
            sentry=sentry,
            members={name: MemberSpec.from_wire(spec) for name, spec in members.items()},
        )


@dataclass(frozen=True, slots=True)
class Topology:
    """An adopted epoch with its rings: the main ring plus one per group."""

    epoch: int
    sentry: str
    members: Mapping[str, MemberSpec]
    ring: HashRing
    group_rings: Mapping[str, HashRing] = field(default_factory=dict)
    # (node, partitions, group, strict) -> Placement: built once per adopted epoch.
    _placements: dict[tuple[str, int, str | None, bool], Placement] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def from_record(cls, record: EpochRecord) -> Topology:
        ring = _ring({name: spec.weight for name, spec in record.members.items()})
        groups: dict[str, dict[str, float]] = {}
        for name, spec in record.members.items():
            for group in spec.groups:
                groups.setdefault(group, {})[name] = spec.weight
        return cls(
            epoch=record.epoch,
            sentry=record.sentry,
            members=record.members,
            ring=ring,
            group_rings={group: _ring(nodes) for group, nodes in groups.items()},
        )

    def ring_for(self, group: str | None) -> HashRing:
        """The ring of ``group`` (the main ring for None; an empty ring if nobody joined)."""
        if group is None:
            return self.ring
        found = self.group_rings.get(group)
        return found if found is not None else HashRing(())

    def describe(self, previous: Topology | None) -> str:
        """``epoch 7: 3 member(s) +c -d, sentry a``: this epoch, as a change from ``previous``."""
        before = set() if previous is None else set(previous.members)
        after = set(self.members)
        joined = "".join(f" +{n}" for n in sorted(after - before))
        left = "".join(f" -{n}" for n in sorted(before - after))
        return f"epoch {self.epoch}: {len(after)} member(s){joined}{left}, sentry {self.sentry}"

    def placement(
        self,
        node: str,
        partitions: int = DEFAULT_PARTITIONS,
        group: str | None = None,
        *,
        strict: bool = True,
    ) -> Placement:
        """Where keys live in this epoch, for keys split into ``partitions``, seen from
        ``node``: the partitions are placed on ``group``'s ring (the main ring for None).

        ``strict=False`` (managers) falls back to the main ring when nobody joined
        ``group``; ``strict=True`` places nothing then (an empty ring).
        """
        cache_key = (node, partitions, group, strict)
        found = self._placements.get(cache_key)
        if found is None:
            if strict or group is None:
                ring = self.ring_for(group)
            else:
                ring = self.group_rings.get(group, self.ring)
            found = self._placements[cache_key] = Placement(ring, partitions, node)
        return found


def _ring(weights: Mapping[str, float]) -> HashRing:
    return _cached_ring(tuple(sorted(weights.items())))


@functools.lru_cache(maxsize=32)
def _cached_ring(weights: tuple[tuple[str, float], ...]) -> HashRing:
    # Rings are immutable values and a function of their members alone, so nodes that
    # share a process (the memory backend, tests) build each one once, not once per node.
    return HashRing(dict(weights))
