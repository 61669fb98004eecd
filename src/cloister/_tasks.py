"""Owned background tasks: a small supervisor in the spirit of trio's nursery.

Every long-lived task in pycloister belongs to a :class:`Supervisor`. The owner starts
tasks through it and closes it on shutdown; closing cancels what is still running and
waits for it. A component started on a node owns a *child* of the node's supervisor: when
the node dies (:meth:`Supervisor.kill`), its components' tasks die with it, as they would
in a process that ended; a graceful close stays each owner's own business, in its order.

Unlike ``asyncio.TaskGroup``, a failing child does not cancel its siblings
(a failing request handler must not stop the heartbeat) — but its exception is never
swallowed: it is logged with the task name and counted in :attr:`Supervisor.failures`.
A task spawned ``critical=True`` is one its owner cannot live without (a node's heartbeat,
control loop, watches): when it ends on its own — raising or returning — the owner is told
at once through ``on_critical(name, error)`` and stops loudly, never lives on without it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("cloister.tasks")


class Supervisor:
    """Owner of a set of asyncio tasks; :meth:`close` cancels and awaits them all."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.failures = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._children: list[Supervisor] = []
        self._parent: Supervisor | None = None
        self._closed = False
        self._killed = False
        self._critical: set[asyncio.Task[Any]] = set()
        self.on_critical: Callable[[str, BaseException | None], None] | None = None
        """Called when a critical task ends on its own, with its name and its error (None
        when it returned)."""

    def child(self, name: str) -> Supervisor:
        """A supervisor for a component of this one's owner: killed with it (:meth:`kill`),
        closed by its own owner."""
        child = Supervisor(name)
        child._parent = self
        if self._killed:
            child._killed = True
        self._children.append(child)
        return child

    def spawn(
        self, coro: Coroutine[Any, Any, Any], name: str, *, critical: bool = False
    ) -> asyncio.Task[Any]:
        """Start ``coro`` as a task owned by this supervisor (see the module doc for
        ``critical``)."""
        if self._closed:
            coro.close()
            raise RuntimeError(f"supervisor {self.name!r} is closed; cannot start {name!r}")
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.name}:{name}")
        if self._killed:  # a dead node runs nothing more: the task never takes a step
            task.cancel()
        self._tasks.add(task)
        if critical:
            self._critical.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        critical = task in self._critical
        self._critical.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.failures += 1
            log.error("task %s failed", task.get_name(), exc_info=exc)
        if critical and not (self._closed or self._killed):
            if exc is None:
                log.error("critical task %s ended on its own", task.get_name())
            if self.on_critical is not None:
                self.on_critical(task.get_name(), exc)

    def cancel_all(self) -> None:
        """Cancel every task now, without waiting (:meth:`close` awaits)."""
        for task in list(self._tasks):
            task.cancel()

    def kill(self) -> None:
        """The owner died: cancel every task, the children's too, and run nothing more."""
        self._killed = True
        self.cancel_all()
        for child in list(self._children):
            child.kill()

    @property
    def killed(self) -> bool:
        """True once :meth:`kill` ran (here or on an ancestor)."""
        return self._killed

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """Cancel every task still running and wait until all have finished."""
        self._closed = True
        if self._parent is not None and self in self._parent._children:
            self._parent._children.remove(self)
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            for task in pending:
                log.warning("task %s ignored cancellation; cancelling again", task.get_name())


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait for ``event`` at most ``timeout`` seconds; True if it was set.

    ``asyncio.wait_for`` can swallow a cancellation on Python 3.11 when the awaited
    thing finishes at the same moment; ``asyncio.timeout`` cannot, so we use it.
    """
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
