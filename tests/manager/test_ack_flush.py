"""Giving partitions up waits for their own acks only, not for the partitions kept.

Under load the partitions a node keeps ack without pause; a release that waited for no
ack at all to be queued waited out its whole timeout on every handoff (seen as a 5 s
release when a 4th node joined a loaded cluster, ``bench/handoff_under_load.py``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from cloister._tasks import Supervisor
from cloister.backends import open_backend
from cloister.backends.base import LogRecord
from cloister.manager.consumer import PartitionConsumers
from cloister.store.inbox import Inbox

KEPT, GIVEN_UP = 1, 2


class RecordingConsumer:
    """Stands in for a partition's claim: records the acks it was sent (a round trip)."""

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.acked: list[int] = []

    async def ack_many(self, records: list[LogRecord]) -> None:
        await asyncio.sleep(0.002)  # the medium's round trip: more acks queue meanwhile
        self.acked += [r.sequence for r in records]


async def _deliver(message: Any) -> None:
    raise AssertionError("nothing is fetched in this test")


async def test_a_release_waits_for_the_given_up_partitions_acks_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = open_backend("memory://ack-flush", "flush", "a")
    supervisor = Supervisor("test")
    consumers = PartitionConsumers(Inbox(backend, "m", partitions=4), "a", _deliver, supervisor)
    kept, given_up = RecordingConsumer(KEPT), RecordingConsumer(GIVEN_UP)
    consumers._consumers = {KEPT: kept, GIVEN_UP: given_up}  # type: ignore[dict-item]
    stop = asyncio.Event()

    async def keep_acking() -> None:  # the kept partition's workers, never idle
        sequence = 0
        while not stop.is_set():
            sequence += 1
            consumers.ack(kept, LogRecord(KEPT, sequence, b""))  # type: ignore[arg-type]
            await asyncio.sleep(0)

    feeder = asyncio.ensure_future(keep_acking())
    try:
        await asyncio.sleep(0.01)
        consumers.ack(given_up, LogRecord(GIVEN_UP, 7, b""))  # type: ignore[arg-type]
        with caplog.at_level(logging.WARNING, logger="cloister.manager.consumer"):
            await consumers.flush_acks({GIVEN_UP}, timeout=3.0)
        assert given_up.acked == [7], "the given-up partition's ack was not sent"
        assert not feeder.done(), "the kept partition stopped acking: nothing was shown"
        assert "not sent before giving the partitions up" not in caplog.text, (
            "the flush gave up on its timeout instead of seeing its own acks sent"
        )
    finally:
        stop.set()
        await feeder
        await supervisor.close()
    assert kept.acked, "the kept partition's acks were sent too"
