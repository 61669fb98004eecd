"""Where sync callbacks run: a small pool of threads, fed in batches (KIP-62's lesson).

A sync callback that blocks (``time.sleep``, a blocking driver, a long computation) must
never hold the event loop: lease renewals, the control loop and every other worker run
there. So sync callbacks run on :class:`ThreadRunner` threads, and the loop only hands
jobs over and takes results back.

One thread hop per callback would cost more than a trivial callback itself, so hops are
batched both ways: the jobs the dispatcher starts in one pass of the event loop become one
:class:`Batch`, and a thread runs a batch's jobs one after another, then wakes the loop
once (``call_soon_threadsafe``, coalesced by a flag) to apply every result it has.

A job that blocks holds only its thread and its own worker (which runs one callback at a
time anyway). Every few milliseconds while jobs are out, a watch on the loop applies the
results that are ready, even of a batch that is not finished, and, when no job finished
since its last look while jobs wait, wakes another thread: a batch's jobs are taken
through one shared iterator, so that thread takes the rest of a stuck batch. The watch
also reports jobs running past the handler timeout. A Python thread cannot be stopped: an
abandoned job's thread finishes it in its own time and then ends, its result dropped; a
replacement keeps the pool at its size meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("cloister.manager.executor")

WATCH_INTERVAL = 0.01  # seconds between looks for stuck threads and overdue jobs

Item = tuple[Any, Any, Any, float]
"""A job: ``(callback, worker, message, started)``. The pool calls
``callback(worker.id, worker.payload)`` for a perform (message None), else
``callback(message.body, worker.id, worker.payload)``: a busy worker's payload does not
change until its result is applied, on the loop."""
Result = tuple[Item, Any]
"""A job and what its callback returned, or :class:`Raised`."""


class NotStarted:
    """A job's outcome when its thread reached it after the lease ran out: the callback
    was never called (a job handed over in time can wait in a batch past the lease — a
    process paused by SIGSTOP, say — and must not start as a zombie when it wakes)."""

    __slots__ = ()


NOT_STARTED = NotStarted()


class Raised:
    """What a job's callback raised (its outcome, instead of a return value)."""

    __slots__ = ("exception",)

    def __init__(self, exception: BaseException) -> None:
        self.exception = exception


class Batch:
    """The jobs of one dispatch pass, taken one at a time by whichever threads help."""

    __slots__ = ("collected", "exhausted", "items", "results", "take")

    def __init__(self, items: list[Item]) -> None:
        self.items = items
        self.take: Iterator[Item] = iter(items)  # shared: next() is atomic under the GIL
        self.exhausted = False  # a thread found no job left to take
        self.results: list[Result] = []  # appended by threads, read by the loop
        self.collected = 0  # results applied so far


class ThreadRunner:
    """A pool of ``size`` threads running sync callbacks handed over in batches.

    ``on_done(results)`` runs on the event loop with outcomes in no particular order;
    ``on_overdue(item)`` runs on the loop, once, for a job that has run longer than
    ``timeout`` seconds (None: never). ``lease_until()`` (read from the threads) is when
    the node's right to work ends, on ``time.monotonic()``'s clock: a job a thread reaches
    after it is not started, its outcome :data:`NOT_STARTED`.
    """

    def __init__(
        self,
        name: str,
        size: int,
        on_done: Callable[[list[Result]], None],
        on_overdue: Callable[[Item], None] | None = None,
        timeout: float | None = None,
        lease_until: Callable[[], float] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"a thread pool needs at least one thread, got {size}")
        self.name = name
        self.size = size
        self.timeout = timeout
        self.late = 0  # results of abandoned jobs, dropped
        self._on_done = on_done
        self._on_overdue = on_overdue
        self._lease_until = lease_until if lease_until is not None else _forever
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[Item] = []  # this pass's jobs, not handed over yet
        self._queue: deque[Batch] = deque()  # batches no thread has started
        self._open: list[Batch] = []  # batches with results still to apply (loop only)
        self._outstanding = 0  # jobs handed over, their results not applied yet
        self._applied = 0  # results applied (the watch's measure of progress)
        self._lock = threading.Lock()  # the hand-shake between kicks and idling threads
        self._wake = threading.Semaphore(0)
        self._threads: dict[int, threading.Thread] = {}
        self._current: dict[int, Item | None] = {}  # thread number -> the job it is inside
        self._seen: dict[int, tuple[Item, float]] = {}  # the watch's: since when, roughly
        self._retired: set[int] = set()  # threads inside an abandoned job: they end after it
        self._abandoned: dict[int, Item] = {}  # id(job) -> job
        self._awake = 0  # threads taking jobs (not asleep on _wake)
        self._idle = 0  # threads asleep on _wake
        self._kick_scheduled = False
        self._collect_scheduled = False
        self._watch: asyncio.TimerHandle | None = None
        self._last_applied = 0
        self._closed = False
        self._stopping = False  # a thread must look whether it is to stop (closed, retired)
        self._serial = 0

    def __len__(self) -> int:
        """Jobs handed over or pending whose results were not applied yet."""
        return self._outstanding + len(self._pending)

    @property
    def threads(self) -> int:
        """Threads alive (those finishing an abandoned job included)."""
        return len(self._threads)

    @property
    def pending(self) -> list[Item]:
        """This pass's jobs: the engine appends to it, then calls :meth:`kick` (or
        :meth:`kick_soon`) to hand them over — one hop for the lot."""
        return self._pending

    def kick_soon(self) -> None:
        """Hand the pending jobs over in this event-loop iteration (once, for all)."""
        if not self._kick_scheduled and self._pending:
            self._kick_scheduled = True
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._kick)

    def abandon(self, item: Item) -> None:
        """Give up on a running job (on the loop): its result will be dropped, its thread
        ends after it, and another takes its place."""
        self._abandoned[id(item)] = item
        for number, current in list(self._current.items()):
            if current is item:
                self._retired.add(number)
                self._stopping = True
        self._outstanding -= 1
        with self._lock:
            if self._queue or self._outstanding:
                self._wake_one()

    def close(self) -> None:
        """Stop the threads once they leave the job they are inside; drop the rest."""
        self._closed = self._stopping = True
        self._pending.clear()
        self._queue.clear()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        for _ in range(len(self._threads)):
            self._wake.release()
        for thread in list(self._threads.values()):
            if thread is not threading.current_thread():
                thread.join(timeout=0.05)  # a blocked callback's thread is left to finish

    # -- the loop's side -------------------------------------------------------------------

    def _kick(self) -> None:
        self._kick_scheduled = False
        self.kick()

    def kick(self) -> None:
        """Hand the pending jobs over now, as one batch (on the loop)."""
        pending = self._pending
        if self._closed or not pending:
            return
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        batch = Batch(pending[:])
        pending.clear()  # the same list: the engine holds on to it
        self._outstanding += len(batch.items)
        self._open.append(batch)
        with self._lock:
            self._queue.append(batch)
            if not self._awake:
                self._wake_one()
        self._start_watch()

    def _wake_one(self) -> None:
        """Wake a sleeping thread, or start one while fewer than ``size`` are working
        (the caller holds the lock)."""
        if self._idle:
            self._idle -= 1
            self._awake += 1
            self._wake.release()
        elif len(self._threads) - len(self._retired) < self.size:
            self._awake += 1
            self._start_thread()

    def _start_thread(self) -> None:
        self._serial += 1
        number = self._serial
        thread = threading.Thread(
            target=self._thread_main, args=(number,), name=f"{self.name}-{number}", daemon=True
        )
        self._threads[number] = thread
        self._current[number] = None
        thread.start()

    def _collect(self) -> None:
        """Apply every result that is ready (on the loop)."""
        self._collect_scheduled = False
        ready: list[Result] = []
        still_open = []
        for batch in self._open:
            results = batch.results
            count = len(results)
            if count > batch.collected:
                ready.extend(results[batch.collected : count])
                batch.collected = count
            if count < len(batch.items):
                still_open.append(batch)
        self._open = still_open
        if not ready:
            return
        if self._abandoned:
            kept = []
            for result in ready:
                if self._abandoned.pop(id(result[0]), None) is not None:
                    self.late += 1  # its worker was freed when it was abandoned
                else:
                    kept.append(result)
            ready = kept
        self._outstanding -= len(ready)
        self._applied += len(ready)
        if ready:
            self._on_done(ready)

    def _start_watch(self) -> None:
        if self._watch is None and self._loop is not None and not self._closed:
            self._watch = self._loop.call_later(WATCH_INTERVAL, self._look)

    def _look(self) -> None:
        """While jobs are out: apply what is ready, report overdue jobs, and wake another
        thread when none finished a job since the last look while jobs wait."""
        self._watch = None
        if self._closed:
            return
        self._collect()
        now = time.monotonic()
        timeout = self.timeout
        inside = 0
        for number, item in list(self._current.items()):
            if item is None:
                self._seen.pop(number, None)
                continue
            inside += 1
            seen = self._seen.get(number)
            if seen is None or seen[0] is not item:
                self._seen[number] = (item, now)
            elif (
                timeout is not None
                and now - seen[1] >= timeout
                and self._on_overdue is not None
                and id(item) not in self._abandoned
            ):
                self._seen[number] = (item, float("inf"))  # reported: once is enough
                self._on_overdue(item)
        applied = self._applied
        if applied == self._last_applied and self._outstanding > inside:
            with self._lock:
                self._wake_one()  # every awake thread is inside a long job: help them
        self._last_applied = applied
        if self._outstanding or self._pending:
            self._start_watch()

    # -- the threads' side -----------------------------------------------------------------

    def _thread_main(self, number: int) -> None:
        queue, lock, current, retired = self._queue, self._lock, self._current, self._retired
        lease_until, now = self._lease_until, time.monotonic
        while not self._closed:
            try:
                batch = queue.popleft()
            except IndexError:
                stolen = self._stealable()
                if stolen is None:
                    with lock:
                        if queue:
                            continue  # handed over between the pop and the lock
                        self._awake -= 1
                        self._idle += 1
                    self._wake.acquire()
                    continue
                batch = stolen
            append = batch.results.append
            for item in batch.take:
                current[number] = item
                fn, worker, message, _ = item
                if now() >= lease_until():  # checked where it starts, not where it was queued
                    append((item, NOT_STARTED))
                    continue
                try:
                    if message is None:
                        append((item, fn(worker.id, worker.payload)))
                    else:
                        append((item, fn(message.body, worker.id, worker.payload)))
                except BaseException as exc:  # the engine decides what a failure means
                    append((item, Raised(exc)))
                if self._stopping and (number in retired or self._closed):
                    break
            else:
                batch.exhausted = True
            current[number] = None
            self._schedule_collect()
            if number in retired:
                with lock:
                    self._awake -= 1
                    retired.discard(number)
                    self._stopping = bool(retired) or self._closed
                    del self._threads[number]
                    del self._current[number]
                return
        with lock:
            self._threads.pop(number, None)
            self._current.pop(number, None)

    def _stealable(self) -> Batch | None:
        """A batch another thread started and has not taken every job of (it may be stuck
        inside one): its remaining jobs are taken through the same iterator."""
        for batch in list(self._open):
            if not batch.exhausted:
                return batch
        return None

    def _schedule_collect(self) -> None:
        if not self._collect_scheduled and self._loop is not None:
            self._collect_scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._collect)
            except RuntimeError:  # the loop is closed: nobody is left to apply results
                log.debug("pool %s: the event loop is closed; results dropped", self.name)
                self._closed = True


def _forever() -> float:
    return float("inf")
