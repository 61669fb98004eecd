"""``Quiet``: when to log a warning that would otherwise repeat with every message.

A flood of bad input (garbage requests, refused calls, undecodable records) is counted
one by one, and logged at most once per interval, saying how many there were so far:
a flood must not flood the log too.
"""

from __future__ import annotations

import time

INTERVAL = 60.0
"""Seconds between two warnings about the same kind of thing."""


class Quiet:
    """:meth:`due` is true at most once per ``interval`` seconds (the first time at once)."""

    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self._last: float | None = None

    def due(self) -> bool:
        """True when it is time to log again (and the clock starts anew)."""
        now = time.monotonic()
        if self._last is not None and now - self._last < self.interval:
            return False
        self._last = now
        return True


class QuietByKind:
    """One :class:`Quiet` per kind of warning; kinds may come from the wire, so at most
    ``limit`` are remembered (then they start afresh)."""

    def __init__(self, interval: float = INTERVAL, limit: int = 1000) -> None:
        self.interval = interval
        self.limit = limit
        self._kinds: dict[str, Quiet] = {}

    def due(self, kind: str) -> bool:
        """True when a warning of ``kind`` may be logged now."""
        quiet = self._kinds.get(kind)
        if quiet is None:
            if len(self._kinds) >= self.limit:
                self._kinds.clear()
            quiet = self._kinds[kind] = Quiet(self.interval)
        return quiet.due()


class Once:
    """Which bad records were reported already, by ``(key, revision)``: a record read on
    every listing (every settle, every ``items()``) is counted and logged once, until it
    changes. Remembers at most ``limit`` (records come from outside; then afresh)."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._seen: set[tuple[str, int]] = set()

    def first(self, key: str, revision: int) -> bool:
        """True the first time ``(key, revision)`` is met."""
        if (key, revision) in self._seen:
            return False
        if len(self._seen) >= self.limit:
            self._seen.clear()
        self._seen.add((key, revision))
        return True
