"""Fixtures for cluster tests on the memory backend."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import pytest

from .support import Harness

_worlds = itertools.count()


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    """Nodes started through it are stopped at the end of the test."""
    async with AsyncExitStack() as stack:
        yield Harness(stack, f"cluster-test-{next(_worlds)}")
