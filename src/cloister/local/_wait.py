"""Polling helpers shared by the sync and async waits of the harness."""

# The async waits take a timeout so that expiry raises our error carrying logs and state
# (asyncio.timeout would only raise a bare TimeoutError).

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

POLL_INTERVAL = 0.02


def poll(
    check: Callable[[], T | None], timeout: float, interval: float = POLL_INTERVAL
) -> T | None:
    """Call ``check`` until it returns something other than ``None`` or ``timeout`` passes.

    ``check`` may raise to abort the wait. Returns ``None`` on timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


async def poll_async(
    check: Callable[[], T | None], timeout: float, interval: float = POLL_INTERVAL
) -> T | None:
    """Like :func:`poll`, but sleeps with ``asyncio.sleep`` so the event loop keeps running."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(interval)
