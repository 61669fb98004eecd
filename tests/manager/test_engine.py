"""The engine alone: no cluster, no DynamicManager facade, plain callbacks and fake ports."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from cloister._tasks import Supervisor
from cloister.backends import LogRecord
from cloister.manager.engine import Callbacks, Engine, Options, Ports, UnknownWorkerError
from cloister.manager.responses import Halt, Ok, Replace
from cloister.manager.spec import make_spec
from cloister.manager.state import Stored
from cloister.manager.types import Reason
from cloister.manager.worker import Message
from cloister.store.inbox import InboxMessage

from ._standalone import until


def _none(*_args: Any) -> Any:
    return Ok(None)


def callbacks(**overrides: Callable[..., Any] | None) -> Callbacks:
    fields: dict[str, Any] = {
        "perform": _none,
        "handle_call": _none,
        "handle_cast": _none,
        "handle_timeout": _none,
    }
    fields.update(overrides)
    return Callbacks(**fields)


@asynccontextmanager
async def engine(
    cb: Callbacks, ports: Ports | None = None, **options: Any
) -> AsyncIterator[Engine]:
    supervisor = Supervisor("engine test")
    eng = Engine(cb, Options(name="test", **options), supervisor, ports)
    eng.set_paused(False)
    eng.start()
    try:
        yield eng
    finally:
        await supervisor.close()


async def add(eng: Engine, worker_id: Any, **fields: Any) -> None:
    await eng.put(worker_id, make_spec(worker_id, fields), known=False)


async def test_periodic_performs_keep_their_grid() -> None:
    loop = asyncio.get_running_loop()
    times: list[float] = []

    def perform(_id: Any, _payload: Any) -> Any:
        times.append(loop.time())
        return Ok(None)

    async with engine(callbacks(perform=perform)) as eng:
        await add(eng, "a", timeout=0.05)
        await until(lambda: len(times) >= 6)
        assert eng.counters.performs >= 6
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # On the grid: the mean gap is the timeout (a late perform does not shift the rest).
    assert abs(sum(gaps) / len(gaps) - 0.05) < 0.02, gaps


async def test_casts_are_handled_in_order_and_calls_answered() -> None:
    seen: list[Any] = []

    async def handle_cast(message: Any, _id: Any, payload: Any) -> Any:
        await asyncio.sleep(0)  # suspends: the rest wait in the mailbox, in order
        seen.append(message)
        return Replace([*payload, message])

    def handle_call(_message: Any, _id: Any, payload: Any) -> Any:
        return Ok(payload)

    async with engine(callbacks(handle_cast=handle_cast, handle_call=handle_call)) as eng:
        await add(eng, "a", timeout=0, payload=[])
        for n in range(20):
            eng.deliver("a", Message("cast", n))
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        eng.deliver("a", Message("call", "?", reply))
        assert await asyncio.wait_for(reply, 5) == list(range(20))
        assert seen == list(range(20)) and eng.counters.casts == 20 and eng.counters.calls == 1
        with pytest.raises(UnknownWorkerError):
            eng.deliver("nope", Message("cast", 1))


@pytest.mark.parametrize("on_error", ["continue", "restart", "remove"])
async def test_a_failing_perform_follows_on_error(on_error: Any) -> None:
    reasons: list[str] = []
    performs: list[Any] = []

    def perform(_id: Any, payload: Any) -> Any:
        performs.append(payload)
        if payload == "boom":
            raise RuntimeError("boom")
        return Ok(None)

    def terminate(reason: str, _id: Any, _payload: Any) -> None:
        reasons.append(reason)

    cb = callbacks(perform=perform, terminate=terminate)
    async with engine(cb, on_error=on_error, restart_backoff=(0.01, 0.01)) as eng:
        await add(eng, "a", timeout=0.02, payload="boom")
        if on_error == "remove":
            await until(lambda: "a" not in eng.workers)
            assert reasons == [Reason.ERROR] and performs == ["boom"]
        else:
            # An error is counted on the loop once its outcome is back from the pool, a
            # moment after the perform recorded itself in its thread: wait for the count.
            await until(lambda: eng.counters.errors >= 3)
            assert "a" in eng.workers and len(performs) >= 3
        assert eng.counters.errors >= 1


async def test_halt_and_rekey_without_ports() -> None:
    reasons: list[tuple[str, Any]] = []

    def handle_cast(message: Any, _id: Any, payload: Any) -> Any:
        return Halt() if message == "halt" else Replace(payload, id=message)

    def terminate(reason: str, worker_id: Any, _payload: Any) -> None:
        reasons.append((reason, worker_id))

    async with engine(callbacks(handle_cast=handle_cast, terminate=terminate)) as eng:
        await add(eng, "a", timeout=0, payload=7)
        eng.deliver("a", Message("cast", "b"))  # re-key a -> b, payload kept
        await until(lambda: "b" in eng.workers)
        assert "a" not in eng.workers and eng.info("b").payload == 7  # type: ignore[union-attr]
        eng.deliver("b", Message("cast", "halt"))
        await until(lambda: not eng.workers)
    assert reasons == [("rekey", "a"), ("halt", "b")]


class FakeInbox:
    """The ack and park ports, recording what the engine asks of them."""

    def __init__(self) -> None:
        self.acked: list[tuple[int, Any]] = []
        self.parked: list[tuple[int, str, int]] = []
        self.marked: list[Stored] = []

    def ack(self, _consumer: Any, record: LogRecord, key: Any) -> None:
        self.acked.append((record.sequence, key))

    async def park(self, _consumer: Any, message: InboxMessage, reason: str, attempts: int) -> None:
        self.parked.append((message.record.sequence, reason, attempts))

    def ports(self) -> Ports:
        return Ports(ack=self.ack, park=self.park, mark=self.marked.append)


def record(key: Any, message: Any, sequence: int) -> InboxMessage:
    return InboxMessage(key, message, None, LogRecord(0, sequence, b""))


async def test_inbox_messages_retry_with_backoff_then_park() -> None:
    inbox = FakeInbox()
    attempts: list[Any] = []

    def handle_cast(message: Any, _id: Any, payload: Any) -> Any:
        attempts.append(message)
        if message == "bad":
            raise ValueError("bad")
        return Replace(payload + 1)

    cb = callbacks(handle_cast=handle_cast)
    async with engine(cb, inbox.ports(), max_attempts=3, retry_backoff=(0.01, 0.02)) as eng:
        await add(eng, "a", timeout=0, payload=0)
        eng.deliver_record(record("a", "bad", 1), None)  # type: ignore[arg-type]
        eng.deliver_record(record("a", "good", 2), None)  # type: ignore[arg-type]
        await until(lambda: inbox.acked == [(2, "a")])
        # three tries of the bad one, in place (the good one waited behind it), then parked
        assert attempts == ["bad", "bad", "bad", "good"]
        await until(lambda: len(inbox.parked) == 1)
        assert inbox.parked[0][0] == 1 and inbox.parked[0][2] == 3
        assert eng.counters.retries == 2 and eng.counters.dead_letters == 1
        assert [s.payload for s in inbox.marked] == [1] and inbox.marked[0].watermark == 2
        # a redelivered record at or below the watermark is a duplicate: acked, not run
        eng.deliver_record(record("a", "good", 2), None)  # type: ignore[arg-type]
        assert eng.counters.duplicates == 1 and inbox.acked[-1] == (2, None)
        # a record for an unknown id is parked at once
        eng.deliver_record(record("zz", "x", 3), None)  # type: ignore[arg-type]
        await until(lambda: len(inbox.parked) == 2)
