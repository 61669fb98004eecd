"""A node's settings, checked once: names, consensus, timings, weight, backend URL.

Every check says what was wrong and what to use instead, before anything connects.
"""

from __future__ import annotations

import re
import secrets
import socket
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from cloister.backends import check_url
from cloister.errors import ConfigurationError
from cloister.ring import HashRing

NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_=.-]{0,127}$")
CLUSTER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def default_node_name() -> str:
    """The host name and a random suffix: unique enough for a node started without one."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40].strip("-") or "node"
    return f"{host}-{secrets.token_hex(3)}"


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """The validated arguments of :class:`~cloister.cluster.Cluster`."""

    name: str
    node: str
    backend_url: str
    consensus: int
    groups: tuple[str, ...]
    weight: float
    heartbeat: float
    failure_timeout: float
    expected: frozenset[str]
    request_timeout: float
    max_concurrent_requests: int = 256
    max_queued_request_bytes: int = 8 * 1024 * 1024

    @classmethod
    def check(
        cls,
        name: Any,
        node: Any,
        *,
        backend: str,
        consensus: Any,
        groups: Iterable[str],
        weight: Any,
        heartbeat: Any,
        failure_timeout: Any,
        expected: Collection[str],
        request_timeout: float,
        max_concurrent_requests: Any = 256,
        max_queued_request_bytes: Any = 8 * 1024 * 1024,
    ) -> ClusterSettings:
        """The settings, or :class:`ConfigurationError` naming the first bad one."""
        if not isinstance(name, str) or not CLUSTER_NAME.match(name):
            raise ConfigurationError(
                f"invalid cluster name {name!r}: use 1-64 characters of [A-Za-z0-9_-]"
            )
        node = default_node_name() if node is None else node
        groups = tuple(groups)
        for what, value in [("node name", node), *(("group", g) for g in groups)]:
            if not isinstance(value, str) or not NAME.match(value):
                raise ConfigurationError(
                    f"invalid {what} {value!r}: use 1-128 characters of [A-Za-z0-9_=.-], "
                    "starting with a letter, digit or underscore"
                )
        if isinstance(consensus, bool) or not isinstance(consensus, int) or consensus < 1:
            raise ConfigurationError(
                f"consensus must be a whole number >= 1 (members needed before ready), "
                f"got {consensus!r}"
            )
        if not heartbeat > 0:
            raise ConfigurationError(f"heartbeat must be > 0 seconds, got {heartbeat!r}")
        failure_timeout = 3 * heartbeat if failure_timeout is None else failure_timeout
        if not failure_timeout >= 2 * heartbeat:
            raise ConfigurationError(
                f"failure_timeout ({failure_timeout!r}s) must be at least 2 heartbeats "
                f"({2 * heartbeat:g}s), or live nodes would be declared dead"
            )
        if not (isinstance(weight, int | float) and weight > 0):
            raise ConfigurationError(f"weight must be a positive number, got {weight!r}")
        if not (isinstance(request_timeout, int | float) and request_timeout > 0):
            raise ConfigurationError(
                f"request_timeout must be > 0 seconds, got {request_timeout!r}"
            )
        for what, value, least in (
            ("max_concurrent_requests", max_concurrent_requests, 1),
            ("max_queued_request_bytes", max_queued_request_bytes, 64 * 1024),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigurationError(f"{what} must be a whole number >= {least}, got {value!r}")
        check_url(backend)
        HashRing({node: weight})  # the ring's own validation of the name and weight
        return cls(
            name=name,
            node=node,
            backend_url=backend,
            consensus=consensus,
            groups=tuple(dict.fromkeys(groups)),
            weight=float(weight),
            heartbeat=float(heartbeat),
            failure_timeout=float(failure_timeout),
            expected=frozenset(expected),
            request_timeout=float(request_timeout),
            max_concurrent_requests=max_concurrent_requests,
            max_queued_request_bytes=max_queued_request_bytes,
        )
