"""The engine: the worker table, the timer wheel, the run queue and the dispatcher.

It runs user callbacks and carries out their responses, and knows nothing of a cluster:
what a cluster adds (acking an inbox record, parking a dead letter, storing a replaced
payload, re-keying through the router) comes in as :class:`Ports`, all optional, so an
engine runs standalone with none of them.

The worker table hides ``Worker | Spec``: an idle worker that still has its spec's payload
is stored as its (shared) Spec — a dict entry and nothing else; it becomes a Worker once it
has something to do or to remember (:meth:`Engine.materialize`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import time
import types
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

from cloister._tasks import Supervisor
from cloister.backends import LogConsumer
from cloister.errors import HandlerTimeoutError, UnknownWorkerError
from cloister.manager.executor import Item, NotStarted, Raised, ThreadRunner
from cloister.manager.ports import (
    UNBOUNDED,
    Callback,
    Callbacks,
    Options,
    Permit,
    Ports,
)
from cloister.manager.recovery import discard, failed, halt, hold, rekey
from cloister.manager.responses import Halt, Ok, Replace, Timeout, reply_of
from cloister.manager.scheduler import TimerWheel, phase
from cloister.manager.spec import Spec
from cloister.manager.state import Stored
from cloister.manager.types import Key, ManagerCounters, ManagerTimings, Reason
from cloister.manager.worker import (
    GONE,
    PERFORM_PENDING,
    POOLED,
    QUEUED,
    RESPEC,
    Continuation,
    Message,
    Worker,
    WorkerInfo,
    run_eagerly,
)
from cloister.store.inbox import InboxMessage

__all__ = ["Callbacks", "Engine", "Options", "Ports", "UnknownWorkerError"]

log = logging.getLogger("cloister.manager")

_HOLD = 0.05  # seconds the dispatcher waits for a lease renewal before it looks again
# Pool jobs handed over at once at most: the dispatcher keeps the jobs of its passes for
# one hand-over until it stops (see executor), or until this many are waiting.
_POOL_BATCH = 8192


class Engine:
    """Runs keyed workers: their table, timers, run queue, dispatcher and responses."""

    def __init__(
        self,
        callbacks: Callbacks,
        options: Options,
        supervisor: Supervisor,
        ports: Ports | None = None,
        counters: ManagerCounters | None = None,
        timings: ManagerTimings | None = None,
    ) -> None:
        self.callbacks = callbacks
        self.options = options
        self.supervisor = supervisor
        self.ports = ports if ports is not None else Ports()
        self.counters = counters if counters is not None else ManagerCounters()
        self.timings = timings if timings is not None else ManagerTimings()
        # The histograms at hand: one clock read and one observation per callback.
        self._timed_perform = self.timings.callbacks["perform"]
        self._timed_cast = self.timings.callbacks["handle_cast"]
        self._timed_call = self.timings.callbacks["handle_call"]
        # The right to work; a cluster gives its member lease (see ports.Permit).
        self.permit: Permit = UNBOUNDED
        self.held = False  # a callback waited for the permit: the dispatcher backs off
        self.late_logged = 0.0  # the lease whose late results were logged already
        self.name = options.name
        self.concurrency = options.concurrency
        # Live workers (see the module's docstring: Worker, or an idle worker's Spec).
        self.workers: dict[Key, Worker | Spec] = {}
        # Every id this node may run and does not run yet (a cluster's catalogue; empty
        # standalone, where every id is live).
        self.specs: dict[Key, Spec] = {}
        # Messages for ids about to start here (owned, waiting for the handoff barrier).
        self.parked: dict[Key, list[Message]] = {}
        self.timers = TimerWheel()
        self.runnable: deque[Worker] = deque()
        self.in_flight = 0
        self.paused = False  # the dispatcher's gate (see Lifecycle)
        self.wake = asyncio.Event()
        self._running_tasks: dict[Worker, asyncio.Task[Any]] = {}
        self._continuations: dict[Worker, Continuation] = {}
        self._init = callbacks.init
        self._terminate = callbacks.terminate
        # Sync callbacks run on a thread pool unless the manager asked for the loop: a
        # blocking handler must not hold lease renewals (see executor).
        self.threads: ThreadRunner | None = None
        if options.executor in ("thread", "process"):  # (process: threads that wait on children)
            self.threads = ThreadRunner(
                f"cloister-{options.name}",
                options.pool_size,
                self._jobs_done,
                self._job_overdue,
                options.handler_timeout,
                lambda: self.permit.lease_until,
            )
        # Jobs appended here during a pass go to the pool as one batch (see executor).
        self._pooled: list[Item] = self.threads.pending if self.threads is not None else []
        self._jobs_settled = asyncio.Event()
        # Called with the handler timeout when a pool job is abandoned (process pools kill
        # the children inside a callback that long).
        self.on_abandon: Callable[[float | None], Any] | None = None
        self._abandoning: set[Worker] = set()
        self._offload_perform = self._offloads(callbacks.perform)
        self._offload_call = self._offloads(callbacks.handle_call)
        self._offload_cast = self._offloads(callbacks.handle_cast)

    def _offloads(self, callback: Callback) -> bool:
        """Whether ``callback`` runs on the thread pool: a sync function the user wrote
        (a coroutine function, or a default that does nothing, stays on the loop)."""
        return (
            self.threads is not None
            and not inspect.iscoroutinefunction(callback)
            and not getattr(callback, "__cloister_inline__", False)
        )

    def set_paused(self, paused: bool) -> None:
        """Hold (True) or free the dispatcher."""
        self.paused = paused
        if not paused:
            self.wake.set()

    def start(self) -> None:
        """Start the dispatcher task."""
        self.supervisor.spawn(self._dispatch_loop(), "dispatcher")

    def close(self) -> None:
        """Stop the thread pool (a callback still inside a thread finishes on its own)."""
        if self.threads is not None:
            self.threads.close()

    # -- the table ----------------------------------------------------------------------------

    def spec_of(self, worker_id: Key) -> Spec | None:
        """The spec of a live or known id, or None."""
        entry = self.workers.get(worker_id)
        if entry is not None:
            return entry.spec if isinstance(entry, Worker) else entry
        return self.specs.get(worker_id)

    def info(self, worker_id: Key) -> WorkerInfo | None:
        """A snapshot of a live worker, or None."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return None
        if not isinstance(worker, Worker):
            return WorkerInfo(worker_id, worker, worker.payload, None, None)
        return WorkerInfo(
            id=worker.id,
            spec=worker.spec,
            payload=worker.payload,
            last_result=worker.last,
            busy_since=worker.busy_since or None,
        )

    def materialize(self, worker_id: Key) -> Worker | None:
        """The worker as a full :class:`Worker` (turning a bare Spec entry into one)."""
        entry = self.workers.get(worker_id)
        if entry is None or isinstance(entry, Worker):
            return entry
        worker = self.workers[worker_id] = Worker(worker_id, entry, entry.payload)
        return worker

    async def spawn(
        self, worker_id: Key, spec: Spec, payload: Any, now: float, *, fresh: bool = True
    ) -> None:
        """Start one worker (``init`` first, for a fresh one)."""
        if payload is None:
            payload = spec.payload
        init = self._init
        if init is not None and fresh:
            value, rest = run_eagerly(init(worker_id, payload))
            payload = await rest if rest is not None else value
        self.spawn_now(worker_id, spec, payload, now)

    def spawn_now(self, worker_id: Key, spec: Spec, payload: Any, now: float) -> None:
        """Start one worker without ``init`` (the hot path of a million idle ones)."""
        parked = self.parked.pop(worker_id, None) if self.parked else None
        if payload is spec.payload and not spec.timeout and not spec.instant_perform and not parked:
            self.workers[worker_id] = spec  # idle: nothing but a dict entry
            return
        worker = Worker(worker_id, spec, payload)
        self.workers[worker_id] = worker
        delay = spec.first_delay
        if delay is not None:  # Tarearbol's integer instant_perform: first perform after it
            self.timers.schedule(worker, now + delay)
            self.wake.set()
        elif spec.instant_perform:
            worker.flags |= PERFORM_PENDING
            self.enqueue(worker)
        elif spec.timeout:
            self.timers.schedule(worker, now + phase(worker_id, spec.timeout))
            self.wake.set()  # the dispatcher may be asleep until a later due time
        if parked:
            worker.mailbox = deque(parked)
            self.enqueue(worker)

    async def put(self, worker_id: Key, spec: Spec, *, known: bool) -> None:
        """Add or replace a worker. ``known`` (a cluster's): its spec joins the catalogue,
        and while the dispatcher is held it starts only when its id is settled here."""
        if known:
            self.specs[worker_id] = spec
        if worker_id in self.workers:
            await self.remove(worker_id, Reason.REPLACE)
        if not known or not self.paused:
            await self.spawn(worker_id, spec, None, asyncio.get_running_loop().time())

    async def delete(self, worker_id: Key) -> bool:
        """Forget ``worker_id`` (``terminate("delete")``); True when it existed."""
        existed = self.specs.pop(worker_id, None) is not None or worker_id in self.workers
        if worker_id in self.workers:
            await self.remove(worker_id, Reason.DELETE)
        return existed

    async def remove(self, worker_id: Key, reason: str) -> None:
        """Stop one live worker (after its running callback) and call ``terminate``."""
        entry = self.workers.pop(worker_id, None)
        if entry is None:
            return
        terminate = self._terminate
        if not isinstance(entry, Worker):
            if terminate is not None:
                await self.invoke_quietly(terminate, reason, worker_id, entry.payload)
            return
        worker: Worker = entry
        worker.flags |= GONE
        await self.wait_idle(worker)
        if worker.mailbox:
            for message in worker.mailbox:
                if message.reply is not None and not message.reply.done():
                    message.reply.set_exception(
                        UnknownWorkerError(f"worker {worker.id!r} stopped ({reason})")
                    )
            worker.mailbox = None
        if terminate is not None:
            await self.invoke_quietly(terminate, reason, worker.id, worker.payload)

    async def wait_idle(self, worker: Worker) -> None:
        """Wait for the worker's running callback, if any."""
        task = self._running_tasks.get(worker)
        if task is not None:
            await asyncio.wait([task])
        while worker.flags & POOLED:
            await self._jobs_settled.wait()
        task = self._running_tasks.get(worker)  # a sync callback that returned a coroutine
        if task is not None:
            await asyncio.wait([task])

    async def drain(self) -> None:
        """Wait until no callback is running."""
        while True:
            if pending := [t for t in self._running_tasks.values() if not t.done()]:
                await asyncio.wait(pending)
            elif self.threads is not None and len(self.threads):
                await self._jobs_settled.wait()
            else:
                return

    async def invoke_quietly(self, fn: Callback, *args: Any) -> Any:
        """Run a callback; an exception is counted and logged, never raised."""
        try:
            value, rest = run_eagerly(fn(*args))
            return await rest if rest is not None else value
        except Exception:
            self.counters.errors += 1
            log.exception("%s.%s%r raised", self.name, getattr(fn, "__name__", fn), args[:2])
            return None

    # -- messages -----------------------------------------------------------------------------

    def deliver(self, worker_id: Key, message: Message) -> None:
        """Queue ``message`` in the worker's mailbox (or park it for an id to come)."""
        worker = self.materialize(worker_id)
        if worker is None:
            if worker_id in self.specs:
                # owned but not started yet (waiting for the handoff barrier): keep in order
                self.parked.setdefault(worker_id, []).append(message)
                return
            raise UnknownWorkerError(f"no worker with id {worker_id!r}; add it with put()")
        if worker.mailbox is None:
            worker.mailbox = deque()
        worker.mailbox.append(message)
        self.enqueue(worker)

    def deliver_record(self, message: InboxMessage, consumer: LogConsumer) -> None:
        """An inbox record arrived for one of our partitions: run it or queue it.

        A worker with nothing queued and nothing running handles it at once, here — the
        fetch loop is never inside a callback, and nothing can be ahead of the record in
        that worker's order. Otherwise it joins the worker's mailbox behind the rest.
        """
        cast = Message("cast", message.message, inbox=message, consumer=consumer)
        try:
            worker = self.materialize(message.key)
            if (
                worker is not None
                and not worker.mailbox
                and not worker.busy_since
                and not worker.flags  # not queued, no perform pending, not gone
                and not self.paused
                and self.in_flight < self.concurrency
            ):
                self._cast(worker, cast, asyncio.get_running_loop())
                if self._pooled:
                    self.threads.kick_soon()  # type: ignore[union-attr]  # pooled: a pool
                return
            self.deliver(message.key, cast)
        except (UnknownWorkerError, TypeError) as exc:  # no such worker, or an unusable key
            park = self.ports.park
            assert park is not None
            self.counters.dead_letters += 1
            self.supervisor.spawn(park(consumer, message, str(exc), 0), "park")

    def enqueue(self, worker: Worker) -> None:
        """Put the worker in the run queue (unless queued or busy)."""
        if not worker.flags & QUEUED and not worker.busy_since:
            worker.flags |= QUEUED
            self.runnable.append(worker)
            self.wake.set()

    # -- the dispatcher -----------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        try:
            await self._dispatch()
        finally:
            if self._pooled:  # cancelled between two passes: jobs it started still go out
                self.threads.kick()  # type: ignore[union-attr]  # pooled: a pool

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        timers, runnable, pooled = self.timers, self.runnable, self._pooled
        budget = 2048  # callbacks between yields to the event loop
        while True:
            if not self.paused:
                now = loop.time()
                for worker in timers.pop_due(now):
                    worker.flags |= PERFORM_PENDING
                    if not worker.flags & QUEUED and not worker.busy_since:
                        worker.flags |= QUEUED
                        runnable.append(worker)
                done = 0
                while runnable and self.in_flight < self.concurrency and not self.paused:
                    worker = runnable.popleft()
                    worker.flags &= ~QUEUED
                    if worker.flags & GONE or worker.busy_since:
                        continue
                    self._step(worker, loop)
                    if self.held:
                        break
                    done += 1
                    if done >= budget:
                        break
                # Pool jobs go out when the dispatcher stops for now, not after each pass:
                # a hand-over per pass would wake a thread that then waits for the GIL
                # while the next pass runs (see executor).
                if pooled and (done < budget or self.held or len(pooled) >= _POOL_BATCH):
                    self.threads.kick()  # type: ignore[union-attr]  # pooled: a pool
                if self.held:
                    # The lease ran out: nothing starts until it is renewed (a moment) or
                    # the node suspends and gives the workers up.
                    self.held = False
                    self.wake.clear()
                    try:
                        async with asyncio.timeout(_HOLD):
                            await self.wake.wait()
                    except TimeoutError:
                        pass
                    continue
                if done >= budget:
                    await asyncio.sleep(0)
                    continue
            if pooled:  # paused between two passes
                self.threads.kick()  # type: ignore[union-attr]  # pooled: a pool
            self.wake.clear()
            next_due = None if self.paused else timers.next_due()
            delay = None if next_due is None else max(0.0, next_due - loop.time())
            if runnable and not self.paused and self.in_flight < self.concurrency:
                delay = 0.0
            try:
                async with asyncio.timeout(delay):
                    await self.wake.wait()
            except TimeoutError:
                pass

    def _step(self, worker: Worker, loop: asyncio.AbstractEventLoop) -> None:
        """Run the worker's next piece of work: a message first, else a due perform."""
        mailbox = worker.mailbox
        if mailbox:
            message = mailbox.popleft()
            if message.kind == "call":
                self.counters.calls += 1
                self._run(worker, self.callbacks.handle_call, message, loop, self._offload_call)
            else:
                self._cast(worker, message, loop)
        elif worker.flags & PERFORM_PENDING:
            worker.flags &= ~PERFORM_PENDING
            self.counters.performs += 1
            self._run(worker, self.callbacks.perform, None, loop, self._offload_perform)

    def _cast(self, worker: Worker, message: Message, loop: asyncio.AbstractEventLoop) -> None:
        if message.inbox is not None and message.inbox.record.sequence <= worker.watermark:
            self._duplicate(worker, message)  # redelivered after a handoff or crash
            return
        self._run(worker, self.callbacks.handle_cast, message, loop, self._offload_cast)

    def _run(
        self,
        worker: Worker,
        callback: Callback,
        message: Message | None,
        loop: asyncio.AbstractEventLoop,
        offload: bool,
    ) -> None:
        started = loop.time()  # the event loop's clock is time.monotonic(), as the lease's
        permit = self.permit
        if started >= permit.lease_until:
            hold(self, worker, message)
            return
        if offload:
            worker.busy_since = started
            worker.flags |= POOLED
            self.in_flight += 1
            self._pooled.append((callback, worker, message, started))
            return
        try:
            if message is None:
                value, rest = run_eagerly(callback(worker.id, worker.payload))
            else:
                value, rest = run_eagerly(callback(message.body, worker.id, worker.payload))
        except Exception as exc:
            failed(self, worker, exc, message, started)
            return
        if rest is None:
            # No second clock read on this hot path: a sync callback that blocked past the
            # lease has its result applied in memory only — its ack and payload are refused
            # by the lease checks where they are written (ownership), and the suspension
            # that follows drops the memory.
            self._apply(worker, value, message, started)
            return
        worker.busy_since = started
        self.in_flight += 1
        self._start_task(worker, rest, message, started, loop)

    def _start_task(
        self,
        worker: Worker,
        rest: Continuation,
        message: Message | None,
        started: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Go on with a callback that suspended, as a task (the worker is busy until it
        ends)."""
        task = self.supervisor.spawn(
            self._finish(worker, rest, message, started), f"worker {worker.id!r}"
        )
        self._running_tasks[worker] = task
        self._continuations[worker] = rest
        # A task cancelled before its first step (the node died at once) never resumes
        # ``rest``: close it then, so its ``finally`` blocks run now, as in a process that
        # ended, rather than whenever it is collected.
        task.add_done_callback(partial(_close_if_cancelled, rest))
        if message is None and worker.spec.timeout:
            threshold = worker.spec.lull * worker.spec.timeout
            handle = loop.call_later(threshold, self._slow, worker, started)
            task.add_done_callback(lambda _t: handle.cancel())
        limit = self.options.handler_timeout
        if limit is not None:
            overdue = loop.call_later(limit, self._task_overdue, worker, started, task)
            task.add_done_callback(lambda _t: overdue.cancel())

    async def _finish(
        self,
        worker: Worker,
        rest: Continuation,
        message: Message | None,
        started: float,
    ) -> None:
        try:
            value = await rest
        except asyncio.CancelledError:
            if worker not in self._abandoning:
                raise
            self._abandoning.discard(worker)
            failed(self, worker, self._timeout_error(worker, message), message, started)
        except Exception as exc:
            failed(self, worker, exc, message, started)
        else:
            if time.monotonic() >= self.permit.lease_until:
                discard(self, worker, message, started)
            else:
                self._apply(worker, value, message, started)
        finally:
            self._running_tasks.pop(worker, None)
            self._continuations.pop(worker, None)
            self._release(worker, started)
            self.wake.set()

    def _release(self, worker: Worker, started: float) -> None:
        """A callback of ``worker`` is over: free the worker and queue its next work."""
        if worker.busy_since == started:  # else failed() holds it for a backoff
            worker.busy_since = 0.0
        self.in_flight -= 1
        if worker.has_work() and not worker.flags & GONE:
            self.enqueue(worker)

    def _slow(self, worker: Worker, started: float) -> None:
        if worker.busy_since == started:
            self.counters.timeouts += 1
            self._report_timeout(worker)

    def _report_timeout(self, worker: Worker) -> None:
        info = self.info(worker.id)
        if info is not None:
            self.supervisor.spawn(
                self.invoke_quietly(self.callbacks.handle_timeout, info), "handle_timeout"
            )

    # -- callbacks on the thread pool ---------------------------------------------------------

    def _jobs_done(self, jobs: list[Item], outcomes: list[Any]) -> None:
        """Results from the thread pool (on the loop): applied as :meth:`_finish` does.

        The hot path of sync callbacks: a plain return value, in time, is applied with the
        worker freed first (so that ``_apply`` queues its next work itself)."""
        late = time.monotonic() >= self.permit.lease_until
        apply = self._apply
        for job, value in zip(jobs, outcomes, strict=True):
            _, worker, message, started = job
            worker.flags &= ~POOLED
            kind = type(value)
            if late or kind is Raised or kind is types.CoroutineType or kind is NotStarted:
                self._job_cold(job, value, late)
                continue
            worker.busy_since = 0.0
            apply(worker, value, message, started)
            if worker.flags & PERFORM_PENDING and not worker.flags & GONE:
                self.enqueue(worker)
        self.in_flight -= len(jobs)
        self._pool_settled()

    def _pool_settled(self) -> None:
        """Pool jobs ended or were given up: wake whoever waits for them (wait_idle, drain)
        and the dispatcher."""
        settled, self._jobs_settled = self._jobs_settled, asyncio.Event()
        settled.set()
        self.wake.set()

    def _job_cold(self, job: Item, value: Any, late: bool) -> None:
        """A pool result that failed, came back late, or is a coroutine to go on with."""
        _, worker, message, started = job
        if type(value) is NotStarted:
            hold(self, worker, message)  # never ran: kept, in order, for a renewed lease
        elif type(value) is Raised:
            error = value.exception
            if not isinstance(error, Exception):  # SystemExit & co., raised in a thread
                error = RuntimeError(f"callback raised {error!r}")
            failed(self, worker, error, message, started)
        elif late:
            discard(self, worker, message, started)
        else:  # a sync function that returned a coroutine: it goes on, on the loop
            value, rest = run_eagerly(value)
            if rest is not None:
                self.in_flight += 1  # still running: _finish frees it
                self._start_task(worker, rest, message, started, asyncio.get_running_loop())
                return
            self._apply(worker, value, message, started)
        if worker.busy_since == started:  # else failed() holds it for a backoff
            worker.busy_since = 0.0
        if worker.has_work() and not worker.flags & GONE:
            self.enqueue(worker)

    def _job_overdue(self, job: Item) -> None:
        """A pool job has run past ``handler_timeout`` (called once, on the loop)."""
        _, worker, message, started = job
        self.counters.handler_timeouts += 1
        self._report_timeout(worker)
        if (
            self.options.on_handler_timeout != "abandon"
            or not worker.flags & POOLED
            or worker.busy_since != started
        ):
            return
        assert self.threads is not None
        self.threads.abandon(job)
        if self.on_abandon is not None:
            self.on_abandon(self.options.handler_timeout)
        worker.flags &= ~POOLED
        self.counters.abandoned += 1
        self.counters.late_results += 1  # its result, whenever it comes, is discarded
        failed(self, worker, self._timeout_error(worker, message), message, started)
        self._release(worker, started)
        self._pool_settled()

    def _task_overdue(self, worker: Worker, started: float, task: asyncio.Task[Any]) -> None:
        """An async callback has run past ``handler_timeout``."""
        if task.done() or worker.busy_since != started:
            return
        self.counters.handler_timeouts += 1
        self._report_timeout(worker)
        if self.options.on_handler_timeout == "abandon":
            self.counters.abandoned += 1
            self._abandoning.add(worker)
            task.cancel("handler timeout")

    def _timeout_error(self, worker: Worker, message: Message | None) -> HandlerTimeoutError:
        what = "perform" if message is None else f"handle_{message.kind}"
        return HandlerTimeoutError(
            f"{what} of worker {worker.id!r} ran longer than handler_timeout="
            f"{self.options.handler_timeout}s and was abandoned"
        )

    def _apply(
        self, worker: Worker, response: Any, message: Message | None, started: float
    ) -> None:
        """Carry out a callback's response."""
        worker.failures = 0
        took = time.monotonic() - started
        if message is None:
            self._timed_perform.observe(took)
        elif message.kind == "cast":
            self.counters.casts += 1  # handled: a failed try counts as an error or a retry
            self._timed_cast.observe(took)
        else:
            self._timed_call.observe(took)
        if message is not None and message.inbox is not None:
            stored_at = message.inbox.record.stored_at
            if stored_at is not None:
                self.timings.cast_latency.observe(max(0.0, time.time() - stored_at))
            worker.watermark = message.inbox.record.sequence
            ack = self.ports.ack
            assert ack is not None
            # Ack only once payload and watermark are stored (see BeforeAck): a crash
            # then never loses the state a message produced, nor replays the message.
            ack(message.consumer, message.inbox.record, worker.id)
        if message is not None and message.reply is not None and not message.reply.done():
            message.reply.set_result(reply_of(response))
        next_timeout: float | None = None
        if isinstance(response, Replace):
            worker.payload = response.payload
            if response.rekeys and response.id != worker.id:
                self.supervisor.spawn(rekey(self, worker, response.id), f"rekey {worker.id!r}")
                return
        elif isinstance(response, Halt):
            self.specs.pop(worker.id, None)
            worker.flags |= GONE
            self.supervisor.spawn(halt(self, worker, response.reason), f"halt {worker.id!r}")
            return
        elif isinstance(response, Timeout):
            worker.last = response.result
            next_timeout = response.seconds
            if response.permanent:
                self._change_period(worker, float(response.seconds))
                if not next_timeout:
                    next_timeout = None  # period 0: no more periodic performs
        elif isinstance(response, Ok):
            worker.last = response.result
        else:
            worker.last = response
        # Only a new payload is stored. A message that left the payload as it was needs no
        # write before its ack: were its ack lost, running it again changes nothing stored
        # (at-least-once, as for any side effect), and the payload stored last still
        # matches the watermark stored with it.
        mark = self.ports.mark
        if mark is not None and (
            isinstance(response, Replace) or (isinstance(response, Timeout) and response.permanent)
        ):
            mark(
                Stored(
                    worker.id,
                    worker.runtime_spec(),
                    worker.payload,
                    True,
                    watermark=worker.watermark,
                )
            )
        if message is None:
            self.reschedule(worker, started, next_timeout)
            return
        if next_timeout is not None:  # Timeout(s) from a call or cast: next perform in s
            self.timers.schedule(worker, asyncio.get_running_loop().time() + next_timeout)
        if worker.mailbox or worker.flags & PERFORM_PENDING:
            self.enqueue(worker)

    def _change_period(self, worker: Worker, period: float) -> None:
        """A permanent ``Timeout``: the worker's spec (and the catalogue's) gets ``period``."""
        spec = dataclasses.replace(worker.spec, timeout=period)
        worker.spec = spec
        worker.flags |= RESPEC
        if not period:
            worker.due = 0.0  # a timer already set is stale now: it fires nothing
        if worker.id in self.specs:
            self.specs[worker.id] = spec

    def reschedule(self, worker: Worker, started: float, override: float | None) -> None:
        """Schedule the worker's next perform (``override``: in that many seconds)."""
        timeout = worker.spec.timeout if override is None else override
        if not timeout and override is None:
            if worker.mailbox:
                self.enqueue(worker)
            return
        if override is None:
            # Periodic performs keep to their grid (due, due + timeout, ...): a late perform
            # does not shift the ones after it, so a pause leaves no clump of workers due
            # together behind. Missed ticks coalesce: the ticks that passed before this
            # perform started are covered by it, and a tick that passed while it ran makes
            # the next one due at once — never a burst of catch-up performs.
            when = (worker.fired or started) + timeout
            if when <= started:
                when += timeout * ((started - when) // timeout + 1)
        else:
            when = asyncio.get_running_loop().time() + timeout
        worker.fired = 0.0
        self.timers.schedule(worker, when)
        if worker.mailbox:
            self.enqueue(worker)

    def _duplicate(self, worker: Worker, message: Message) -> None:
        ack = self.ports.ack
        assert ack is not None
        self.counters.duplicates += 1
        ack(message.consumer, message.inbox.record, None)
        if worker.has_work():
            self.enqueue(worker)


def _close_if_cancelled(rest: Continuation, task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        rest.close()
