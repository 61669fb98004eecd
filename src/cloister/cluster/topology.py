"""Epochs: the member set the sentry publishes, and the rings every node derives from it.

Every node builds its rings from the *published* epoch record, never from its own view
of the member records: the record is one value in the backend, so every node that has
adopted epoch ``E`` has exactly the same rings (same fingerprint). Only the sentry turns
membership changes into new epochs, through a compare-and-set on the record.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cloister import schema
from cloister.cluster.placement import DEFAULT_PARTITIONS, Placement
from cloister.ring import HashRing
from cloister.schema import UNSIGNED, Keyring


@dataclass(frozen=True, slots=True)
class MemberSpec:
    """What the ring needs to know about a member. A restart changes ``incarnation``."""

    weight: float
    groups: tuple[str, ...]
    incarnation: int

    def to_wire(self) -> list[Any]:
        return [self.weight, list(self.groups), self.incarnation]


@dataclass(frozen=True, slots=True)
class EpochRecord:
    """The published topology: epoch number, the sentry that wrote it, the members."""

    epoch: int
    sentry: str
    members: Mapping[str, MemberSpec]

    def encode(self, keyring: Keyring = UNSIGNED) -> bytes:
        """The record as stored (sealed when ``keyring`` has a secret)."""
        return schema.encode(
            schema.EPOCH,
            {
                "epoch": self.epoch,
                "sentry": self.sentry,
                "members": {name: spec.to_wire() for name, spec in self.members.items()},
            },
            keyring,
        )

    @classmethod
    def decode(cls, data: bytes, keyring: Keyring = UNSIGNED) -> EpochRecord:
        """The record in ``data``; :class:`WireFormatError` if it breaks the schema."""
        record = schema.decode(schema.EPOCH, data, keyring)
        return cls(
            epoch=record.epoch,
            sentry=record.sentry,
            members={
                name: MemberSpec(weight, tuple(groups), incarnation)
                for name, (weight, groups, incarnation) in record.members.items()
            },
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
