"""Same-name takeover on a real nats-server: node ``n1`` is paused (SIGSTOP) until its
lease expires, a new process takes the name ``n1``, then the old one wakes (SIGCONT).
The old process must notice it was replaced and stop, without touching what the new one
holds: every record cast afterwards is consumed by the new process."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from cloister.testing import NatsServer, ProcessGroup, wait_for
from tests._support.timing import NATS_FAILURE_TIMEOUT, NATS_TTL_SLACK
from tests.hostile.support import cast, run_app

APP = """
from cloister import DynamicManager, Replace


class Shop(DynamicManager):
    def children_specs(self):
        return {f"k{i}": {"payload": 0} for i in range(20)}

    def handle_cast(self, message, id, payload):
        print(f"cast handled {message}", flush=True)
        return Replace(payload + 1)
"""

RECORDS = 200


async def _cast_all(url: str) -> None:
    for seq in range(1, RECORDS + 1):
        await cast(url, "takeover", f"k{seq % 20}", seq, msg_id=f"later:{seq}")


def test_a_returning_node_whose_name_was_taken_over_stops_and_harms_nothing(
    nats_server: NatsServer, node_processes: ProcessGroup, tmp_path: Path
) -> None:
    url = nats_server.url
    old = run_app(node_processes, tmp_path, APP, url, "takeover", name="n1")
    old.send_signal(signal.SIGSTOP)
    try:
        time.sleep(NATS_FAILURE_TIMEOUT + 2 * NATS_TTL_SLACK + 1)  # its record expires
        new = run_app(node_processes, tmp_path, APP, url, "takeover", name="n1")
    finally:
        old.send_signal(signal.SIGCONT)
    # the old process notices it was replaced and stops, loudly
    code = wait_for(lambda: old.returncode, 30, "the replaced process to exit")
    assert code == 1, old.tail()
    old.wait_for_line(r"another process took over node name 'n1'", stream="stderr", timeout=5)
    # and the new one consumes every record cast from now on
    asyncio.run(_cast_all(url))

    def handled() -> set[int] | None:
        seen = {int(line.text.split()[-1]) for line in new.lines if line.text.startswith("cast ")}
        return seen if len(seen) >= RECORDS else None

    try:
        wait_for(handled, 60, f"the new n1 to handle all {RECORDS} later records")
    finally:
        seen = {int(line.text.split()[-1]) for line in new.lines if line.text.startswith("cast ")}
        print(f"\ntakeover: the new n1 handled {len(seen)} of {RECORDS} later records")
    assert new.returncode is None, new.tail()
