"""A fixed-bucket histogram cheap enough to observe on a hot path.

``prometheus_client`` is optional, and its own histograms take a lock per observation;
the engine observes every callback on the event loop thread, so it fills one of these
(a bisect and three increments) and the metrics collector turns a snapshot into a
Prometheus histogram at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Seconds, from half a millisecond (a callback) to a minute (a backlog, a handoff)."""


class Histogram:
    """Counts of observations at or below each bound (and above the last), and their sum.

    One thread observes (the event loop's); another may :meth:`snapshot` at any time.
    """

    __slots__ = ("_counts", "bounds", "sum")

    def __init__(self, bounds: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(sorted(bounds))
        if not self.bounds:
            raise ValueError("a histogram needs at least one bucket bound")
        self._counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation of ``value``."""
        self._counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        """How many observations so far."""
        return sum(self._counts)

    def snapshot(self) -> tuple[list[tuple[float, int]], float]:
        """``([(bound, cumulative count), ..., (inf, total)], sum)``, as Prometheus
        exposes a histogram (a copy: the observing thread goes on)."""
        counts, total = list(self._counts), self.sum
        buckets, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            running += count
            buckets.append((bound, running))
        return buckets, total
