"""What the hostile tests write: records as a node would, with fields changed."""

from __future__ import annotations

from collections.abc import Callable
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


def exported(cluster: Any, family: str) -> Callable[[str], float]:
    """The values of ``cloister_<family>_total{kind}`` a node's collector exports now, as a
    function of the kind (what a Prometheus scrape of the node would read)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from cloister.metrics import NodeCollector

    registry = CollectorRegistry()
    registry.register(NodeCollector(cluster))
    text = generate_latest(registry).decode()
    where = f'cluster="{cluster.name}",kind="{{}}",node="{cluster.node}"'

    def value(kind: str) -> float:
        prefix = f"cloister_{family}_total{{{where.format(kind)}}} "
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        assert len(lines) == 1, f"{prefix!r} exported {len(lines)} times"
        return float(lines[0].removeprefix(prefix))

    return value
