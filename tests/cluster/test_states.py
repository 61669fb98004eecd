"""The state machine's transition table, exhaustively."""

from __future__ import annotations

import itertools

import pytest

from cloister.cluster.states import TRANSITIONS, InvalidTransitionError, State, StateMachine

ALLOWED = {
    (State.DOWN, State.ASSEMBLING),
    (State.ASSEMBLING, State.REHASHING),
    (State.ASSEMBLING, State.STOPPING),
    (State.REHASHING, State.READY),
    (State.REHASHING, State.STOPPING),
    (State.READY, State.REHASHING),
    (State.READY, State.STOPPING),
    (State.STOPPING, State.STOPPED),
}


def test_table_is_exactly_the_documented_one() -> None:
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == ALLOWED


@pytest.mark.parametrize("pair", list(itertools.product(State, State)))
def test_every_pair(pair: tuple[State, State]) -> None:
    source, target = pair
    machine = StateMachine()
    machine.state = source
    if pair in ALLOWED:
        assert machine.move(target) is source
        assert machine.state is target
    else:
        with pytest.raises(InvalidTransitionError, match=f"{source} cannot move to {target}"):
            machine.move(target)
        assert machine.state is source
