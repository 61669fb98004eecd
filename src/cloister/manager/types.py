"""Small typed values the manager's rooms share: ids, options, reasons, counters."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Literal, TypeAlias, get_args

from cloister._histogram import Histogram
from cloister.ring import Key

__all__ = [
    "EXECUTORS",
    "ON_ERROR",
    "ON_HANDLER_TIMEOUT",
    "PICKUP",
    "Executor",
    "Key",
    "ManagerCounters",
    "ManagerTimings",
    "OnError",
    "OnHandlerTimeout",
    "Pickup",
    "Reason",
]

OnError: TypeAlias = Literal["continue", "restart", "remove"]
"""What a raising callback does to its worker."""
Pickup: TypeAlias = Literal["random", "first_free", "hash"]
"""How pool mode (``call(None, msg)``) picks a worker."""
Executor: TypeAlias = Literal["thread", "process", "loop"]
"""Where sync callbacks run: a thread pool (default), child processes, or the loop."""
OnHandlerTimeout: TypeAlias = Literal["report", "abandon"]
"""What a callback running past ``handler_timeout`` gets: reported, or also abandoned."""
ON_ERROR: tuple[OnError, ...] = get_args(OnError)
PICKUP: tuple[Pickup, ...] = get_args(Pickup)
EXECUTORS: tuple[Executor, ...] = get_args(Executor)
ON_HANDLER_TIMEOUT: tuple[OnHandlerTimeout, ...] = get_args(OnHandlerTimeout)


class Reason(StrEnum):
    """Why a worker stops: the ``reason`` its ``terminate`` callback receives.

    A ``StrEnum``: callbacks written against the plain strings keep working.
    """

    SHUTDOWN = "shutdown"
    HANDOFF = "handoff"
    HALT = "halt"
    DELETE = "delete"
    RESTART = "restart"
    ERROR = "error"
    REKEY = "rekey"
    SUSPEND = "suspend"  # the node lost its lease or quorum
    REPLACE = "replace"
    FENCED = "fenced"  # the medium refused its state: another node claimed its partition


@dataclass(slots=True)
class ManagerCounters:
    """What a manager counted since it started (``manager.counters``)."""

    performs: int = 0
    calls: int = 0
    casts: int = 0
    errors: int = 0
    timeouts: int = 0
    handed_off: int = 0
    taken_over: int = 0
    duplicates: int = 0
    retries: int = 0
    dead_letters: int = 0
    late_results: int = 0
    """Callbacks whose result came back after the node's lease ran out, or after they
    were abandoned (discarded)."""
    handler_timeouts: int = 0
    """Callbacks that ran longer than ``handler_timeout``."""
    abandoned: int = 0
    """Callbacks abandoned at ``handler_timeout`` (``on_handler_timeout="abandon"``)."""
    stalls: int = 0
    """Looks of the stall watchdog that found the manager up, records waiting and
    nothing in flight or handled (each one healed)."""
    fenced_writes: int = 0
    """State records the medium refused: another node had claimed their partition."""
    state_lost: int = 0
    """Stored worker records (payloads, runtime specs) of this node's partitions that the
    medium lost (a server restarted with an empty store): those workers start afresh."""

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict (status, metrics)."""
        return asdict(self)

    def __getitem__(self, name: str) -> int:
        # Read access by name, as when the counters were a dict.
        if name not in self.__slots__:
            raise KeyError(name)
        value: int = getattr(self, name)
        return value


CALLBACK_KINDS = ("perform", "handle_cast", "handle_call")
"""The callbacks :class:`ManagerTimings` times."""
HANDOFF_PHASES = ("release", "settle")
"""The phases of a handoff :class:`ManagerTimings` times, once per epoch each."""


def _by(names: tuple[str, ...]) -> dict[str, Histogram]:
    return {name: Histogram() for name in names}


@dataclass(slots=True)
class ManagerTimings:
    """What a manager times (``manager.timings``; exported as Prometheus histograms)."""

    callbacks: dict[str, Histogram] = field(default_factory=lambda: _by(CALLBACK_KINDS))
    """Seconds from a callback's start (its queueing on the thread pool, for a sync one)
    to its result applied, by callback; callbacks that raised are not timed."""
    cast_latency: Histogram = field(default_factory=Histogram)
    """Seconds from an inbox record stored by the medium to its ``handle_cast`` applied
    here (the medium's clock against ours: both wall clocks)."""
    handoff: dict[str, Histogram] = field(default_factory=lambda: _by(HANDOFF_PHASES))
    """Seconds each epoch's release (stop and hand over what moved away) and settle
    (claim, load state, start workers, take partitions) took on this node."""
