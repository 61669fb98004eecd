"""Member records: what each node writes about itself, with a TTL, and keeps renewing.

A member record lives under the node's name in the ``members`` bucket. It is written with
a TTL of ``failure_timeout`` and renewed every heartbeat; a node that crashes stops
renewing and the *backend* expires it, so no other node has to decide who is dead. The
record also carries the last epoch the node has acknowledged (``acked``): a node
acknowledges an epoch only after it has released every key it no longer owns, and nobody
starts a moved key until every member has acknowledged — the handoff barrier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from cloister import wire
from cloister.cluster.topology import MemberSpec, member_weight
from cloister.errors import WireFormatError


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
    ttl: float | None = None
    """The TTL the node writes its record with (its ``failure_timeout``); None from nodes
    that do not say. A record not renewed for much longer was written without one."""

    @property
    def spec(self) -> MemberSpec:
        """The part of the record that shapes the ring."""
        return MemberSpec(self.weight, self.groups, self.incarnation)

    def with_(self, **changes: Any) -> MemberRecord:
        """A copy with ``changes`` applied."""
        return replace(self, **changes)

    def encode(self) -> bytes:
        fields = {
            "node": self.node,
            "inc": self.incarnation,
            "weight": self.weight,
            "groups": list(self.groups),
            "started_at": self.started_at,
            "acked": self.acked,
            "state": self.state,
        }
        if self.ttl is not None:
            fields["ttl"] = self.ttl
        return wire.encode(fields)

    @classmethod
    def decode(cls, data: bytes, key: str | None = None) -> MemberRecord:
        """The record in ``data``; :class:`WireFormatError` if it breaks the schema, or if
        ``key`` (the key it was stored under) is not the node it names."""
        what = "member record" if key is None else f"member record {key!r}"
        message = wire.decode_map(data, what, ("node", "inc", "weight", "groups", "started_at"))
        node = wire.field(message, "node", str, what)
        if not node:
            raise WireFormatError(f"{what}: empty node name")
        if key is not None and node != key:
            raise GhostMemberError(f"{what} names another node, {node!r}: a ghost member")
        groups = wire.field(message, "groups", list, what)
        if not all(isinstance(g, str) and g for g in groups):
            raise WireFormatError(f"{what}: groups should be non-empty strings, got {groups!r}")
        acked = message.get("acked", 0)
        if not isinstance(acked, int) or isinstance(acked, bool) or acked < 0:
            raise WireFormatError(f"{what}: field 'acked' should be an int >= 0, got {acked!r}")
        state = message.get("state", "")
        if not isinstance(state, str):
            raise WireFormatError(f"{what}: field 'state' should be str, got {state!r}")
        ttl = message.get("ttl")
        if ttl is not None:
            if not isinstance(ttl, int | float) or isinstance(ttl, bool):
                raise WireFormatError(f"{what}: field 'ttl' should be a number, got {ttl!r}")
            ttl = _finite(ttl, what)
            if ttl <= 0:
                raise WireFormatError(f"{what}: field 'ttl' should be > 0, got {ttl!r}")
        return cls(
            node=node,
            incarnation=wire.field(message, "inc", int, what),
            weight=member_weight(wire.field(message, "weight", (int, float), what), what),
            groups=tuple(groups),
            started_at=_finite(wire.field(message, "started_at", (int, float), what), what),
            acked=acked,
            state=state,
            ttl=ttl,
        )


class GhostMemberError(WireFormatError):
    """A member record stored under a key that is not the name of the node it describes."""


def _finite(value: float, what: str) -> float:
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise WireFormatError(f"{what}: expected a finite number, got {value!r}")
    return number
