"""What the hostile tests write: records as a node would, with fields changed."""

from __future__ import annotations

from typing import Any

import msgpack


def member(node: str, /, **changes: Any) -> bytes:
    """A member record as node ``node`` writes it, with ``changes`` to its fields (raw
    msgpack: the tests write what the project's own encoder would refuse)."""
    fields: dict[str, Any] = {
        "node": node,
        "inc": 7,
        "weight": 1.0,
        "groups": [],
        "started_at": 1.0,
        "acked": 0,
        "state": "ready",
    }
    fields.update(changes)
    return bytes(msgpack.packb(fields, use_bin_type=True))
