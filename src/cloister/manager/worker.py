"""Workers as compact records, and the eager runner that calls user callbacks.

A worker is not a task: it is a small ``__slots__`` record (about a hundred bytes) that the
scheduler hands to a callback when it has something to do. Callbacks run *eagerly*: an
``async def`` callback is started inline and only becomes an asyncio task if it really
suspends (awaits I/O); a callback that finishes without suspending costs one function
call. That is how a single process dispatches hundreds of thousands of performs a second.
"""

from __future__ import annotations

import types
from collections import deque
from collections.abc import Coroutine, Generator
from dataclasses import dataclass
from typing import Any

from cloister.manager.spec import Spec

# Flag bits of Worker.flags
PERFORM_PENDING = 1  # a perform is due and waits for the worker to be free
QUEUED = 2  # the worker sits in the run queue
GONE = 4  # the worker was removed; drop whatever is left for it
POOLED = 8  # its callback is out on the thread pool
RESPEC = 16  # its spec changed at runtime (a permanent Timeout): stored and shipped with it


class Worker:
    """One keyed worker: id, spec, payload and bookkeeping. Not a task."""

    __slots__ = (
        "busy_since",
        "due",
        "failures",
        "fired",
        "flags",
        "id",
        "last",
        "mailbox",
        "payload",
        "spec",
        "watermark",
    )

    def __init__(self, worker_id: Any, spec: Spec, payload: Any) -> None:
        self.id = worker_id
        self.spec = spec
        self.payload = payload
        self.last: Any = None
        self.busy_since = 0.0  # loop time the running callback started; 0.0 = idle
        self.due = 0.0  # loop time of the next perform; 0.0 = none scheduled
        self.fired = 0.0  # the due time of the timer behind the pending perform; 0.0 = none
        self.mailbox: deque[Message] | None = None
        self.flags = 0
        self.failures = 0
        self.watermark = 0  # log sequence of the last inbox message handled (dedup)

    def has_work(self) -> bool:
        return bool(self.mailbox) or bool(self.flags & PERFORM_PENDING)

    def runtime_spec(self) -> dict[str, Any] | None:
        """The spec to store and ship with the worker when it changed at runtime, else None
        (its spec is the catalogue's, which every node knows)."""
        return self.spec.to_wire() if self.flags & RESPEC else None


@dataclass(slots=True)
class Message:
    """A call or cast waiting in a worker's mailbox; ``reply`` is set for calls."""

    kind: str  # "call" | "cast"
    body: Any
    reply: Any = None  # asyncio.Future for calls
    inbox: Any = None  # the InboxMessage a durable cast came from (acked once handled)
    consumer: Any = None  # the LogConsumer to ack it with
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What ``manager.get(id)`` returns: a snapshot of one worker."""

    id: Any
    spec: Spec
    payload: Any
    last_result: Any
    busy_since: float | None
    """Loop time (``asyncio.get_running_loop().time()``) the running callback started."""


_PENDING: Any = object()


def run_eagerly(result: Any) -> tuple[Any, Continuation | None]:
    """Start ``result`` if it is a coroutine; finish it inline if it never suspends.

    Returns ``(value, None)`` when done, or ``(_PENDING, coroutine)`` where the coroutine
    resumes the suspended callback and must be run as a task.
    """
    if not isinstance(result, types.CoroutineType):
        return result, None
    try:
        yielded = result.send(None)
    except StopIteration as stop:
        return stop.value, None
    return _PENDING, Continuation(result, yielded)


def is_pending(value: Any) -> bool:
    """True when :func:`run_eagerly` had to leave the callback running."""
    return value is _PENDING


class Continuation:
    """Awaitable that continues a started coroutine from its first suspension point.

    :meth:`close` ends the callback where it stands (its ``finally`` blocks run), for a
    node that is killed while the callback waits.
    """

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coro = coro
        self.first = first

    def close(self) -> None:
        """Close the suspended callback."""
        self.coro.close()

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, yielded = self.coro, self.first
        while True:
            try:
                sent = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # cancellation and throw() reach the callback
                try:
                    yielded = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
                continue
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value
