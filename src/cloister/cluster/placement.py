"""Where a key lives: key -> partition (a hash) -> node (the ring). The ONE answer.

Keys are placed by *partition*, not one by one: ``hash(key) % partitions`` picks the
partition and the ring places partitions on nodes. A manager's inbox is partitioned the
same way, so the node that consumes a partition's messages is the node that runs the
workers those messages are for — no forwarding — and a topology change moves whole
partitions: their workers and their pending messages move together.

``Cluster.whois``/``Cluster.mine`` and ``DynamicManager.owner_of`` all answer from a
:class:`Placement` built by :meth:`cloister.cluster.Topology.placement`, so they never
disagree.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Protocol

from cloister.errors import EmptyRingError
from cloister.ring import HashRing, key_hash, partition_key

DEFAULT_PARTITIONS = 128
"""Partitions of a manager that sets none, and of ``whois(key)`` without a manager."""


class Placed(Protocol):
    """What placement needs to know of a manager: a DynamicManager class or instance."""

    partitions: int

    def placement_group(self) -> str:
        """The group whose ring places the manager's partitions (if anyone joined it)."""
        ...


class Placement:
    """Partition owners for one adopted topology, seen from ``node`` (an immutable value)."""

    __slots__ = ("node", "owners", "partitions", "ring")

    def __init__(self, ring: HashRing, partitions: int, node: str) -> None:
        self.ring = ring
        self.partitions = partitions
        self.node = node
        self.owners: tuple[str, ...] = (
            tuple(ring.key_to_node(partition_key(p)) for p in range(partitions))
            if len(ring)
            else ()
        )

    def partition_of(self, worker_id: Any) -> int:
        """The partition of ``worker_id`` (the same in every process)."""
        return key_hash(worker_id) % self.partitions

    def owner_of(self, worker_id: Any) -> str:
        """The node that runs ``worker_id``; :class:`EmptyRingError` if nobody can."""
        owners = self.owners
        if not owners:
            raise EmptyRingError(f"no node to place {worker_id!r} on: the ring is empty")
        return owners[key_hash(worker_id) % self.partitions]

    def mine(self, worker_id: Any) -> bool:
        """True when this node runs ``worker_id``."""
        owners = self.owners
        return bool(owners) and owners[key_hash(worker_id) % self.partitions] == self.node

    def owned(self) -> set[int]:
        """The partitions this node owns."""
        return {p for p, owner in enumerate(self.owners) if owner == self.node}

    def successor_of(self, worker_id: Any, gone: Collection[str] = ()) -> str:
        """Who runs ``worker_id`` once this node has left (rendezvous: the next preferred),
        passing over the nodes ``gone`` too. :class:`EmptyRingError` if nobody is left."""
        partition = self.partition_of(worker_id)
        return self.ring.key_to_node(partition_key(partition), exclude=(self.node, *gone))
