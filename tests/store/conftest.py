"""Fixtures for table tests: cluster nodes on a fresh memory world or nats-server."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator

import pytest

from .support import Nodes

_worlds = itertools.count()


@pytest.fixture(params=["memory", "nats"])
async def nodes(request: pytest.FixtureRequest) -> AsyncIterator[Nodes]:
    """Cluster nodes on either backend; all stopped at the end of the test."""
    if request.param == "memory":
        url = f"memory://store-{next(_worlds)}-{time.monotonic_ns()}"
    else:
        url = request.getfixturevalue("nats_server").url
    async with Nodes(url) as made:
        yield made


@pytest.fixture
async def memory_nodes() -> AsyncIterator[Nodes]:
    """Cluster nodes on a fresh memory world (failure injection available)."""
    async with Nodes(f"memory://store-{next(_worlds)}-{time.monotonic_ns()}") as made:
        yield made
