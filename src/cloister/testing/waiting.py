"""Wait for a condition in a test: :func:`eventually` (async) and :func:`wait_for` (sync).

Both poll until the condition holds and fail the test with ``what`` after ``timeout``
seconds, so that a test states what it waits for instead of sleeping for a guess.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["eventually", "wait_for"]

T = TypeVar("T")

INTERVAL = 0.005  # cheap checks on one machine: fast polling keeps measured delays tight


def _failure(timeout: float, what: object) -> AssertionError:
    return AssertionError(f"not true after {timeout}s: {what}")


async def eventually(
    predicate: Callable[[], object | Awaitable[object]],
    timeout: float = 5.0,
    what: str = "",
    *,
    interval: float = INTERVAL,
) -> float:
    """Wait until ``predicate()`` (sync, or async: awaited) is truthy; return how long
    it took in seconds. Raises :class:`AssertionError` naming ``what`` after ``timeout``."""
    start = time.monotonic()
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise _failure(timeout, what or predicate)
        await asyncio.sleep(interval)


def wait_for(
    check: Callable[[], T | None], timeout: float, what: str, *, interval: float = 0.05
) -> T:
    """For sync tests (real processes): call ``check`` until it returns something other
    than None and return that; :class:`AssertionError` naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise _failure(timeout, what)
        time.sleep(interval)
