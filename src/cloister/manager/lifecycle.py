"""The manager's lifecycle: one enum of phases and the table of moves between them.

A phase says three things at once: the public state (``manager.state``, what
``handle_state_change`` hears), whether the dispatcher may run callbacks, and whether the
manager is leaving (handing everything over, refusing new messages). Phases that only hold
the dispatcher (``STOPPING``, ``SUSPENDING``) keep the public state they came from, so a
callback hears each state change once, at the moment it always did.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from enum import Enum, StrEnum
from typing import Any

log = logging.getLogger("cloister.manager")


class ManagerState(StrEnum):
    """What ``manager.state`` answers; equal to the plain strings callers compare with."""

    DOWN = "down"
    STARTING = "starting"
    UP = "up"
    REHASHING = "rehashing"


class Phase(Enum):
    """Where a manager is in its life (see the module's docstring)."""

    DOWN = "down"
    STARTING = "starting"  # standalone: workers run as they start
    JOINING = "joining"  # cluster: nothing is ours until a topology is settled
    UP = "up"
    REHASHING = "rehashing"  # releasing what moved away; the rest keep running
    WAITING = "waiting"  # suspended, or no topology settled yet
    SUSPENDING = "suspending"  # stopping every worker, then WAITING
    STOPPING = "stopping"  # stop(): draining, then DOWN
    LEAVING = "leaving"  # handing everything over
    LEFT = "left"  # handed over: refuse new messages until stopped

    @property
    def public(self) -> ManagerState | None:
        """The public state this phase brings; None: the one it came from stays."""
        return _PUBLIC[self]

    @property
    def runs(self) -> bool | None:
        """The dispatcher may run callbacks (None: as it did before this phase)."""
        return _RUNS.get(self)

    @property
    def leaving(self) -> bool:
        """Everything is (being) handed over: new messages go to the next owner."""
        return self is Phase.LEAVING or self is Phase.LEFT


_PUBLIC: dict[Phase, ManagerState | None] = {
    Phase.DOWN: ManagerState.DOWN,
    Phase.STARTING: ManagerState.STARTING,
    Phase.JOINING: ManagerState.STARTING,
    Phase.UP: ManagerState.UP,
    Phase.REHASHING: ManagerState.REHASHING,
    Phase.WAITING: ManagerState.REHASHING,
    Phase.SUSPENDING: None,
    Phase.STOPPING: None,
    Phase.LEAVING: None,
    Phase.LEFT: None,
}
# LEAVING keeps the gate as it was: the workers are stopped one by one, not held.
_RUNS: dict[Phase, bool] = {p: p in (Phase.STARTING, Phase.UP, Phase.REHASHING) for p in Phase}
del _RUNS[Phase.LEAVING]

# A cluster's hooks, stop() and a failed start can meet in any order: between the live
# phases the moves are free, except that only DOWN starts, and leaving is for good.
_FOLLOWING = frozenset(Phase) - {Phase.STARTING, Phase.JOINING}
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.DOWN: frozenset({Phase.STARTING, Phase.JOINING}),
    Phase.STARTING: frozenset({Phase.UP, Phase.STOPPING, Phase.DOWN}),
    Phase.JOINING: _FOLLOWING,
    Phase.UP: _FOLLOWING,
    Phase.REHASHING: _FOLLOWING,
    Phase.WAITING: _FOLLOWING,
    Phase.SUSPENDING: _FOLLOWING,
    Phase.STOPPING: _FOLLOWING,
    Phase.LEAVING: frozenset({Phase.LEFT, Phase.DOWN}),
    Phase.LEFT: frozenset({Phase.LEAVING, Phase.DOWN}),
}
"""Allowed moves (staying in a phase is always allowed)."""


class Lifecycle:
    """Owner of the manager's phase; keeps the dispatcher's gate and the public state in
    step with it and tells ``handle_state_change`` of each public change."""

    __slots__ = ("_gate", "_notify", "phase", "state")

    def __init__(
        self,
        phase: Phase,
        gate: Callable[[bool], None],
        notify: Callable[[ManagerState], Awaitable[Any]],
    ) -> None:
        self.phase = phase
        self.state = ManagerState.DOWN
        self._gate = gate  # (paused) -> None: holds or frees the dispatcher
        self._notify = notify
        gate(True)

    def move(self, phase: Phase) -> ManagerState | None:
        """Enter ``phase`` now; the public state it brings when that changed (the caller
        awaits :meth:`announce` with it), else None."""
        if phase is not self.phase and phase not in TRANSITIONS[self.phase]:
            raise RuntimeError(f"manager lifecycle: no move from {self.phase} to {phase}")
        self.phase = phase
        runs = phase.runs
        if runs is not None:
            self._gate(not runs)
        public = phase.public
        if public is None or public == self.state:
            return None
        self.state = public
        return public

    async def enter(self, phase: Phase) -> None:
        """Enter ``phase`` and tell ``handle_state_change`` when the public state changed."""
        changed = self.move(phase)
        if changed is not None:
            await self._notify(changed)

    @property
    def leaving(self) -> bool:
        return self.phase.leaving

    @property
    def down(self) -> bool:
        return self.state is ManagerState.DOWN
