"""What the engine does when a worker's callback fails, when a response takes the worker
out of its table (``Halt``, a re-key), and when the lease ran out around a callback
(hold, discard): the cold paths, apart from the dispatcher.

Functions of the engine (typed by :class:`EngineView`) rather than methods: the engine
calls them only on these paths, so the hot loop pays nothing for them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable
from typing import Any, Protocol

from cloister._backoff import Backoff
from cloister._tasks import Supervisor
from cloister.errors import NotOwnerError, RemoteError
from cloister.manager.ports import Callbacks, Options, Permit, Ports
from cloister.manager.scheduler import TimerWheel
from cloister.manager.spec import Spec, check_id, make_spec
from cloister.manager.state import Stored
from cloister.manager.types import Key, ManagerCounters, Reason
from cloister.manager.worker import GONE, PERFORM_PENDING, QUEUED, Message, Worker

log = logging.getLogger("cloister.manager")


class EngineView(Protocol):
    """What recovery needs of the engine."""

    name: str
    callbacks: Callbacks
    options: Options
    ports: Ports
    counters: ManagerCounters
    supervisor: Supervisor
    timers: TimerWheel
    workers: dict[Key, Worker | Spec]
    specs: dict[Key, Spec]
    wake: asyncio.Event
    runnable: deque[Worker]
    permit: Permit
    held: bool
    late_logged: float

    def enqueue(self, worker: Worker) -> None: ...

    def reschedule(self, worker: Worker, started: float, override: float | None) -> None: ...

    def remove(self, worker_id: Key, reason: str) -> Awaitable[None]: ...

    def put(self, worker_id: Key, spec: Spec, *, known: bool) -> Awaitable[None]: ...

    def invoke_quietly(self, fn: Any, *args: Any) -> Awaitable[Any]: ...


def failed(
    engine: EngineView, worker: Worker, exc: Exception, message: Message | None, started: float
) -> None:
    """A callback raised: count it, fail its caller, then retry, remove, restart or carry
    on as ``on_error`` says."""
    engine.counters.errors += 1
    worker.failures += 1
    what = "perform" if message is None else f"handle_{message.kind}"
    log.error("%s: %s of worker %r raised %r", engine.name, what, worker.id, exc, exc_info=exc)
    if message is not None and message.reply is not None and not message.reply.done():
        message.reply.set_exception(RemoteError(f"{what} of worker {worker.id!r} raised {exc!r}"))
    if message is not None and message.inbox is not None and _retry(engine, worker, message, exc):
        return
    on_error = engine.options.on_error
    if on_error == "remove":
        engine.specs.pop(worker.id, None)
        worker.flags |= GONE
        engine.supervisor.spawn(halt(engine, worker, Reason.ERROR), f"remove {worker.id!r}")
    elif on_error == "restart":
        backoff = Backoff(*engine.options.restart_backoff).delay(worker.failures - 1)
        worker.payload = worker.spec.payload
        loop = asyncio.get_running_loop()
        if worker.spec.timeout:
            engine.timers.schedule(worker, loop.time() + backoff)
        else:  # never periodic: no perform, its messages wait for the backoff
            worker.busy_since = loop.time()
            loop.call_later(backoff, _retry_due, engine, worker)
        if engine.callbacks.init is not None:
            engine.supervisor.spawn(_reinit(engine, worker), f"reinit {worker.id!r}")
    elif message is None:
        engine.reschedule(worker, started, None)
    elif worker.mailbox:
        engine.enqueue(worker)


def _retry(engine: EngineView, worker: Worker, message: Message, exc: Exception) -> bool:
    """A durable cast failed: retry it in place (the key waits) or park it."""
    message.attempts += 1
    if message.attempts >= engine.options.max_attempts:
        park = engine.ports.park
        assert park is not None
        engine.counters.dead_letters += 1
        reason = f"handle_cast raised {exc!r} {message.attempts} times"
        engine.supervisor.spawn(
            park(message.consumer, message.inbox, reason, message.attempts),
            f"park {worker.id!r}",
        )
        return False
    engine.counters.retries += 1
    if worker.mailbox is None:
        worker.mailbox = deque()
    worker.mailbox.appendleft(message)  # first again: later messages keep their order
    loop = asyncio.get_running_loop()
    worker.busy_since = loop.time()  # holds the key during the backoff
    delay = Backoff(*engine.options.retry_backoff).delay(message.attempts - 1)
    loop.call_later(delay, _retry_due, engine, worker)
    return True


def _retry_due(engine: EngineView, worker: Worker) -> None:
    worker.busy_since = 0.0
    if not worker.flags & GONE:
        engine.enqueue(worker)


async def _reinit(engine: EngineView, worker: Worker) -> None:
    assert engine.callbacks.init is not None
    worker.payload = await engine.invoke_quietly(engine.callbacks.init, worker.id, worker.payload)


async def halt(engine: EngineView, worker: Worker, reason: str) -> None:
    """Remove a worker for good (``Halt``, or ``on_error="remove"``)."""
    # Only if still ours: a delete, put or stop in between already terminated it.
    # remove() also fails the calls still queued behind the halt.
    if engine.workers.get(worker.id) is worker:
        await engine.remove(worker.id, reason)
    write = engine.ports.write
    if write is not None:
        await write(Stored(worker.id, None, None, False, deleted=True))


async def rekey(engine: EngineView, worker: Worker, new_id: Any) -> None:
    """Move a worker to ``new_id`` (``Replace(p, id=new_id)``), its payload with it."""
    old_id = worker.id
    try:
        check_id(new_id)
    except TypeError as exc:  # the worker carries on under its old id
        engine.counters.errors += 1
        log.error("%s: cannot re-key worker %r: %s", engine.name, old_id, exc)
        engine.reschedule(worker, asyncio.get_running_loop().time(), None)
        engine.wake.set()
        return
    spec = engine.specs.pop(old_id, worker.spec)
    if engine.workers.get(old_id) is worker:
        await engine.remove(old_id, Reason.REKEY)
    write = engine.ports.write
    if write is not None:
        await write(Stored(old_id, None, None, False, deleted=True))
    fields = spec.to_wire()
    fields["payload"] = worker.payload
    put = engine.ports.put
    if put is not None:
        await put(new_id, fields)
    else:  # standalone: the new id lives here too
        await engine.put(new_id, make_spec(new_id, fields), known=False)


def hold(engine: EngineView, worker: Worker, message: Message | None) -> None:
    """The lease ran out before ``worker``'s callback could start: keep the work, in
    order, for when the lease is renewed (or the node gives the worker up)."""
    if message is None:
        worker.flags |= PERFORM_PENDING
        engine.counters.performs -= 1  # counted by _step; it did not run
    else:
        if worker.mailbox is None:
            worker.mailbox = deque()
        worker.mailbox.appendleft(message)
        if message.kind == "call":
            engine.counters.calls -= 1
    worker.flags |= QUEUED
    engine.runnable.appendleft(worker)
    engine.held = True
    engine.wake.set()


def discard(engine: EngineView, worker: Worker, message: Message | None, started: float) -> None:
    """A result that came back after the lease ran out: another node may own the key
    by now, so nothing of it is applied, acked or stored; the message is redelivered
    to whoever owns the key next."""
    engine.counters.late_results += 1
    if engine.late_logged != engine.permit.lease_until:
        engine.late_logged = engine.permit.lease_until
        log.warning(
            "%s: a result of worker %r came back %.2fs after the lease ran out; "
            "discarded (the key's next owner handles its message again)",
            engine.name,
            worker.id,
            time.monotonic() - engine.permit.lease_until,
        )
    if message is not None:
        if message.reply is not None and not message.reply.done():
            message.reply.set_exception(
                NotOwnerError(f"worker {worker.id!r}: this node lost its lease; retry")
            )
        if message.inbox is not None and engine.ports.forget is not None:
            engine.ports.forget(1)
    elif worker.spec.timeout:
        engine.reschedule(worker, started, None)
