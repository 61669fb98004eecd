"""The manager's phases: public state strings, the dispatcher's gate, the move table."""

from __future__ import annotations

from typing import Any

import pytest

from cloister.manager.lifecycle import TRANSITIONS, Lifecycle, ManagerState, Phase
from cloister.manager.types import ManagerCounters, Reason


def make() -> tuple[Lifecycle, list[bool], list[str]]:
    gates: list[bool] = []
    heard: list[str] = []

    async def notify(state: ManagerState) -> None:
        heard.append(state)

    return Lifecycle(Phase.DOWN, gates.append, notify), gates, heard


async def test_states_compare_equal_to_their_strings_and_are_heard_once() -> None:
    lifecycle, gates, heard = make()
    for phase in (Phase.JOINING, Phase.WAITING, Phase.UP, Phase.SUSPENDING, Phase.WAITING):
        await lifecycle.enter(phase)
    assert heard == ["starting", "rehashing", "up", "rehashing"]
    assert lifecycle.state == "rehashing" and gates[-1] is True  # WAITING holds
    await lifecycle.enter(Phase.UP)
    assert gates[-1] is False and lifecycle.state == "up"
    await lifecycle.enter(Phase.LEAVING)  # keeps the gate and the public state
    assert gates[-1] is False and lifecycle.state == "up" and lifecycle.leaving
    await lifecycle.enter(Phase.LEFT)
    assert gates[-1] is True and lifecycle.leaving


@pytest.mark.parametrize(("start", "to"), [(Phase.LEFT, Phase.UP), (Phase.DOWN, Phase.UP)])
async def test_moves_outside_the_table_are_refused(start: Phase, to: Phase) -> None:
    lifecycle, _, _ = make()
    lifecycle.phase = start
    assert to not in TRANSITIONS[start]
    with pytest.raises(RuntimeError, match="no move"):
        await lifecycle.enter(to)


def test_reasons_and_counters_keep_their_plain_forms() -> None:
    assert [str(r) for r in Reason] == [
        "shutdown",
        "handoff",
        "halt",
        "delete",
        "restart",
        "error",
        "rekey",
        "suspend",
        "replace",
        "fenced",
    ]
    counters = ManagerCounters()
    counters.casts += 2
    expected: dict[str, Any] = dict.fromkeys(counters.as_dict(), 0) | {"casts": 2}
    assert counters.as_dict() == expected and counters["casts"] == 2
    with pytest.raises(KeyError):
        counters["nope"]
