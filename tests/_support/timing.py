"""Every membership timing the test suites use, in one place.

Memory clusters can run fast; NATS TTLs are whole seconds, so NATS suites use timings
the server can honour. Tests that do arithmetic with the values import the flat names
(``from tests._support.timing import FAST_HEARTBEAT as HEARTBEAT``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Timing:
    heartbeat: float
    failure_timeout: float

    def options(self) -> dict[str, float]:
        """The ``Cluster`` keyword arguments."""
        return {"heartbeat": self.heartbeat, "failure_timeout": self.failure_timeout}


FAST = Timing(heartbeat=0.05, failure_timeout=0.2)
"""Memory clusters on their own (membership tests)."""

MEMORY = Timing(heartbeat=0.05, failure_timeout=0.25)
"""Memory clusters running managers (inbox, sources, handoff): a little room for handoffs."""

NATS = Timing(heartbeat=0.5, failure_timeout=2.0)
"""Anything on a real nats-server (TTLs are whole seconds)."""

NATS_TTL_SLACK = 0.5
"""NATS expiries are noticed by the server's timer and then pushed to watchers: allow this
much on top of the failure timeout + 1 heartbeat bound."""

FAST_HEARTBEAT, FAST_FAILURE_TIMEOUT = FAST.heartbeat, FAST.failure_timeout
MEMORY_HEARTBEAT, MEMORY_FAILURE_TIMEOUT = MEMORY.heartbeat, MEMORY.failure_timeout
NATS_HEARTBEAT, NATS_FAILURE_TIMEOUT = NATS.heartbeat, NATS.failure_timeout
