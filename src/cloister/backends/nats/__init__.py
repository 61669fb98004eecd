"""The NATS backend: ``nats://host:port[,host:port...]`` (JetStream, nats-server 2.11+).

Use it through :func:`cloister.backends.open_backend` or ``Cluster(backend="nats://...")``;
:class:`NatsBackend` documents the options (credentials, TLS, replicas, timeouts).
"""

from __future__ import annotations

from cloister.backends.nats._backend import NatsBackend, NatsSubscription
from cloister.backends.nats._errors import (
    JetStreamUnavailableError,
    NatsAuthorizationError,
    ServerTooOldError,
)
from cloister.backends.nats._kv import NatsKV

__all__ = [
    "JetStreamUnavailableError",
    "NatsAuthorizationError",
    "NatsBackend",
    "NatsKV",
    "NatsSubscription",
    "ServerTooOldError",
]
