"""Partitioned intake: the broker side split into partitions, each read by its owner only.

A broker queue read by several nodes at once cannot keep a key's order: two messages for
one key in flight on two nodes are stored in either order. So by default a source reads
*partitions* — one broker queue (RabbitMQ), stream (Redis) or subject (JetStream) per
partition — and each node reads only the partitions the cluster's ring gives it, as the
manager's inbox does. Publishers send a key's messages to partition
:func:`partition_of` ``(key, partitions)``; one node at a time stores a partition's
messages, in order, so a key's messages reach the inbox in the order they were published.

:class:`PartitionFollower` is the cluster's topology hook that moves the partitions: on
``release`` (before this node acknowledges a new epoch) the source stops reading the
partitions that moved away and lets what it holds of them be stored or given back; on
``settle`` (every member acknowledged) it starts reading the partitions it gained; on
``suspend`` it stops reading everything. The next owner starts only after the previous
one let go, and what was not acknowledged goes back to the broker: nothing is lost.
"""

from __future__ import annotations

from collections.abc import Set
from typing import TYPE_CHECKING, Any, Protocol

from cloister.cluster.hooks import SuspendReason
from cloister.ring import key_hash

if TYPE_CHECKING:
    from cloister.cluster import Cluster, Topology


def partition_name(prefix: str, key: Any, partitions: int) -> str:
    """Where a publisher sends ``key``'s messages: ``<prefix>.<partition_of(key)>`` — the
    RabbitMQ queue, Redis stream or NATS subject of the key's partition."""
    return f"{prefix}.{partition_of(key, partitions)}"


def partition_of(key: Any, partitions: int) -> int:
    """The partition a publisher sends ``key``'s messages to: ``key_hash(key) %
    partitions`` — the same function that places the key's worker and inbox partition
    (:meth:`cloister.cluster.Placement.partition_of`), in every process."""
    return key_hash(key) % partitions


class Reassignable(Protocol):
    """What the follower moves: a source's set of partitions it reads."""

    async def _reassign(self, wanted: Set[int], *, grow: bool) -> None:
        """Stop reading the partitions outside ``wanted``; with ``grow``, start those in
        ``wanted`` not read yet."""
        ...


class PartitionFollower:
    """The topology hook of a partitioned source: this node reads the partitions the
    ring gives it (``partitions`` placed on ``group``'s ring, as a manager's are)."""

    def __init__(
        self, source: Reassignable, cluster: Cluster, partitions: int, group: str | None
    ) -> None:
        self.source = source
        self.cluster = cluster
        self.partitions = partitions
        self.group = group

    def owned(self, topology: Topology) -> set[int]:
        """The partitions this node reads in ``topology``."""
        placement = topology.placement(self.cluster.node, self.partitions, self.group, strict=False)
        return placement.owned()

    async def release(self, topology: Topology) -> None:
        """Before this node acknowledges ``topology``: let go of what moved away."""
        await self.source._reassign(self.owned(topology), grow=False)

    async def settle(self, topology: Topology) -> None:
        """Every member acknowledged ``topology``: read what is ours."""
        latest = self.cluster.topology
        if latest is not None and latest.epoch > topology.epoch:
            return  # a newer epoch was adopted meanwhile; its settle comes next
        await self.source._reassign(self.owned(topology), grow=True)

    async def suspend(self, reason: SuspendReason) -> None:
        """The node may not process now: read nothing until the next settle."""
        await self.source._reassign(set(), grow=False)
