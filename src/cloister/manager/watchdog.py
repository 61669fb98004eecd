"""The stall watchdog: a manager that is up, has records waiting in its partitions and
handles nothing, with nothing in flight, is stuck — it says so and heals.

Suspensions and settles reset the consumer's bookkeeping (see ``PartitionConsumers.reset``),
but a counter that drifted (an ack that was never sent, a record a crash of the medium
dropped) would leave a fetch loop waiting for room that never comes, with no error. So
every few seconds the watchdog samples the manager; when nothing moved since the last
sample, it looks closer — whether anything is really delivered and unhandled here, and
whether the owned partitions hold records (the whole log's depth first, one request:
partition by partition only when something is waiting somewhere) — and a stall is
counted (``stalls``), logged once, shown by the ``stalled`` flag (status, metrics), and
healed: the in-flight count is re-derived from what is really in flight and the fetch
loops are woken.

:func:`verdict` is the decision, pure; :class:`Watchdog` gathers the facts.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from cloister.errors import CloisterError
from cloister.manager.lifecycle import Phase
from cloister.manager.worker import Worker

if TYPE_CHECKING:
    from cloister.manager.consumer import PartitionConsumers
    from cloister.manager.engine import Engine
    from cloister.manager.lifecycle import Lifecycle

log = logging.getLogger("cloister.manager.watchdog")

CHECK_INTERVAL = 2.0  # seconds between samples


class Verdict(StrEnum):
    """What one look found."""

    WORKING = "working"  # something moved, or there is nothing to do
    LOOK_CLOSER = "look closer"  # nothing moved: count what is really in flight, the backlog
    STALLED = "stalled"  # up, records waiting, nothing in flight, nothing handled


@dataclass(frozen=True, slots=True)
class Sample:
    """The facts of one look (``really_in_flight`` and ``backlog`` None: not counted)."""

    up: bool
    progress: int  # records handled or parked so far (it only grows)
    partitions: int  # partitions consumed here
    counted_in_flight: int  # what the consumer believes is delivered and not acked
    really_in_flight: int | None = None
    backlog: int | None = None


def verdict(previous: Sample | None, now: Sample) -> Verdict:
    """Whether the manager is working, needs a closer look, or is stalled."""
    if previous is None or not now.up or not now.partitions or now.progress != previous.progress:
        return Verdict.WORKING
    if now.really_in_flight is None or now.backlog is None:
        return Verdict.LOOK_CLOSER
    if now.really_in_flight == 0 and now.backlog > 0:
        return Verdict.STALLED
    return Verdict.WORKING


class Watchdog:
    """Samples one manager's dispatch and inbox; heals a stall (see the module)."""

    def __init__(self, engine: Engine, consumers: PartitionConsumers, lifecycle: Lifecycle) -> None:
        self.engine = engine
        self.consumers = consumers
        self.lifecycle = lifecycle
        self.stalled = False
        self._previous: Sample | None = None

    async def run(self) -> None:
        """Look every :data:`CHECK_INTERVAL` seconds, for as long as the manager runs."""
        while True:
            await asyncio.sleep(CHECK_INTERVAL)
            try:
                await self.look()
            except CloisterError as exc:  # the medium is away: the next look tries again
                log.debug("stall watchdog: backlog not read (%s)", exc)

    async def look(self) -> Verdict:
        """One look: sample, decide, and heal when stalled."""
        now = self._sample()
        found = verdict(self._previous, now)
        if found is Verdict.LOOK_CLOSER:
            now = await self._closer(now)
            found = verdict(self._previous, now)
        self._previous = now
        if found is Verdict.STALLED:
            self._heal(now)
        elif found is Verdict.WORKING:
            self.stalled = False
        return found

    def _sample(self) -> Sample:
        engine, consumers = self.engine, self.consumers
        return Sample(
            up=self.lifecycle.phase is Phase.UP,
            # Handled, skipped as duplicates, failed (retried) or parked: records moved.
            progress=engine.counters.casts
            + engine.counters.duplicates
            + engine.counters.errors
            + engine.counters.dead_letters
            + consumers.parked,
            partitions=len(consumers.partitions),
            counted_in_flight=consumers.in_flight,
        )

    async def _closer(self, now: Sample) -> Sample:
        backlog = 0
        log_ = self.consumers.inbox.log
        # The whole log first, in one request: an idle manager (nothing moved, nothing
        # waiting) costs that much per look, not one request per partition it owns.
        if log_ is not None and await log_.depth():
            for partition in sorted(self.consumers.partitions):
                backlog += await log_.depth(partition)
        return Sample(
            up=now.up,
            progress=now.progress,
            partitions=now.partitions,
            counted_in_flight=self.consumers.in_flight,
            really_in_flight=self._really_in_flight(),
            backlog=backlog,
        )

    def _really_in_flight(self) -> int:
        """Inbox records delivered here and not settled: queued in a mailbox or parked for
        an id to come, inside a callback, or waiting for their ack to be sent."""
        engine = self.engine
        count = engine.in_flight + self.consumers.acks_pending
        for entry in engine.workers.values():
            if isinstance(entry, Worker) and entry.mailbox:
                count += sum(1 for m in entry.mailbox if m.inbox is not None)
        for waiting in engine.parked.values():
            count += sum(1 for m in waiting if m.inbox is not None)
        return count

    def _heal(self, now: Sample) -> None:
        engine = self.engine
        engine.counters.stalls += 1
        if not self.stalled:
            log.warning(
                "manager %s is stalled: up, %d record(s) waiting in its %d partition(s), "
                "none in flight (%d counted) and nothing handled for %.0f s; re-deriving "
                "the in-flight count and waking the fetch loops",
                engine.name,
                now.backlog or 0,
                now.partitions,
                now.counted_in_flight,
                CHECK_INTERVAL,
            )
        self.stalled = True
        self.consumers.resync(now.really_in_flight or 0)
