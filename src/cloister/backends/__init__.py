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
    Guard,
    KeyValue,
    KVEvent,
    KVOp,
    Log,
    LogConsumer,
    LogRecord,
    MessageHandler,
    PartitionBusyError,
    RequestHandler,
    ServeLimits,
    Subscription,
)
from cloister.errors import ConfigurationError

__all__ = [
    "Backend",
    "Entry",
    "Guard",
    "KVEvent",
    "KVOp",
    "KeyValue",
    "Log",
    "LogConsumer",
    "LogRecord",
    "MessageHandler",
    "PartitionBusyError",
    "RequestHandler",
    "ServeLimits",
    "Subscription",
    "check_url",
    "open_backend",
]

SCHEMES = ("memory", "nats", "tls")


def check_url(url: str) -> str:
    """Return the scheme of a backend URL, or raise a clear error for an unknown one."""
    scheme = urlsplit(url).scheme if isinstance(url, str) and "://" in url else ""
    if scheme not in SCHEMES:
        raise ConfigurationError(
            f"unknown backend URL {url!r}: use memory://NAME (embedded) or "
            "nats://host:port[,host:port...] (NATS with JetStream)"
        )
    return scheme


def open_backend(url: str, cluster: str, node: str, **options: Any) -> Backend:
    """Create (not yet connect) the backend named by ``url`` for one node of ``cluster``."""
    scheme = check_url(url)
    if scheme == "memory":
        from cloister.backends.memory import MemoryBackend

        if options:
            raise ConfigurationError(
                f"memory:// takes no backend options, got {', '.join(sorted(options))}"
            )
        name = url.split("://", 1)[1] or "default"
        return MemoryBackend(name, cluster, node)
    from cloister.backends.nats import NatsBackend  # imported lazily: nats-py is heavy

    backend: Backend = NatsBackend(url, cluster, node, **options)
    return backend
