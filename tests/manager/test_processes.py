"""``executor="process"`` (issue 12, item 3): CPU-bound sync callbacks run in child
processes over the project's msgpack wire — the event loop and the other workers keep
their pace, an abandoned callback's process is killed, nothing is pickled."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from cloister import DynamicManager, Halt, Ok, Replace, Timeout
from cloister.errors import ConfigurationError, RemoteError, WireFormatError
from cloister.manager.processes import decode_response, encode_response

from ._process_app import InChildren
from ._standalone import loop_lags, running, until


async def test_callbacks_run_in_children_in_order_with_their_responses_applied() -> None:
    async with running(InChildren) as manager:
        pids = {await manager.call(f"k{i}", "pid") for i in range(4)}
        assert os.getpid() not in pids and 1 <= len(pids) <= 2  # pool_size children
        for n in range(30):
            await manager.cast("k1", n)
        await until(lambda: manager.counters.casts == 30)
        assert await manager.call("k1", "payload") == list(range(30))
        with pytest.raises(RemoteError, match="k2 refuses"):
            await manager.call("k2", "raise")
        assert await manager.call("k2", "pid") in pids  # the child lived on after it


async def test_a_cpu_bound_callback_leaves_the_loop_its_pace() -> None:
    async with running(InChildren) as manager:
        await manager.call("k0", "pid")  # the child is up
        async with loop_lags() as lags:
            began = time.monotonic()
            assert await manager.call("k0", ["burn", 0.6]) == "burnt"
            assert time.monotonic() - began >= 0.6
        # The pure-Python loop ran in another process: this one's loop never waited on it.
        assert len(lags) >= 20 and max(lags) < 0.1, (len(lags), max(lags))


async def test_an_abandoned_callback_s_process_is_killed_and_the_next_starts_fresh() -> None:
    # (a child takes a few tenths of a second to start: that counts, so 1.5 s)
    async with running(InChildren, handler_timeout=1.5, on_handler_timeout="abandon") as manager:
        first = await manager.call("k0", "pid")
        began = time.monotonic()
        with pytest.raises(RemoteError, match="handler_timeout"):
            await manager.call("k0", ["sleep", 30])
        assert time.monotonic() - began < 5
        await until(lambda: manager.counters.abandoned == 1)
        pids = {await manager.call(f"k{i}", "pid") for i in range(4)}
        await until(lambda: not _alive(first) or first in pids, timeout=5)
        assert manager.counters.late_results >= 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_class_a_child_cannot_import_is_refused_with_what_to_do() -> None:
    class Local(DynamicManager):
        executor = "process"

        def perform(self, id: Any, payload: Any) -> Any:
            return Ok(None)

    with pytest.raises(ConfigurationError, match="module level"):
        Local()


@pytest.mark.parametrize(
    "response",
    [
        Ok(1),
        Ok(None),
        Replace([1, 2]),
        Replace(3, id="k9"),
        Halt("done"),
        Timeout(1.5, "r"),
        Timeout(2, "p", permanent=True),
        7,
    ],
)
def test_responses_cross_the_pipe_as_themselves(response: Any) -> None:
    assert decode_response(encode_response(response)) == response


@pytest.mark.parametrize("bad", [None, [], ["replace"], ["nope", 1], ["halt", 3], [1, 2]])
def test_a_malformed_child_response_is_refused(bad: Any) -> None:
    with pytest.raises(WireFormatError):
        decode_response(bad)
