"""Capped exponential backoff: the one delay policy of pycloister's retry loops.

A :class:`Backoff` is a small value: the first delay, the longest, the growth factor and
an optional jitter. Read it three ways:

- :meth:`Backoff.delay` ``(n)``: the delay before retry ``n`` (0-based), without state;
- :meth:`Backoff.delays`: a fresh iterator over the delays, for one retry loop;
- :meth:`Backoff.next` / :meth:`Backoff.reset`: the same sequence kept inside the value,
  for an owner that retries across calls (reset once it succeeded).

Jitter is a fraction of each delay drawn at random: ``jitter=1.0`` is "full jitter"
(anything from 0 to the delay), ``jitter=0.5`` keeps at least half of it. The random
source is injectable so tests can make it deterministic.
"""

from __future__ import annotations

import math
import random as _random
from collections.abc import Callable, Iterator

__all__ = ["Backoff"]


class Backoff:
    """Delays ``initial, initial * factor, ...`` capped at ``maximum``, optionally jittered.

    Args:
        initial: the first delay in seconds (>= 0).
        maximum: the longest delay in seconds (>= ``initial``).
        factor: how much each delay grows over the previous one (>= 1; default 2).
        jitter: the fraction of each delay that is random (0: none, 1: full jitter).
        random: returns a float in [0, 1); :func:`random.random` by default.
    """

    __slots__ = ("_attempt", "factor", "initial", "jitter", "maximum", "random")

    def __init__(
        self,
        initial: float,
        maximum: float,
        factor: float = 2.0,
        *,
        jitter: float = 0.0,
        random: Callable[[], float] = _random.random,
    ) -> None:
        if not (math.isfinite(initial) and initial >= 0):
            raise ValueError(f"initial delay must be a finite number >= 0, got {initial!r}")
        if not (math.isfinite(maximum) and maximum >= initial):
            raise ValueError(f"maximum delay must be finite and >= initial, got {maximum!r}")
        if not (math.isfinite(factor) and factor >= 1):
            raise ValueError(f"factor must be a finite number >= 1, got {factor!r}")
        if not 0 <= jitter <= 1:
            raise ValueError(f"jitter must be a fraction from 0 to 1, got {jitter!r}")
        self.initial = float(initial)
        self.maximum = float(maximum)
        self.factor = float(factor)
        self.jitter = float(jitter)
        self.random = random
        self._attempt = 0

    def __repr__(self) -> str:
        jitter = f", jitter={self.jitter:g}" if self.jitter else ""
        return f"Backoff({self.initial:g}, {self.maximum:g}, {self.factor:g}{jitter})"

    def delay(self, attempt: int) -> float:
        """The delay before retry ``attempt`` (0-based): capped, then jittered."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt!r}")
        try:
            grown = self.initial * self.factor**attempt
        except OverflowError:  # far past the cap anyway
            grown = math.inf
        capped = min(self.maximum, grown)
        if self.jitter:
            capped *= 1.0 - self.jitter * self.random()
        return capped

    def delays(self) -> Iterator[float]:
        """An endless iterator over the delays from the first one (independent of next())."""
        attempt = 0
        while True:
            yield self.delay(attempt)
            attempt += 1

    def next(self) -> float:
        """The next delay of this value's own sequence (see :meth:`reset`)."""
        value = self.delay(self._attempt)
        self._attempt += 1
        return value

    def reset(self) -> None:
        """Start this value's own sequence again from ``initial`` (after a success)."""
        self._attempt = 0
