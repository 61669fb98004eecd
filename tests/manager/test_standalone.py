"""DynamicManager without a cluster: responses, lifecycle, runtime management.

Every response kind is checked from ``perform``, ``handle_call`` and ``handle_cast``, each
with sync callbacks, ``async def`` callbacks that finish without suspending and ``async
def`` callbacks that really suspend.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from cloister import DynamicManager, Halt, Ok, Replace, Timeout
from cloister.errors import ConfigurationError
from cloister.manager import Spec, UnknownWorkerError, WorkerInfo

from ._standalone import FLAVOURS, Recorder, Scripted, running, until, with_specs

IDLE = {"payload": "p", "timeout": 0}
INSTANT = {"payload": "p", "timeout": 0, "instant_perform": True}


@pytest.fixture(params=list(FLAVOURS))
def flavour(request: pytest.FixtureRequest) -> type[Scripted]:
    cls: type[Scripted] = FLAVOURS[request.param]
    return cls


def performs(manager: Scripted, worker_id: Any = None) -> list[tuple[Any, ...]]:
    return [e for e in manager.of("perform") if worker_id is None or e[0] == worker_id]


# -- responses from perform ----------------------------------------------------------------------


async def start_scripted(cls: type[Scripted], specs: dict[Any, Any], script: list[Any]) -> Scripted:
    """Start a manager whose first performs return the items of ``script``."""
    return await with_specs(cls, specs, SCRIPT=tuple(script)).start()


async def test_perform_ok_keeps_payload_and_stores_the_result(flavour: type[Scripted]) -> None:
    manager = await start_scripted(flavour, {"a": INSTANT}, [Ok("r")])
    try:
        await until(lambda: manager.counters["performs"] == 1 and not manager.get("a").busy_since)
        info = manager.get("a")
        assert (info.payload, info.last_result) == ("p", "r")
        assert performs(manager) == [("a", "p")]
    finally:
        await manager.stop()


async def test_perform_bare_value_is_ok(flavour: type[Scripted]) -> None:
    manager = await start_scripted(flavour, {"a": INSTANT}, [{"bare": 1}])
    try:
        await until(lambda: manager.get("a").last_result == {"bare": 1})
        assert manager.get("a").payload == "p"
    finally:
        await manager.stop()


async def test_perform_replace_changes_the_payload(flavour: type[Scripted]) -> None:
    specs = {"a": {"payload": 0, "timeout": 0.01}}
    manager = await start_scripted(flavour, specs, [Replace(1), Replace(2), Ok("done")])
    try:
        await until(lambda: len(performs(manager)) >= 4)
        assert [p for _, p in performs(manager)[:4]] == [0, 1, 2, 2]
        assert manager.get("a").payload == 2
        assert manager.get("a").last_result in ("done", None)
    finally:
        await manager.stop()


async def test_perform_replace_with_id_rekeys_the_worker(flavour: type[Scripted]) -> None:
    manager = await start_scripted(flavour, {"a": INSTANT}, [Replace("q", id="b")])
    try:
        await until(lambda: manager.ids() == ["b"], what="worker re-keyed to b")
        assert manager.get("a") is None
        info = manager.get("b")
        assert info.payload == "q"
        assert info.spec == Spec(payload="q", timeout=0.0, instant_perform=True)
        assert ("rekey", "a", "q") in manager.of("terminate")
        # the new worker keeps the spec: instant_perform runs it once under its new id
        await until(lambda: ("b", "q") in performs(manager))
        with pytest.raises(UnknownWorkerError):
            await manager.cast("a", "hello")
        assert await manager.call("b", "hello") == "hello"
    finally:
        await manager.stop()


async def test_perform_replace_with_its_own_id_does_not_rekey(flavour: type[Scripted]) -> None:
    manager = await start_scripted(flavour, {"a": INSTANT}, [Replace("q", id="a")])
    try:
        await until(lambda: manager.get("a").payload == "q")
        await asyncio.sleep(0.02)
        assert manager.ids() == ["a"]
        assert manager.of("terminate") == []
    finally:
        await manager.stop()


async def test_perform_halt_removes_the_worker(flavour: type[Scripted]) -> None:
    specs = {"a": {"payload": "p", "timeout": 0.01}, "b": {"payload": "b", "timeout": 0.01}}
    manager = await start_scripted(flavour, specs, [Halt()])
    try:
        await until(lambda: len(manager.ids()) == 1, what="one worker halted")
        (halted,) = {"a", "b"} - set(manager.ids())
        assert manager.of("terminate") == [("halt", halted, halted if halted == "b" else "p")]
        count = len(performs(manager, halted))
        await asyncio.sleep(0.05)
        assert len(performs(manager, halted)) == count == 1
        assert len(performs(manager, ({"a", "b"} - {halted}).pop())) > 1
    finally:
        await manager.stop()


async def test_perform_timeout_sets_the_next_interval(flavour: type[Scripted]) -> None:
    specs = {"a": {"payload": "p", "timeout": 60.0, "instant_perform": True}}
    script = [Timeout(0.03, "r1"), Timeout(0.03, "r2"), Ok("r3")]
    manager = await start_scripted(flavour, specs, script)
    try:
        await until(lambda: manager.get("a").last_result == "r3", timeout=3)
        await asyncio.sleep(0.1)  # the spec's 60 s applies again after Ok
        assert len(performs(manager)) == 3
        gaps = [b - a for a, b in itertools.pairwise(manager.perform_times)]
        assert all(0.025 <= gap < 1.0 for gap in gaps), gaps
    finally:
        await manager.stop()


async def test_timeout_response_validates_its_seconds() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        Timeout(-1)
    with pytest.raises(TypeError, match="number"):
        Timeout("1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="number"):
        Timeout(True)


# -- responses from handle_call ----------------------------------------------------------------


async def test_call_replies_with_the_result(flavour: type[Scripted]) -> None:
    async with running(with_specs(flavour, {"a": IDLE})) as manager:
        assert await manager.call("a", Ok("r")) == "r"
        assert await manager.call("a", "bare") == "bare"
        assert await manager.call("a", None) is None
        info = manager.get("a")
        assert (info.payload, info.last_result) == ("p", None)
        assert manager.of("call") == [(Ok("r"), "a", "p"), ("bare", "a", "p"), (None, "a", "p")]
        assert manager.counters["calls"] == 3


async def test_call_replace_replies_with_the_new_payload(flavour: type[Scripted]) -> None:
    async with running(with_specs(flavour, {"a": IDLE})) as manager:
        assert await manager.call("a", Replace({"n": 1})) == {"n": 1}
        assert manager.get("a").payload == {"n": 1}
        assert await manager.call("a", "next") == "next"
        assert manager.of("call")[-1] == ("next", "a", {"n": 1})


async def test_call_replace_with_id_rekeys(flavour: type[Scripted]) -> None:
    async with running(with_specs(flavour, {"a": IDLE, "c": IDLE})) as manager:
        assert await manager.call("a", Replace("q", id="b")) == "q"
        await until(lambda: sorted(manager.ids()) == ["b", "c"])
        assert manager.get("b").payload == "q"
        assert manager.of("terminate") == [("rekey", "a", "q")]
        assert await manager.call("b", "who") == "who"
        assert manager.of("call")[-1] == ("who", "b", "q")


async def test_call_replace_with_an_existing_id_replaces_that_worker(
    flavour: type[Scripted],
) -> None:
    async with running(with_specs(flavour, {"a": IDLE, "b": {"payload": "old b"}})) as manager:
        await manager.call("a", Replace("q", id="b"))
        await until(lambda: manager.ids() == ["b"] and manager.get("b").payload == "q")
        assert sorted(manager.of("terminate")) == [("rekey", "a", "q"), ("replace", "b", "old b")]


async def test_call_halt_replies_none_and_removes_the_worker(flavour: type[Scripted]) -> None:
    async with running(with_specs(flavour, {"a": IDLE, "b": IDLE})) as manager:
        assert await manager.call("a", Halt()) is None
        await until(lambda: manager.ids() == ["b"])
        assert manager.of("terminate") == [("halt", "a", "p")]
        with pytest.raises(UnknownWorkerError):
            await manager.call("a", "again")


async def test_calls_queued_behind_a_halt_fail_at_once(flavour: type[Scripted]) -> None:
    class Slow(with_specs(flavour, {"a": IDLE})):  # type: ignore[misc]
        async def handle_call(self, message: Any, id: Any, payload: Any) -> Any:
            await asyncio.sleep(0.05)
            return message

    async with running(Slow) as manager:
        halt = asyncio.create_task(manager.call("a", Halt(), timeout=5))
        await asyncio.sleep(0.01)
        behind = asyncio.create_task(manager.call("a", "behind", timeout=5))
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await asyncio.gather(halt, behind, return_exceptions=True)
        assert results[0] is None
        assert isinstance(results[1], UnknownWorkerError)
        assert loop.time() - started < 1.0  # not the caller's 5 s timeout


async def test_call_timeout_replies_and_schedules_a_perform(flavour: type[Scripted]) -> None:
    async with running(with_specs(flavour, {"a": IDLE})) as manager:
        assert await manager.call("a", Timeout(0.02, "r")) == "r"
        assert manager.get("a").last_result == "r"
        # timeout 0 never performs on its own; Timeout(0.02) asks for one perform
        await until(lambda: performs(manager) == [("a", "p")], timeout=2)
        await asyncio.sleep(0.05)
        assert performs(manager) == [("a", "p")]


# -- responses from handle_cast ----------------------------------------------------------------


async def test_cast_ok_and_bare_value_store_the_result(flavour: type[Scripted]) -> None:
    async with running(with_specs(flavour, {"a": IDLE})) as manager:
        assert await manager.cast("a", Ok("r")) is None
        await until(lambda: manager.get("a").last_result == "r")
        await manager.cast("a", "bare")
        await until(lambda: manager.get("a").last_result == "bare")
        assert manager.get("a").payload == "p"
        assert manager.counters["casts"] == 2


async def test_cast_replace_changes_the_payload(flavour: type[Scripted]) -> None:
    async with running(with_specs(flavour, {"a": IDLE})) as manager:
        await manager.cast("a", Replace([1, 2]))
        await until(lambda: manager.get("a").payload == [1, 2])
        await manager.cast("a", "seen")
        await until(lambda: ("seen", "a", [1, 2]) in manager.of("cast"))


async def test_cast_replace_with_id_rekeys(flavour: type[Scripted]) -> None:
    async with running(with_specs(flavour, {("t", 1): IDLE})) as manager:
        await manager.cast(("t", 1), Replace("q", id=("t", 2)))
        await until(lambda: manager.ids() == [("t", 2)])
        assert manager.get(("t", 2)).payload == "q"
        assert manager.of("terminate") == [("rekey", ("t", 1), "q")]


async def test_cast_halt_removes_the_worker(flavour: type[Scripted]) -> None:
    async with running(with_specs(flavour, {"a": IDLE})) as manager:
        await manager.cast("a", Halt())
        await until(lambda: manager.ids() == [])
        assert manager.of("terminate") == [("halt", "a", "p")]
        with pytest.raises(UnknownWorkerError):
            await manager.cast("a", "again")


async def test_cast_timeout_schedules_a_perform(flavour: type[Scripted]) -> None:
    async with running(with_specs(flavour, {"a": IDLE})) as manager:
        await manager.cast("a", Timeout(0.02, "r"))
        await until(lambda: performs(manager) == [("a", "p")], timeout=2)
        assert manager.get("a").last_result in ("r", None)  # the perform's Ok(None) follows


async def test_casts_to_one_worker_run_in_order(flavour: type[Scripted]) -> None:
    async with running(with_specs(flavour, {"a": IDLE, "b": IDLE})) as manager:
        for n in range(50):
            await manager.cast("a", n)
            await manager.cast("b", -n)
        await until(lambda: len(manager.of("cast")) == 100)
        assert [m for m, i, _ in manager.of("cast") if i == "a"] == list(range(50))
        assert [m for m, i, _ in manager.of("cast") if i == "b"] == [-n for n in range(50)]


async def test_calls_and_casts_to_one_worker_run_in_order(flavour: type[Scripted]) -> None:
    async with running(with_specs(flavour, {"a": {"payload": 0, "timeout": 0}})) as manager:
        await manager.cast("a", Replace(1))
        await manager.cast("a", Replace(2))
        # the call is queued behind both casts: it sees their payload
        assert await manager.call("a", "now") == "now"
        assert manager.of("call") == [("now", "a", 2)]


# -- lifecycle -----------------------------------------------------------------------------------


async def test_state_changes_starting_up_down() -> None:
    manager = await with_specs(Recorder, {"a": IDLE}).start()
    assert manager.state == "up"
    assert manager.of("state") == [("starting",), ("up",)]
    await manager.stop()
    assert manager.state == "down"
    assert manager.of("state") == [("starting",), ("up",), ("down",)]
    await manager.stop()  # stopping twice is harmless
    assert manager.of("state") == [("starting",), ("up",), ("down",)]


async def test_async_state_change_callback_is_awaited() -> None:
    seen: list[str] = []

    class P(DynamicManager):
        async def handle_state_change(self, state: str) -> None:
            await asyncio.sleep(0.001)
            seen.append(state)

    manager = await P.start()
    assert seen == ["starting", "up"]
    await manager.stop()
    assert seen == ["starting", "up", "down"]


async def test_stop_terminates_every_worker_with_shutdown() -> None:
    specs = {
        "idle": {"payload": "i", "timeout": 0},
        "timed": {"payload": "t", "timeout": 0.01},
        "replaced": {"payload": "r", "timeout": 0},
    }
    manager = await with_specs(Scripted, specs).start()
    await manager.call("replaced", Replace("r2"))
    await until(lambda: len(performs(manager, "timed")) >= 2)
    await manager.stop()
    assert sorted(manager.of("terminate")) == [
        ("shutdown", "idle", "i"),
        ("shutdown", "replaced", "r2"),
        ("shutdown", "timed", "t"),
    ]
    assert len(manager) == 0
    assert manager.ids() == []


async def test_stop_waits_for_running_callbacks() -> None:
    class Slow(Recorder):
        SPECS = {"a": {"timeout": 0, "instant_perform": True}}

        async def perform(self, id: Any, payload: Any) -> Any:
            self.events.append(("enter", id))
            await asyncio.sleep(0.1)
            self.events.append(("exit", id))

    manager = await Slow.start()
    await until(lambda: manager.of("enter"))
    await manager.stop()
    kinds = [e[0] for e in manager.events if e[0] in ("enter", "exit", "terminate")]
    assert kinds == ["enter", "exit", "terminate"]


async def test_stop_leaves_no_task_behind() -> None:
    before = asyncio.all_tasks()
    specs = {"a": {"timeout": 0.005}, "b": {"timeout": 0}}
    manager = await with_specs(FLAVOURS["async-suspending"], specs).start()
    await manager.cast("b", "x")
    await until(lambda: len(performs(manager)) >= 3)
    await manager.stop()
    assert asyncio.all_tasks() == before


async def test_terminate_reasons() -> None:
    specs = {"halted": IDLE, "deleted": IDLE, "replaced": IDLE, "kept": IDLE}
    manager = await with_specs(Scripted, specs).start()
    await manager.call("halted", Halt())
    assert await manager.delete("deleted") is True
    await manager.put("replaced", payload="new")
    await until(lambda: len(manager.of("terminate")) == 3)
    assert sorted(manager.of("terminate")) == [
        ("delete", "deleted", "p"),
        ("halt", "halted", "p"),
        ("replace", "replaced", "p"),
    ]
    await manager.restart()
    assert sorted(manager.of("terminate"))[-2:] == [
        ("restart", "kept", "p"),
        ("restart", "replaced", "new"),
    ]
    await manager.stop()
    assert sorted(manager.of("terminate"))[-2:] == [
        ("shutdown", "kept", "p"),
        ("shutdown", "replaced", "new"),
    ]


async def test_async_terminate_is_awaited() -> None:
    done: list[Any] = []

    class P(DynamicManager):
        def children_specs(self) -> dict[Any, Any]:
            return {"a": {"timeout": 0}}

        async def terminate(self, reason: str, id: Any, payload: Any) -> None:
            await asyncio.sleep(0.01)
            done.append((reason, id))

    manager = await P.start()
    await manager.delete("a")
    assert done == [("delete", "a")]
    await manager.put("b")
    await manager.stop()
    assert done == [("delete", "a"), ("shutdown", "b")]


# -- init: lazy payloads ---------------------------------------------------------------------------


class Lazy(Scripted):
    SPECS = {"a": {"payload": 1, "timeout": 0}, "b": {"payload": 2, "timeout": 0}}

    def init(self, id: Any, payload: Any) -> Any:
        self.events.append(("init", id, payload))
        return {"id": id, "built_from": payload}


class AsyncLazy(Lazy):
    async def init(self, id: Any, payload: Any) -> Any:
        await asyncio.sleep(0.001)
        return super().init(id, payload)


@pytest.mark.parametrize("cls", [Lazy, AsyncLazy], ids=["sync", "async"])
async def test_init_builds_the_payload_at_start(cls: type[Lazy]) -> None:
    async with running(cls) as manager:
        assert sorted(manager.of("init")) == [("a", 1), ("b", 2)]
        assert manager.get("a").payload == {"id": "a", "built_from": 1}
        await manager.call("b", "x")
        assert manager.of("call") == [("x", "b", {"id": "b", "built_from": 2})]
        # put and restart build the payload again; the spec keeps the raw payload
        await manager.put("c", payload=3)
        assert manager.get("c").payload == {"id": "c", "built_from": 3}
        assert manager.get("c").spec.payload == 3
        await manager.call("a", Replace("changed"))
        await manager.restart()
        assert manager.get("a").payload == {"id": "a", "built_from": 1}
        assert sorted(manager.of("init")[-3:]) == [("a", 1), ("b", 2), ("c", 3)]
        assert len(manager.of("init")) == 6


async def test_without_init_the_payload_is_the_spec_payload() -> None:
    async with running(with_specs(Scripted, {"a": {"payload": [1], "timeout": 0}})) as manager:
        assert manager.get("a").payload == [1]


# -- runtime management ----------------------------------------------------------------------------


async def test_put_adds_a_worker() -> None:
    async with running(Scripted) as manager:
        assert len(manager) == 0
        await manager.put("a", payload="x", timeout=0.01)
        assert manager.ids() == ["a"]
        assert manager.get("a").spec == Spec(payload="x", timeout=0.01)
        await until(lambda: len(performs(manager, "a")) >= 2)
        await manager.put(7)
        assert manager.get(7).spec == Spec()  # the defaults: timeout 1 s, lull 1.1
        assert len(manager) == 2


async def test_put_over_an_existing_id_replaces_it() -> None:
    async with running(with_specs(Scripted, {"a": IDLE})) as manager:
        await manager.call("a", Replace("changed"))
        await manager.put("a", payload="fresh", timeout=0.01, instant_perform=True)
        assert manager.of("terminate") == [("replace", "a", "changed")]
        assert manager.get("a").payload == "fresh"
        await until(lambda: ("a", "fresh") in performs(manager))


async def test_put_new_only_adds_unknown_ids() -> None:
    async with running(with_specs(Scripted, {"a": IDLE})) as manager:
        assert await manager.put_new("a", payload="other") is False
        assert manager.get("a").payload == "p"
        assert manager.of("terminate") == []
        assert await manager.put_new("b", payload="b") is True
        assert manager.get("b").payload == "b"


async def test_delete() -> None:
    async with running(with_specs(Scripted, {"a": IDLE, "b": IDLE})) as manager:
        assert await manager.delete("a") is True
        assert await manager.delete("a") is False
        assert await manager.delete("never") is False
        assert manager.ids() == ["b"]
        assert manager.of("terminate") == [("delete", "a", "p")]
        with pytest.raises(UnknownWorkerError):
            await manager.call("a", "x")


async def test_get_snapshots_a_worker() -> None:
    class Slow(Scripted):
        SPECS = {"a": {"payload": "p", "timeout": 0}}

        async def handle_call(self, message: Any, id: Any, payload: Any) -> Any:
            await asyncio.sleep(0.05)
            return Ok(message)

    async with running(Slow) as manager:
        assert manager.get("missing") is None
        info = manager.get("a")
        assert isinstance(info, WorkerInfo)
        assert info == WorkerInfo("a", Spec(payload="p", timeout=0.0), "p", None, None)
        loop = asyncio.get_running_loop()
        before = loop.time()
        call = asyncio.create_task(manager.call("a", "r"))
        await until(lambda: manager.get("a").busy_since is not None)
        busy_since = manager.get("a").busy_since
        assert busy_since is not None and before <= busy_since <= loop.time()
        assert await call == "r"
        info = manager.get("a")
        assert (info.busy_since, info.last_result) == (None, "r")


async def test_ids_and_len_follow_runtime_changes() -> None:
    async with running(with_specs(Scripted, {i: IDLE for i in range(5)})) as manager:
        assert sorted(manager.ids()) == [0, 1, 2, 3, 4]
        assert len(manager) == 5
        await manager.delete(0)
        await manager.put("x")
        await manager.put(("t", b"y"))
        assert sorted(map(str, manager.ids())) == sorted(map(str, [1, 2, 3, 4, "x", ("t", b"y")]))
        assert len(manager) == 6


async def test_restart_starts_every_worker_again_from_its_spec() -> None:
    specs = {"a": {"payload": 0, "timeout": 0, "instant_perform": True}, "b": IDLE}
    async with running(with_specs(Scripted, specs)) as manager:
        await until(lambda: performs(manager) == [("a", 0)])
        await manager.call("a", Replace(5))
        await manager.put("c", payload="c")
        await manager.restart()
        assert manager.get("a").payload == 0
        assert sorted(manager.ids()) == ["a", "b", "c"]
        assert sorted(manager.of("terminate")) == [
            ("restart", "a", 5),
            ("restart", "b", "p"),
            ("restart", "c", "c"),
        ]
        await until(lambda: performs(manager) == [("a", 0), ("a", 0)])  # instant_perform again
        assert manager.state == "up"
        assert await manager.call("b", "still answers") == "still answers"


# -- bad input -----------------------------------------------------------------------------------


async def assert_start_fails(specs: Any, error: type[Exception], match: str) -> None:
    before = asyncio.all_tasks()
    manager_cls = with_specs(Recorder, specs)
    with pytest.raises(error, match=match):
        await manager_cls.start()
    assert asyncio.all_tasks() == before  # no dispatcher left behind


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"payload": 1, "timeot": 1}, r"unknown field\(s\) timeot"),
        ({"timeout": -1}, "timeout must be >= 0"),
        ({"timeout": "1"}, "timeout must be a number"),
        ({"timeout": True}, "timeout must be a number"),
        ({"timeout": float("nan")}, "timeout must be a number"),
        ({"timeout": float("inf")}, "timeout must be a number"),
        ({"lull": 0.5}, "lull must be >= 1"),
        (5, "must be a dict"),
        (0, "must be a dict"),
        ([("timeout", 1)], "must be a dict"),
        ("timeout=1", "must be a dict"),
    ],
    ids=[
        "unknown-field",
        "negative-timeout",
        "str-timeout",
        "bool-timeout",
        "nan-timeout",
        "inf-timeout",
        "small-lull",
        "int",
        "zero",
        "list",
        "str",
    ],
)
async def test_bad_specs_are_refused_with_a_clear_error(spec: Any, match: str) -> None:
    await assert_start_fails({"ok": {}, "bad": spec}, ConfigurationError, match)
    async with running(Recorder) as manager:
        if isinstance(spec, dict):
            with pytest.raises(ConfigurationError, match=match):
                await manager.put("bad", **spec)
            assert manager.ids() == []


async def test_children_specs_must_be_a_mapping() -> None:
    await assert_start_fails([("a", {})], ConfigurationError, "must return a mapping")


@pytest.mark.parametrize("bad_id", [1.5, object(), None, True, ("ok", 2.0), frozenset({"x"})])
async def test_ids_of_unsupported_types_are_refused(bad_id: Any) -> None:
    await assert_start_fails({bad_id: {}}, TypeError, "worker id .*unsupported ring key type")
    async with running(with_specs(Scripted, {"a": IDLE})) as manager:
        attempts = [
            lambda: manager.put(bad_id),
            lambda: manager.put_new(bad_id),
            lambda: manager.delete(bad_id),
        ]
        if bad_id is not None:  # call(None, m) and cast(None, m) are pool mode
            attempts += [lambda: manager.call(bad_id, "m"), lambda: manager.cast(bad_id, "m")]
        for attempt in attempts:
            with pytest.raises(TypeError, match="unsupported ring key type"):
                await attempt()
        assert manager.ids() == ["a"]


async def test_rekeying_to_an_unsupported_id_keeps_the_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running(with_specs(Scripted, {"a": {"payload": "p", "timeout": 0.01}})) as manager:
        assert await manager.call("a", Replace("q", id=1.5)) == "q"
        await until(lambda: manager.counters["errors"] == 1)
        assert "cannot re-key worker 'a'" in caplog.text
        assert manager.ids() == ["a"]
        count = len(performs(manager))
        await until(lambda: len(performs(manager)) > count + 1)  # it keeps performing
        assert performs(manager)[-1] == ("a", "q")


async def test_unknown_ids_raise_unknown_worker_error() -> None:
    async with running(with_specs(Scripted, {"a": IDLE})) as manager:
        with pytest.raises(UnknownWorkerError, match="'nope'"):
            await manager.call("nope", "m")
        with pytest.raises(UnknownWorkerError, match="'nope'"):
            await manager.cast("nope", "m")
        with pytest.raises(KeyError):  # it is a KeyError too
            await manager.call(("t", 1), "m")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"colour": "red"}, "unknown manager option 'colour'"),
        ({"on_error": "explode"}, "on_error must be one of"),
        ({"pickup": "lifo"}, "pickup must be one of"),
        ({"concurrency": 0}, "concurrency must be an int >= 1"),
        ({"concurrency": 1.5}, "concurrency must be an int >= 1"),
    ],
)
async def test_bad_manager_options(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        await Recorder.start(**options)
