"""Re-exported from :mod:`cloister.local.nats_server` (where it lives: the CLI uses it too)."""

from __future__ import annotations

from cloister.local.nats_server import MIN_NATS_SERVER_VERSION, NatsServer, find_nats_server

__all__ = ["MIN_NATS_SERVER_VERSION", "NatsServer", "find_nats_server"]
