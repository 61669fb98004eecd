"""Sync callbacks run off the event loop (issue 12, item 3): a handler that blocks makes
its own worker slow, never its node dead; per-key order and one callback per worker hold;
``handler_timeout`` reports (and, if asked, abandons) a callback that runs too long."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import AsyncExitStack
from typing import Any

import pytest

from cloister import DynamicManager, Ok, Replace
from cloister.cluster import State
from cloister.errors import ConfigurationError, RemoteError
from cloister.manager.executor import NOT_STARTED, Batch, Raised, ThreadRunner
from tests._support.nodes import ClusterNodes
from tests._support.timing import FAST

from ._standalone import loop_lags, running, until

# -- the pool on its own ---------------------------------------------------------------------


class Worker:
    """What the pool reads of a worker: its id and payload."""

    def __init__(self, worker_id: Any, payload: Any = None) -> None:
        self.id = worker_id
        self.payload = payload


def test_a_batch_gives_back_finished_jobs_and_never_one_still_running() -> None:
    """The loop takes a batch's finished jobs from where its one thread is (in order), and
    slot by slot once another thread helped: a job taken and not finished never comes back
    early, whichever thread runs it."""
    items = [(None, Worker(i), None, 0.0) for i in range(5)]
    batch = Batch(items)
    place: list[Any] = [None, -1]

    def finished() -> list[tuple[Any, Any]]:
        jobs: list[Any] = []
        outcomes: list[Any] = []
        batch.take_finished(jobs, outcomes)
        return [(job[1].id, outcome) for job, outcome in zip(jobs, outcomes, strict=True)]

    assert finished() == []  # no thread took it yet
    batch.helpers, batch.owner = 1, place
    place[0] = batch
    for _ in range(2):
        place[1] = next(batch.take)  # the owner takes job 0, then job 1
        if place[1] == 0:
            batch.results[0] = "r0"
    assert finished() == [(0, "r0")]  # job 1 is running
    batch.results[1] = "r1"
    assert finished() == [(1, "r1")]
    batch.helpers = 2  # a second thread helps: it takes job 2, the owner job 3
    assert next(batch.take) == 2
    place[1] = next(batch.take)
    batch.results[3] = "r3"
    assert finished() == [(3, "r3")]  # job 2 still runs on the helper
    assert finished() == []
    batch.results[2] = "r2"
    assert finished() == [(2, "r2")]
    place[1] = next(batch.take)
    batch.results[4] = "r4"
    jobs: list[Any] = []
    assert not batch.take_finished(jobs, [])  # every job given back: nothing left open
    assert [job[1].id for job in jobs] == [4]


async def test_a_job_reached_after_the_lease_ran_out_never_starts() -> None:
    """A job handed over in time may wait in its batch (behind a slow one, or in a process
    paused by SIGSTOP) until after the lease ran out: its thread checks the lease where the
    job starts, and a late one is not started — a zombie must not run user code."""
    results: dict[Any, Any] = {}
    ran: list[Any] = []
    lease = [float("inf")]
    release = threading.Event()

    def done(jobs: list[Any], outcomes: list[Any]) -> None:
        for (_, worker, _, _), value in zip(jobs, outcomes, strict=True):
            results[worker.id] = value

    def callback(worker_id: Any, payload: Any) -> Any:
        ran.append(worker_id)
        if worker_id == "first":
            release.wait(5)  # while it runs, the lease runs out
        return worker_id

    pool = ThreadRunner("test", 1, done, lease_until=lambda: lease[0])
    try:
        for worker_id in ("first", "second", "third"):
            pool.pending.append((callback, Worker(worker_id), None, 0.0))
        pool.kick()
        await until(lambda: ran == ["first"])
        lease[0] = time.monotonic()  # the lease ends now
        release.set()
        await until(lambda: len(results) == 3)
        assert ran == ["first"]  # started in time; the two behind it never started
        assert results == {"first": "first", "second": NOT_STARTED, "third": NOT_STARTED}
    finally:
        pool.close()


async def test_a_blocked_job_holds_neither_its_batch_nor_the_loop() -> None:
    results: dict[Any, Any] = {}
    release = threading.Event()

    def done(jobs: list[Any], outcomes: list[Any]) -> None:
        for (_, worker, _, _), value in zip(jobs, outcomes, strict=True):
            results[worker.id] = value

    def callback(worker_id: Any, payload: Any) -> Any:
        if worker_id == "stuck":
            release.wait(5)
        if worker_id == "boom":
            raise ValueError("boom")
        return worker_id * 2 if isinstance(worker_id, int) else worker_id

    pool = ThreadRunner("test", 4, done)
    try:
        pool.pending.append((callback, Worker("stuck"), None, 0.0))
        for i in range(200):
            pool.pending.append((callback, Worker(i), None, 0.0))
        pool.pending.append((callback, Worker("boom"), None, 0.0))
        pool.kick()
        began = time.monotonic()
        while len(results) < 201 and time.monotonic() - began < 3:
            await asyncio.sleep(0.01)  # the loop keeps running meanwhile
        # Every job behind the stuck one (same batch) ran, taken by another thread.
        assert {i: results[i] for i in range(200)} == {i: i * 2 for i in range(200)}
        assert isinstance(results["boom"], Raised)
        assert isinstance(results["boom"].exception, ValueError)
        assert "stuck" not in results and time.monotonic() - began < 2
        assert len(pool) == 1  # the stuck job is still out
        release.set()
        await until(lambda: results.get("stuck") == "stuck")
        assert len(pool) == 0
    finally:
        release.set()
        pool.close()


async def test_an_overdue_job_is_reported_once_and_an_abandoned_one_is_dropped() -> None:
    results: list[Any] = []
    overdue: list[Any] = []
    release = threading.Event()
    pool: ThreadRunner

    def on_overdue(item: Any) -> None:
        overdue.append(item[1].id)
        pool.abandon(item)

    def callback(worker_id: Any, payload: Any) -> Any:
        if worker_id == "slow":
            release.wait(5)
        return worker_id

    pool = ThreadRunner(
        "test", 1, lambda _jobs, outcomes: results.extend(outcomes), on_overdue, 0.1
    )
    try:
        pool.pending.append((callback, Worker("slow"), None, 0.0))
        pool.kick()
        await until(lambda: overdue == ["slow"])
        # A pool of one thread: the abandoned thread is replaced, so new work still runs.
        pool.pending.append((callback, Worker("next"), None, 0.0))
        pool.kick()
        await until(lambda: results == ["next"])
        release.set()
        await until(lambda: pool.late == 1)
        await asyncio.sleep(0.05)
        assert results == ["next"] and overdue == ["slow"]  # dropped, and reported once
        await until(lambda: pool.threads == 1)  # the abandoned job's thread ended
    finally:
        release.set()
        pool.close()


# -- a standalone manager --------------------------------------------------------------------


class Threads(DynamicManager):
    """Records where and in what order callbacks run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[Any, Any, int]] = []
        self.inside: dict[Any, int] = {}
        self.overlaps = 0

    def children_specs(self) -> dict[Any, Any]:
        return {f"k{i}": {"payload": []} for i in range(20)}

    def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        self.inside[id] = self.inside.get(id, 0) + 1
        if self.inside[id] > 1:
            self.overlaps += 1
        if message == "sleep":
            time.sleep(0.6)
        self.seen.append((id, message, threading.get_ident()))
        self.inside[id] -= 1
        return Replace([*payload, message])

    def handle_call(self, message: Any, id: Any, payload: Any) -> Any:
        return Ok(threading.get_ident())


async def test_sync_callbacks_run_on_the_pool_in_order_one_at_a_time_per_worker() -> None:
    async with running(Threads) as manager:
        for n in range(50):
            for i in range(20):
                await manager.cast(f"k{i}", n)
        await until(lambda: len(manager.seen) == 1000)
        # A handler records itself in its thread; its result is applied on the loop after.
        await until(lambda: all(_payload(manager, f"k{i}") == list(range(50)) for i in range(20)))
        assert manager.overlaps == 0
        assert threading.get_ident() not in {t for _, _, t in manager.seen}
        assert await manager.call("k0", "where?") != threading.get_ident()


def _payload(manager: DynamicManager, worker_id: str) -> Any:
    info = manager.get(worker_id)
    return None if info is None else info.payload


async def test_executor_loop_runs_sync_callbacks_on_the_event_loop() -> None:
    async with running(Threads, executor="loop") as manager:
        assert await manager.call("k0", "where?") == threading.get_ident()


async def test_async_callbacks_and_untouched_defaults_stay_on_the_loop() -> None:
    class Async(DynamicManager):
        def children_specs(self) -> dict[Any, Any]:
            return {"a": {}}

        async def handle_call(self, message: Any, id: Any, payload: Any) -> Any:
            return Ok(threading.get_ident())

    async with running(Async) as manager:
        assert await manager.call("a", "where?") == threading.get_ident()
        assert manager._engine.threads is not None and manager._engine.threads.threads == 0


async def test_a_blocking_handler_slows_only_its_own_worker_and_not_the_loop() -> None:
    async with running(Threads) as manager, loop_lags() as lags:
        await manager.cast("k0", "sleep")
        await asyncio.sleep(0.05)
        for n in range(20):
            for i in range(1, 20):
                await manager.cast(f"k{i}", n)
        await manager.cast("k0", "after")
        # The other workers finish while k0 sleeps; k0's next message waits its turn.
        await until(lambda: len(manager.seen) == 19 * 20, timeout=0.5)
        assert [m for k, m, _ in manager.seen if k == "k0"] == []
        await until(lambda: [m for k, m, _ in manager.seen if k == "k0"] == ["sleep", "after"])
        assert max(lags) < 0.3, max(lags)  # the loop never waited for the sleeping handler


async def test_a_sync_function_that_returns_a_coroutine_goes_on_on_the_loop() -> None:
    class Returns(DynamicManager):
        def children_specs(self) -> dict[Any, Any]:
            return {"a": {"payload": 0}}

        def handle_call(self, message: Any, id: Any, payload: Any) -> Any:
            async def later() -> Any:
                await asyncio.sleep(0.01)
                return Ok(("later", threading.get_ident()))

            return later()

    async with running(Returns) as manager:
        assert await manager.call("a", "x") == ("later", threading.get_ident())


async def test_handler_timeout_reports_the_callback_to_handle_timeout() -> None:
    class Slow(DynamicManager):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.timed_out: list[Any] = []

        def children_specs(self) -> dict[Any, Any]:
            return {"a": {"payload": 0}}

        def handle_call(self, message: Any, id: Any, payload: Any) -> Any:
            time.sleep(message)
            return Replace(payload + 1)  # the reply is the new payload

        def handle_timeout(self, info: Any) -> None:
            self.timed_out.append(info.id)

    async with running(Slow, handler_timeout=0.1) as manager:
        assert await manager.call("a", 0.3) == 1  # reported, not abandoned
        assert manager.timed_out == ["a"] and manager.counters.handler_timeouts == 1
        assert manager.counters.abandoned == 0
        assert await manager.call("a", 0.0) == 2
        assert manager.timed_out == ["a"]


async def test_an_abandoned_call_fails_its_caller_and_its_late_result_is_discarded() -> None:
    class Stuck(DynamicManager):
        def children_specs(self) -> dict[Any, Any]:
            return {"a": {"payload": 0}}

        def handle_call(self, message: Any, id: Any, payload: Any) -> Any:
            time.sleep(message)
            return Replace(payload + 1)

    async with running(Stuck, handler_timeout=0.1, on_handler_timeout="abandon") as manager:
        with pytest.raises(RemoteError, match="handler_timeout"):
            await manager.call("a", 0.5)
        # The worker is free again at once: the next call runs beside the abandoned one.
        assert await manager.call("a", 0.0) == 1
        await until(lambda: manager.counters.late_results == 1, timeout=2)
        info = manager.get("a")
        assert info is not None and info.payload == 1  # the abandoned result never applied
        assert manager.counters.abandoned == 1


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("executor", "process-pool"),
        ("pool_size", 0),
        ("pool_size", True),
        ("handler_timeout", 0),
        ("handler_timeout", "5"),
        ("on_handler_timeout", "kill"),
    ],
)
def test_bad_executor_options_say_what_is_allowed(option: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=option):
        DynamicManager(**{option: value})


# -- in a cluster ----------------------------------------------------------------------------


async def test_a_handler_sleeping_twice_the_failure_timeout_does_not_fence_its_node() -> None:
    """The scenario of issue 12: ``time.sleep`` in a sync handler used to stop renewals,
    fence the node, and cascade from owner to owner. Now it stalls its own key only, and
    with ``on_handler_timeout="abandon"`` a poison message ends as a dead letter on its
    owner after ``max_attempts``."""
    handled: list[tuple[str, str, Any]] = []

    class Poisoned(DynamicManager):
        name = "poisoned"
        max_attempts = 2
        retry_backoff = (0.01, 0.02)
        handler_timeout = FAST.failure_timeout / 2
        on_handler_timeout = "abandon"

        def children_specs(self) -> dict[Any, Any]:
            return {f"k{i}": {"payload": 0} for i in range(20)}

        def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
            handled.append((self.cluster.node, id, message))  # type: ignore[union-attr]
            if message == "poison":
                time.sleep(2 * FAST.failure_timeout)
            return Replace(payload + 1)

    async with AsyncExitStack() as stack:
        nodes = ClusterNodes(stack, "memory://sleepy", cluster="sleepy", timing=FAST)
        managers = {}
        for name in "ab":
            managers[name] = await nodes.start_manager(name, Poisoned)
        clusters = list(nodes.clusters.values())
        await until(
            lambda: all(c.state is State.READY and len(c.siblings()) == 2 for c in clusters)
        )
        epoch = clusters[0].epoch
        manager = managers["a"]
        await manager.cast("k0", "poison")
        for n in range(30):
            for i in range(1, 20):
                await manager.cast(f"k{i}", n)
        await until(lambda: sum(1 for _, k, _ in handled if k != "k0") == 19 * 30, timeout=5)
        await until(
            lambda: sum(m.counters.dead_letters for m in managers.values()) == 1,
            timeout=4 * FAST.failure_timeout + 2,
        )
        poison = [(node, k) for node, k, m in handled if m == "poison"]
        assert len(poison) == 2, poison  # max_attempts tries...
        assert len({node for node, _ in poison}) == 1, poison  # ... all on its one owner
        assert all(c.counters.fenced == 0 for c in clusters)
        assert all(c.epoch == epoch for c in clusters)  # nobody was expelled
