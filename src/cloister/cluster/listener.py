"""The listener contract: user code told about every state transition, in order.

A listener is any object with ``on_state_change(from_state, to_state, info)`` and,
optionally, ``on_sentry_change(old_sentry, new_sentry, info)``; each may be sync or async.
Calls are made one at a time from a dedicated task, so a slow listener never blocks the
cluster's control loop, and an exception in a listener is logged and counted — it never
kills the node.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from cloister.cluster.states import State

if TYPE_CHECKING:
    from cloister.cluster.info import ClusterInfo

log = logging.getLogger("cloister.cluster.listener")


@runtime_checkable
class Listener(Protocol):
    """What a cluster calls on every transition. ``on_sentry_change`` is optional."""

    def on_state_change(self, from_state: State, to_state: State, info: ClusterInfo) -> Any:
        """Called exactly once per transition, in order (may be ``async def``)."""


class ListenerDispatcher:
    """Delivers listener events in order from one task; counts listener failures."""

    def __init__(self, listener: object | None) -> None:
        self.listener = listener
        self.errors = 0
        self._queue: asyncio.Queue[tuple[str, tuple[Any, ...]] | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the delivering task (owned by this dispatcher, awaited by :meth:`close`)."""
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="cloister listener dispatcher"
        )

    def state_changed(self, from_state: State, to_state: State, info: ClusterInfo) -> None:
        """Queue ``on_state_change`` for delivery."""
        self._queue.put_nowait(("on_state_change", (from_state, to_state, info)))

    def sentry_changed(self, old: str | None, new: str | None, info: ClusterInfo) -> None:
        """Queue ``on_sentry_change`` for delivery (skipped if the listener lacks it)."""
        self._queue.put_nowait(("on_sentry_change", (old, new, info)))

    async def delivered(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until every event queued so far has been
        delivered: a node that resumes work says so first."""
        if self._task is None or self._task.done():
            return
        try:
            async with asyncio.timeout(timeout):
                await self._queue.join()
        except TimeoutError:
            log.warning("listener still busy after %.2fs; the node goes on without it", timeout)

    async def _run(self) -> None:
        while (item := await self._queue.get()) is not None:
            try:
                await self._deliver(*item)
            finally:
                self._queue.task_done()
        self._queue.task_done()

    async def _deliver(self, method_name: str, args: tuple[Any, ...]) -> None:
        method = getattr(self.listener, method_name, None)
        if method is None:
            return
        try:
            result = method(*args)
            if inspect.isawaitable(result):
                await result
        except Exception:
            self.errors += 1
            log.exception("listener %s%s raised; the node carries on", method_name, args[:2])

    async def close(self) -> None:
        """Deliver everything queued so far, then stop."""
        if self._task is None:
            return
        self._queue.put_nowait(None)
        try:
            await self._task
        finally:
            self._task = None
