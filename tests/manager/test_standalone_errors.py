"""DynamicManager without a cluster: exceptions in callbacks and ``on_error``."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

import pytest

from cloister import Ok, Replace
from cloister.errors import RemoteError
from cloister.manager import UnknownWorkerError

from ._standalone import Recorder, running, until, with_specs


class Boom(Exception):
    """What the callbacks under test raise."""


class Flaky(Recorder):
    """perform counts up in its payload and raises on the values in ``FAIL_AT``;
    handle_call/handle_cast raise for the message "boom". ``SUSPEND`` makes them async."""

    SPECS = {"a": {"payload": 0, "timeout": 0.01}, "b": {"payload": 0, "timeout": 0}}
    FAIL_AT: frozenset[int] = frozenset({2})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[Any, Any, float]] = []

    def perform(self, id: Any, payload: Any) -> Any:
        self.seen.append((id, payload, time.monotonic()))
        if payload in self.FAIL_AT:
            raise Boom(f"perform failed at {payload}")
        return Replace(payload + 1)

    def handle_call(self, message: Any, id: Any, payload: Any) -> Any:
        if message == "boom":
            raise Boom("call failed")
        return Ok((message, payload))

    def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        self.events.append(("cast", message, id))
        if message == "boom":
            raise Boom("cast failed")
        return Ok(message)

    def payloads(self, worker_id: Any = "a") -> list[Any]:
        return [p for i, p, _ in self.seen if i == worker_id]


class AsyncFlaky(Flaky):
    async def perform(self, id: Any, payload: Any) -> Any:
        await asyncio.sleep(0.001)
        return super().perform(id, payload)

    async def handle_call(self, message: Any, id: Any, payload: Any) -> Any:
        await asyncio.sleep(0.001)
        return super().handle_call(message, id, payload)

    async def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        await asyncio.sleep(0.001)
        return super().handle_cast(message, id, payload)


ONLY_B = {"b": {"payload": 0, "timeout": 0}}  # no periodic perform to fail meanwhile


@pytest.fixture(params=[Flaky, AsyncFlaky], ids=["sync", "async"])
def flaky(request: pytest.FixtureRequest) -> type[Flaky]:
    cls: type[Flaky] = request.param
    return cls


async def test_a_raising_perform_is_logged_counted_and_the_worker_carries_on(
    flaky: type[Flaky], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="cloister.manager")
    async with running(flaky) as manager:
        await until(lambda: len(manager.payloads()) >= 5)
        # payload 2 raised: the payload is kept (no Replace), so it raises again each time
        assert manager.payloads()[:5] == [0, 1, 2, 2, 2]
        assert manager.counters["errors"] >= 3
        assert manager.ids() == ["a", "b"]
        assert manager.get("a").payload == 2
    records = [r for r in caplog.records if r.name == "cloister.manager"]
    assert records and all(r.levelno == logging.ERROR for r in records)
    assert "perform of worker 'a' raised Boom('perform failed at 2')" in records[0].getMessage()
    assert records[0].exc_info is not None and records[0].exc_info[0] is Boom


async def test_a_raising_call_raises_in_the_caller(
    flaky: type[Flaky], caplog: pytest.LogCaptureFixture
) -> None:
    async with running(with_specs(flaky, ONLY_B)) as manager:
        expected = r"handle_call of worker 'b' raised Boom\('call failed'\)"
        with pytest.raises(RemoteError, match=expected):
            await manager.call("b", "boom")
        assert manager.counters["errors"] == 1
        assert "handle_call of worker 'b' raised" in caplog.text
        # the worker carries on
        assert await manager.call("b", "fine") == ("fine", 0)
        assert manager.ids() == ["b"]


async def test_a_raising_cast_is_logged_and_the_next_casts_run(
    flaky: type[Flaky], caplog: pytest.LogCaptureFixture
) -> None:
    async with running(with_specs(flaky, ONLY_B)) as manager:
        for message in ("one", "boom", "two", "boom", "three"):
            await manager.cast("b", message)
        await until(lambda: len(manager.of("cast")) == 5)
        assert [m for m, _ in manager.of("cast")] == ["one", "boom", "two", "boom", "three"]
        await until(lambda: manager.get("b").last_result == "three")
        assert manager.counters["errors"] == 2
        assert caplog.text.count("handle_cast of worker 'b' raised") == 2


async def test_on_error_remove_removes_the_worker(flaky: type[Flaky]) -> None:
    async with running(flaky, on_error="remove") as manager:
        await until(lambda: manager.ids() == ["b"], what="worker a removed")
        assert manager.payloads() == [0, 1, 2]
        assert manager.of("terminate") == [("error", "a", 2)]
        with pytest.raises(UnknownWorkerError):
            await manager.call("a", "x")
        # a raising call removes its worker too, and the caller still gets the error
        with pytest.raises(RemoteError, match="call failed"):
            await manager.call("b", "boom")
        await until(lambda: manager.ids() == [])
        assert manager.of("terminate")[-1] == ("error", "b", 0)
        await asyncio.sleep(0.05)
        assert manager.payloads() == [0, 1, 2]


async def test_on_error_restart_resets_the_payload_from_the_spec_after_a_backoff(
    flaky: type[Flaky],
) -> None:
    class P(flaky):  # type: ignore[valid-type, misc]
        FAIL_AT = frozenset({2})
        restart_backoff = (0.05, 0.2)

    async with running(P, on_error="restart") as manager:
        await until(lambda: len(manager.payloads()) >= 9, timeout=5)
        assert manager.payloads()[:9] == [0, 1, 2, 0, 1, 2, 0, 1, 2]
        times = [t for i, _, t in manager.seen if i == "a"][:9]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # the normal interval is 0.01 s; after each failure, the first backoff step (0.05 s):
        # the successful performs in between reset the failure count
        assert all(gaps[i] < 0.045 for i in (0, 1, 3, 4, 6, 7)), gaps
        assert all(gaps[i] >= 0.05 for i in (2, 5)), gaps
        assert manager.ids() == ["a", "b"]
        assert manager.of("terminate") == []  # restarted in place


async def test_on_error_restart_backs_off_exponentially_while_failing(
    flaky: type[Flaky],
) -> None:
    class P(flaky):  # type: ignore[valid-type, misc]
        FAIL_AT = frozenset({0})  # the spec's payload itself fails: every restart fails
        restart_backoff = (0.05, 0.2)

    async with running(P, on_error="restart") as manager:
        await until(lambda: len(manager.payloads()) >= 6, timeout=5)
        times = [t for i, _, t in manager.seen if i == "a"][:6]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # 0.05, 0.1, 0.2, then capped at 0.2 (uncapped would be 0.4, 0.8)
        for gap, backoff in zip(gaps, (0.05, 0.1, 0.2, 0.2, 0.2), strict=True):
            assert backoff <= gap < backoff + 0.15, gaps
        assert manager.counters["errors"] >= 6


async def test_on_error_restart_of_an_idle_worker_holds_its_messages_for_the_backoff(
    flaky: type[Flaky],
) -> None:
    """timeout 0 never performs, not even after a restart; the next casts wait instead."""

    class P(flaky):  # type: ignore[valid-type, misc]
        SPECS = ONLY_B
        restart_backoff = (0.1, 0.1)

        def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
            self.events.append(("at", message, time.monotonic()))
            if isinstance(message, Replace):
                return message
            return super().handle_cast(message, id, payload)

    async with running(P, on_error="restart") as manager:
        await manager.cast("b", Replace(5))
        await until(lambda: manager.get("b").payload == 5)
        for message in ("boom", "after 1", "after 2"):
            await manager.cast("b", message)
        await until(lambda: len(manager.of("at")) == 4, timeout=3)
        at = {message: t for message, t in manager.of("at")}
        assert at["after 1"] - at["boom"] >= 0.1  # held for the backoff
        assert at["after 2"] - at["after 1"] < 0.05  # then the queue runs on
        assert manager.get("b").payload == 0  # back to the spec's payload
        await asyncio.sleep(0.05)
        assert manager.seen == []  # no perform: it is not periodic
        assert manager.counters["errors"] == 1


async def test_on_error_restart_builds_the_payload_with_init_again() -> None:
    class P(Flaky):
        SPECS = {"a": {"payload": 10, "timeout": 0.01}}
        FAIL_AT = frozenset({12})
        restart_backoff = (0.01, 0.01)

        def init(self, id: Any, payload: Any) -> Any:
            self.events.append(("init", id, payload))
            return payload + 1

    async with running(P, on_error="restart") as manager:
        await until(lambda: len(manager.payloads()) >= 4, timeout=5)
        # init(10) = 11, 11 -> 12 raises, restart: init(10) = 11 again
        assert manager.payloads()[:4] == [11, 12, 11, 12]
        assert manager.of("init")[:2] == [("a", 10), ("a", 10)]


async def test_a_raising_terminate_is_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class P(Recorder):
        SPECS = {"a": {"timeout": 0}, "b": {"timeout": 0}}

        def terminate(self, reason: str, id: Any, payload: Any) -> None:
            super().terminate(reason, id, payload)
            raise Boom(f"terminate {id}")

    manager = await P.start()
    assert await manager.delete("a") is True
    await manager.stop()
    assert sorted(manager.of("terminate")) == [("delete", "a", None), ("shutdown", "b", None)]
    assert manager.counters["errors"] == 2
    assert caplog.text.count("terminate") >= 2 and "Boom" in caplog.text
    assert manager.state == "down"


async def test_a_raising_state_change_callback_does_not_stop_the_manager(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class P(Recorder):
        SPECS = {"a": {"timeout": 0}}

        def handle_state_change(self, state: str) -> None:
            raise Boom(state)

    async with running(P) as manager:
        assert manager.state == "up"
        assert manager.counters["errors"] == 2  # starting, up
    assert "Boom('starting')" in caplog.text or "Boom: starting" in caplog.text


async def test_a_raising_init_fails_put_and_leaves_no_worker() -> None:
    class P(Recorder):
        def init(self, id: Any, payload: Any) -> Any:
            if payload == "bad":
                raise Boom("bad payload")
            return payload

    async with running(P) as manager:
        with pytest.raises(Boom):
            await manager.put("x", payload="bad")
        assert manager.ids() == []
        await manager.put("y", payload="good")
        assert manager.get("y").payload == "good"
