"""A connection that nats-server closes for good under a real ``cloister run`` process:
the process exits non-zero with an error naming the cause and what to do — never a live
process that silently stopped following the cluster."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cloister.testing import NatsServer, ProcessGroup, wait_for
from tests.hostile.support import cast, run_app

# A bug planted in the app (the test's own connection stays intact): a cast "poison"
# sends the server a 10,000-character subject through the node's own connection, as a
# 10,000-character worker id once did; nats-server answers "maximum control line
# exceeded" and nats-py closes the connection for good.
POISONED_APP = """
from cloister import DynamicManager, Replace


class Shop(DynamicManager):
    def children_specs(self):
        return {"c": {"payload": 0}}

    async def handle_cast(self, message, id, payload):
        if message == "poison":
            await self.cluster.backend._nc.publish("x" * 10_000, b"")
        return Replace(payload + 1)
"""


def test_a_connection_closed_by_the_server_stops_the_process_loudly(
    nats_server: NatsServer, node_processes: ProcessGroup, tmp_path: Path
) -> None:
    node = run_app(node_processes, tmp_path, POISONED_APP, nats_server.url, "closed")
    asyncio.run(cast(nats_server.url, "closed", "c", "poison"))
    code = wait_for(lambda: node.returncode, 30, "cloister run to exit")
    assert code == 1, node.tail()
    # the cause, from the server, and what to do, on the last line
    node.wait_for_line(
        r"^cloister run: error: node a lost its connection to nats://\S+ for good "
        r"\(.*maximum control line exceeded.*\) and stopped; start it again",
        stream="stderr",
        timeout=5,
    )
