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

from cloister import schema
from cloister.cluster.topology import MemberSpec
from cloister.errors import WireFormatError
from cloister.schema import UNSIGNED, Keyring


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

    def encode(self, keyring: Keyring = UNSIGNED) -> bytes:
        """The record as stored (sealed when ``keyring`` has a secret)."""
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
        return schema.encode(schema.MEMBER, fields, keyring)

    @classmethod
    def decode(
        cls, data: bytes, key: str | None = None, keyring: Keyring = UNSIGNED
    ) -> MemberRecord:
        """The record in ``data``; :class:`WireFormatError` if it breaks the schema, or if
        ``key`` (the key it was stored under) is not the node it names."""
        try:
            wire_record = schema.decode(schema.MEMBER, data, keyring)
        except WireFormatError as exc:
            if key is None:
                raise
            raise type(exc)(f"{exc} (key {key!r})") from None
        if key is not None and wire_record.node != key:
            raise GhostMemberError(
                f"member record {key!r} names another node, {wire_record.node!r}: a ghost member"
            )
        return cls(
            node=wire_record.node,
            incarnation=wire_record.inc,
            weight=wire_record.weight,
            groups=tuple(wire_record.groups),
            started_at=wire_record.started_at,
            acked=wire_record.acked,
            state=wire_record.state,
            ttl=wire_record.ttl,
        )


class GhostMemberError(WireFormatError):
    """A member record stored under a key that is not the name of the node it describes."""
