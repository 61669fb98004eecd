"""Timers for periodic performs: a hashed wheel, not a task or a heap entry per worker.

Due times are rounded up to ticks of ``resolution`` seconds; each tick is a list of the
workers due then, and a heap holds only the distinct ticks. Scheduling is an append;
an idle worker (``timeout`` 0) costs nothing. Rescheduling leaves a stale entry behind,
recognised on firing because the worker's ``due`` no longer matches.

A periodic worker's first perform falls at a point of its first period fixed by its id
(:func:`phase`): the million ids of one ``children_specs()`` started in the same instant
spread evenly over the period instead of falling due in the same tick, and since later
performs keep to the grid ``first, first + period, ...``, they stay spread. The point
depends only on the id (the ring's key hash), so it is the same on every node and run.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from cloister.manager.worker import GONE, Worker
from cloister.ring import Key, key_hash

_FRACTION_BITS = 53
_TO_FRACTION = 2.0**-_FRACTION_BITS


def phase(worker_id: Key, period: float) -> float:
    """Seconds from a worker's start to its first periodic perform: in ``(0, period]``,
    spread evenly over the period across ids, and the same for an id everywhere."""
    fraction = (key_hash(worker_id) & ((1 << _FRACTION_BITS) - 1)) * _TO_FRACTION
    return period * (1.0 - fraction)


class TimerWheel:
    """Workers grouped by the tick they are due in."""

    def __init__(self, resolution: float = 0.005) -> None:
        self.resolution = resolution
        self._buckets: dict[int, list[Worker]] = {}
        self._ticks: list[int] = []

    def schedule(self, worker: Worker, when: float) -> None:
        """Make ``worker`` due at loop time ``when`` (replacing any earlier schedule)."""
        worker.due = when
        tick = int(when / self.resolution) + 1
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = []
            heapq.heappush(self._ticks, tick)
        bucket.append(worker)

    def next_due(self) -> float | None:
        """Loop time of the earliest non-empty tick, or None."""
        return self._ticks[0] * self.resolution if self._ticks else None

    def pop_due(self, now: float) -> Iterator[Worker]:
        """Every worker whose tick has come; each one's ``due`` moves to ``fired``."""
        resolution = self.resolution
        ticks, buckets = self._ticks, self._buckets
        while ticks and ticks[0] * resolution <= now:
            bucket = buckets.pop(heapq.heappop(ticks))
            for worker in bucket:
                due = worker.due
                if due and due <= now + resolution and not worker.flags & GONE:
                    worker.due = 0.0
                    worker.fired = due
                    yield worker

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._buckets.values())
