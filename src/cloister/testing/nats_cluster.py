"""Re-exported from :mod:`cloister.local.nats_cluster` (where it lives: the CLI uses it too)."""

from __future__ import annotations

from cloister.local.nats_cluster import NatsCluster

__all__ = ["NatsCluster"]
