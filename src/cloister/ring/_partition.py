"""Partitions: the unit a ring places when keys are placed in groups.

A key belongs to partition ``key_hash(key) % partitions``, and the ring places each
partition by its own ring key, :func:`partition_key`. Every process computes the same.
"""

from __future__ import annotations

PARTITION_KEY = "cloister.partition"


def partition_key(partition: int) -> tuple[str, int]:
    """The ring key that places ``partition`` on a node."""
    return (PARTITION_KEY, partition)
