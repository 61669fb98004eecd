"""Re-exported from :mod:`cloister.local.errors` (where it lives: the CLI uses it too)."""

from __future__ import annotations

from cloister.local.errors import (
    ClusterFormationError,
    HarnessError,
    LineNotFoundError,
    NatsServerNotFoundError,
    ServerStartError,
)

__all__ = [
    "ClusterFormationError",
    "HarnessError",
    "LineNotFoundError",
    "NatsServerNotFoundError",
    "ServerStartError",
]
