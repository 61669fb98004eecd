"""Where sync callbacks run: a small pool of threads, fed in batches (KIP-62's lesson).

A sync callback that blocks (``time.sleep``, a blocking driver, a long computation) must
never hold the event loop: lease renewals, the control loop and every other worker run
there. So sync callbacks run on :class:`ThreadRunner` threads, and the loop only hands
jobs over and takes results back.

Under the GIL the pool runs no faster than the loop would; what it costs is the hand-over.
So that cost is paid per batch, not per job, and kept off the threads' side:

- The jobs the dispatcher starts, pass after pass, until it stops for now (nothing left to
  run, the concurrency limit reached, paused) become one :class:`Batch`; a thread runs a
  batch's jobs one after another and then wakes the loop once (``call_soon_threadsafe``,
  coalesced by a flag) to apply every result. A few hand-overs a second instead of one per
  pass: each is a thread that sleeps and wakes, and on a busy machine a wake-up can wait
  for a CPU.
- A thread writes each outcome into the job's slot of the batch: no Future, no lock, no
  result tuple per job; the loop takes the finished run of slots with one slice.
- The clock is read where each job starts, the lease at most every :data:`LEASE_RECHECK`
  (a trivial callback costs less than reading the lease through the permit's property):
  a lease that runs out stops the very next job, and one the node cuts short (a pause it
  decides, on the loop) reaches the threads within that time.

A job that blocks holds only its thread and its own worker (which runs one callback at a
time anyway). Every few milliseconds while jobs are out, a watch on the loop applies the
results that are ready, even of a batch that is not finished, and, when every awake thread
is inside the same job as at its last look while jobs wait, wakes another thread: a
batch's jobs are taken through one shared iterator, so that thread takes the rest of a
stuck batch. The watch also reports jobs running past the handler timeout. A Python thread
cannot be stopped: an abandoned job's thread finishes it in its own time and then ends,
its result dropped; a replacement keeps the pool at its size meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from operator import length_hint
from typing import Any

log = logging.getLogger("cloister.manager.executor")

WATCH_INTERVAL = 0.01  # seconds between looks for stuck threads and overdue jobs
LEASE_RECHECK = 0.001  # seconds a thread trusts the lease it read (the clock: every job)

Item = tuple[Any, Any, Any, float]
"""A job: ``(callback, worker, message, started)``. The pool calls
``callback(worker.id, worker.payload)`` for a perform (message None), else
``callback(message.body, worker.id, worker.payload)``: a busy worker's payload does not
change until its result is applied, on the loop."""

_PENDING: Any = object()  # a job's slot until its thread writes the outcome


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
    """The jobs of one hand-over, taken one at a time by whichever threads help.

    ``results[i]`` is job ``i``'s outcome once its thread wrote it. While one thread alone
    works a batch (``helpers`` 1: the usual case), it finishes jobs in order, so the loop
    knows the finished run from where that thread is (``owner``) and takes it by slicing.
    Once another thread helped (a stuck job), the loop looks at each slot instead.
    """

    __slots__ = ("exhausted", "helpers", "holes", "items", "owner", "results", "scanned", "take")

    def __init__(self, items: list[Item]) -> None:
        self.items = items
        self.results: list[Any] = [_PENDING] * len(items)  # written by threads, read by the loop
        self.take: Iterator[int] = iter(range(len(items)))  # shared: next() is atomic (GIL)
        self.exhausted = False  # a thread found no job left to take
        self.helpers = 0  # threads that took jobs of it (changed under the pool's lock)
        self.owner: list[Any] = _NOWHERE  # the first helper's [batch, index] (see ThreadRunner)
        self.scanned = 0  # every slot before it was applied, or is listed in holes
        self.holes: list[int] = []  # slots before scanned whose jobs were still running

    def take_finished(self, items: list[Item], values: list[Any]) -> bool:
        """Append the jobs finished since the last call and their outcomes (on the loop);
        True while the batch has jobs not applied yet."""
        results, scanned = self.results, self.scanned
        # Read the taken count before the helpers: a thread counts itself a helper before
        # it takes a job, so every job taken by then was taken by the helpers seen after.
        taken = len(results) - length_hint(self.take)
        place, index = self.owner  # atomic: a list unpacked in one step
        # Still one helper after the owner's place was read: every job taken until then
        # was the owner's, done in order (one that helped since takes only later jobs).
        if self.helpers == 1 and not self.holes:
            if place is not self:
                done = taken  # the owner left it: every job it took is done
            elif index < 0:
                done = scanned
            else:  # inside job ``index``: the ones before are done, and it is once written
                done = index + (results[index] is not _PENDING)
            if done > scanned:
                items.extend(self.items[scanned:done])
                values.extend(results[scanned:done])
                self.scanned = done
        elif self.helpers:
            running = []
            for i in (*self.holes, *range(scanned, taken)):
                value = results[i]
                if value is _PENDING:
                    running.append(i)  # running, or taken and about to start
                else:
                    items.append(self.items[i])
                    values.append(value)
            self.holes = running
            self.scanned = max(scanned, taken)
        return self.scanned < len(results) or bool(self.holes)


_NOWHERE: list[Any] = [None, -1]  # a thread's place before it took a batch


class ThreadRunner:
    """A pool of ``size`` threads running sync callbacks handed over in batches.

    ``on_done(items, outcomes)`` runs on the event loop with jobs and their outcomes (the
    callback's return value, :class:`Raised` or :data:`NOT_STARTED`) in no particular
    order; ``on_overdue(item)`` runs on the loop, once, for a job that has run longer than
    ``timeout`` seconds (None: never). ``lease_until()`` (read from the threads) is when
    the node's right to work ends, on ``time.monotonic()``'s clock: a job a thread reaches
    after it is not started, its outcome :data:`NOT_STARTED`.
    """

    def __init__(
        self,
        name: str,
        size: int,
        on_done: Callable[[list[Item], list[Any]], None],
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
        self._pending: list[Item] = []  # jobs not handed over yet
        self._queue: deque[Batch] = deque()  # batches no thread has started
        self._open: list[Batch] = []  # batches with results still to apply (loop only)
        self._outstanding = 0  # jobs handed over, their results not applied yet
        self._lock = threading.Lock()  # kicks vs idling threads; helpers of a batch
        self._wake = threading.Semaphore(0)
        self._threads: dict[int, threading.Thread] = {}
        # Thread number -> its place, [batch, index of the job it is inside or did last]
        # (-1: none yet): written by the thread, read by the loop in one step.
        self._places: dict[int, list[Any]] = {}
        self._seen: dict[int, tuple[Item, float]] = {}  # the watch's: since when, roughly
        self._retired: set[int] = set()  # threads inside an abandoned job: they end after it
        self._abandoned: dict[int, Item] = {}  # id(job) -> job
        self._awake = 0  # threads taking jobs (not asleep on _wake)
        self._idle = 0  # threads asleep on _wake
        self._kick_scheduled = False
        self._collect_scheduled = False
        self._watch: asyncio.TimerHandle | None = None
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
        """Jobs not handed over yet: the engine appends to it, then calls :meth:`kick`
        (or :meth:`kick_soon`) to hand them over — one hop for the lot."""
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
        for number, (batch, index) in list(self._places.items()):
            if batch is not None and index >= 0 and batch.items[index] is item:
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
            if self._awake <= len(self._retired):  # none awake but inside abandoned jobs
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
        self._places[number] = [None, -1]
        thread.start()

    def _collect(self) -> None:
        """Apply every result that is ready (on the loop)."""
        self._collect_scheduled = False
        items: list[Item] = []
        values: list[Any] = []
        self._open = [batch for batch in self._open if batch.take_finished(items, values)]
        if not items:
            return
        if self._abandoned:
            kept: tuple[list[Item], list[Any]] = ([], [])
            for item, value in zip(items, values, strict=True):
                if self._abandoned.pop(id(item), None) is not None:
                    self.late += 1  # its worker was freed when it was abandoned
                else:
                    kept[0].append(item)
                    kept[1].append(value)
            items, values = kept
            if not items:
                return
        self._outstanding -= len(items)
        self._on_done(items, values)

    def _start_watch(self) -> None:
        if self._watch is None and self._loop is not None and not self._closed:
            self._watch = self._loop.call_later(WATCH_INTERVAL, self._look)

    def _look(self) -> None:
        """While jobs are out: apply what is ready, report overdue jobs, and wake another
        thread when every awake one is inside the job it was inside at the last look (or
        inside an abandoned one) while other jobs wait."""
        self._watch = None
        if self._closed:
            return
        self._collect()
        now = time.monotonic()
        timeout = self.timeout
        inside = stuck = 0
        for number, (batch, index) in list(self._places.items()):
            if batch is None or index < 0 or batch.results[index] is not _PENDING:
                self._seen.pop(number, None)
                continue
            item = batch.items[index]
            if number in self._retired:
                continue  # inside an abandoned job: neither outstanding nor to report
            inside += 1
            seen = self._seen.get(number)
            if seen is None or seen[0] is not item:
                self._seen[number] = (item, now)
                continue
            stuck += 1
            if (
                timeout is not None
                and now - seen[1] >= timeout
                and self._on_overdue is not None
                and id(item) not in self._abandoned
            ):
                self._seen[number] = (item, float("inf"))  # reported: once is enough
                self._on_overdue(item)
        if self._outstanding > inside and stuck >= self._awake - len(self._retired):
            with self._lock:
                self._wake_one()  # every awake thread is inside a long job (or none is awake)
        if self._outstanding or self._pending:
            self._start_watch()

    # -- the threads' side -----------------------------------------------------------------

    def _thread_main(self, number: int) -> None:
        queue, lock, retired = self._queue, self._lock, self._retired
        place = self._places[number]
        lease_until, now = self._lease_until, time.monotonic
        horizon = 0.0  # until then (clock time) the lease read last holds: no need to read it
        while not self._closed:
            try:
                batch = queue.popleft()
            except IndexError:
                stolen = self._steal()
                if stolen is None:
                    with lock:
                        if queue:
                            continue  # handed over between the pop and the lock
                        self._awake -= 1
                        self._idle += 1
                    self._wake.acquire()
                    continue
                batch = stolen
            else:
                with lock:
                    batch.helpers += 1
                    if batch.helpers == 1:
                        batch.owner = place
            items, results = batch.items, batch.results
            place[0] = batch  # (place[1] is -1 between batches)
            for i in batch.take:
                place[1] = i
                started = now()
                if started >= horizon:  # checked where it starts, not where it was queued
                    until = lease_until()
                    if started >= until:
                        results[i] = NOT_STARTED
                        continue
                    horizon = min(until, started + LEASE_RECHECK)
                fn, worker, message, _ = items[i]
                try:
                    if message is None:
                        results[i] = fn(worker.id, worker.payload)
                    else:
                        results[i] = fn(message.body, worker.id, worker.payload)
                except BaseException as exc:  # the engine decides what a failure means
                    results[i] = Raised(exc)
                if self._stopping and (number in retired or self._closed):
                    break
            else:
                batch.exhausted = True
            place[0] = None  # before place[1]: the loop never sees this batch and -1
            place[1] = -1
            self._schedule_collect()
            if number in retired:
                with lock:
                    self._awake -= 1
                    retired.discard(number)
                    self._stopping = bool(retired) or self._closed
                    del self._threads[number]
                    del self._places[number]
                return
        with lock:
            self._threads.pop(number, None)
            self._places.pop(number, None)

    def _steal(self) -> Batch | None:
        """A batch another thread started and has not taken every job of (it may be stuck
        inside one): its remaining jobs are taken through the same iterator."""
        with self._lock:
            for batch in self._open:
                if batch.helpers and not batch.exhausted:
                    batch.helpers += 1
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
