"""Backends: how a node reaches the shared medium. Chosen by URL.

``memory://NAME`` — every node in one process (the embedded default).
``nats://host:port[,host:port...]`` — NATS with JetStream, server 2.11 or newer.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from cloister.backends.base import (
    Backend,
    Entry,
    KeyValue,
    KVEvent,
    KVOp,
    MessageHandler,
    RequestHandler,
    Subscription,
)
from cloister.errors import ConfigurationError

__all__ = [
    "Backend",
    "Entry",
    "KVEvent",
    "KVOp",
    "KeyValue",
    "MessageHandler",
    "RequestHandler",
    "Subscription",
    "open_backend",
]

SCHEMES = ("memory", "nats", "tls")


def open_backend(url: str, cluster: str, node: str, **options: Any) -> Backend:
    """Create (not yet connect) the backend named by ``url`` for one node of ``cluster``."""
    scheme = urlsplit(url).scheme if "://" in url else ""
    if scheme == "memory":
        from cloister.backends.memory import MemoryBackend

        if options:
            raise ConfigurationError(
                f"memory:// takes no backend options, got {', '.join(sorted(options))}"
            )
        name = url.split("://", 1)[1] or "default"
        return MemoryBackend(name, cluster, node)
    if scheme in ("nats", "tls"):
        from cloister.backends.nats import NatsBackend

        return NatsBackend(url, cluster, node, **options)
    raise ConfigurationError(
        f"unknown backend URL {url!r}: use memory://NAME (embedded) or "
        "nats://host:port[,host:port...] (NATS with JetStream)"
    )
