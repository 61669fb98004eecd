"""The node state machine, as Cloister's monitor has it.

::

    down -> assembling -> rehashing -> ready
                          rehashing <-> ready        (every topology change)
    assembling | rehashing | ready -> stopping -> stopped

``assembling``: joined, waiting until ``consensus`` members (and any expected nodes) are
present. ``rehashing``: the topology changed (or the cluster fell short of consensus, or
this node lost its lease); keys are being handed over. ``ready``: every member has
acknowledged the current epoch.
"""

from __future__ import annotations

import enum

from cloister.errors import CloisterError


class State(enum.StrEnum):
    """A node's lifecycle state."""

    DOWN = "down"
    ASSEMBLING = "assembling"
    REHASHING = "rehashing"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.DOWN: frozenset({State.ASSEMBLING}),
    State.ASSEMBLING: frozenset({State.REHASHING, State.STOPPING}),
    State.REHASHING: frozenset({State.READY, State.STOPPING}),
    State.READY: frozenset({State.REHASHING, State.STOPPING}),
    State.STOPPING: frozenset({State.STOPPED}),
    State.STOPPED: frozenset(),
}
"""Every allowed transition; anything else is a bug and raises."""


class InvalidTransitionError(CloisterError, RuntimeError):
    """A transition outside :data:`TRANSITIONS` was attempted (a bug in pycloister)."""


class StateMachine:
    """Holds the current state and refuses transitions the table does not allow."""

    def __init__(self) -> None:
        self.state = State.DOWN

    def move(self, to: State) -> State:
        """Move to ``to``; returns the previous state."""
        previous = self.state
        if to not in TRANSITIONS[previous]:
            raise InvalidTransitionError(f"state {previous} cannot move to {to}")
        self.state = to
        return previous
