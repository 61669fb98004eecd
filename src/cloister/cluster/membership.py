"""Member records: what each node writes about itself, with a TTL, and keeps renewing.

A member record lives under the node's name in the ``members`` bucket. It is written with
a TTL of ``failure_timeout`` and renewed every heartbeat; a node that crashes stops
renewing and the *backend* expires it, so no other node has to decide who is dead. The
record also carries the last epoch the node has acknowledged (``acked``): a node
acknowledges an epoch only after it has released every key it no longer owns, and nobody
starts a moved key until every member has acknowledged — the handoff barrier.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from cloister import wire
from cloister.cluster.topology import MemberSpec


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """One node's self-description as stored in the ``members`` bucket."""

    node: str
    incarnation: int
    weight: float
    groups: tuple[str, ...]
    started_at: float
    acked: int = 0
    state: str = "assembling"

    @property
    def spec(self) -> MemberSpec:
        """The part of the record that shapes the ring."""
        return MemberSpec(self.weight, self.groups, self.incarnation)

    def with_(self, **changes: Any) -> MemberRecord:
        """A copy with ``changes`` applied."""
        return replace(self, **changes)

    def encode(self) -> bytes:
        return wire.encode(
            {
                "node": self.node,
                "inc": self.incarnation,
                "weight": self.weight,
                "groups": list(self.groups),
                "started_at": self.started_at,
                "acked": self.acked,
                "state": self.state,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> MemberRecord:
        what = "member record"
        message = wire.decode_map(data, what, ("node", "inc", "weight", "groups", "started_at"))
        return cls(
            node=wire.field(message, "node", str, what),
            incarnation=wire.field(message, "inc", int, what),
            weight=float(wire.field(message, "weight", (int, float), what)),
            groups=tuple(str(g) for g in wire.field(message, "groups", list, what)),
            started_at=float(wire.field(message, "started_at", (int, float), what)),
            acked=int(message.get("acked", 0)),
            state=str(message.get("state", "")),
        )
