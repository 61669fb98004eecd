"""The seed's application, as ``cloister run seed_app:SeedApp`` runs it on every node.

A ``DynamicManager`` over ``SEED_KEYS`` keys; a RabbitMQ source on every node feeds the
durable inbox, with default settings: partitioned, each node reading the partition queues
``SEED_QUEUE.<p>`` of the keys it runs (one reader per partition keeps a key's order); each
``handle_cast`` appends the message's sequence number to its key's payload and records
``key seq node start end`` (monotonic clock, shared by the processes of one machine) in
this node's journal, flushed before it returns — so a SIGKILL loses no record of a message
that was handled. Configuration comes from the environment (``SEED_*``).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from cloister import DynamicManager, Replace
from cloister.sources import RabbitMQSource

KEYS = int(os.environ.get("SEED_KEYS", "10000"))
PARTITIONS = int(os.environ.get("SEED_PARTITIONS", "64"))


def route(body: Any, meta: Any) -> tuple[str, int, str]:
    """A broker message -> (key, message, msg_id); msg_id makes redeliveries harmless."""
    return body["key"], int(body["seq"]), f"{body['key']}:{body['seq']}"


class SeedApp(DynamicManager):
    """handle_cast appends each message's sequence number to the key's payload."""

    name = "seed"
    partitions = PARTITIONS  # the source reads as many partition queues

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.source: RabbitMQSource | None = None
        self.journal = open(os.environ["SEED_JOURNAL"], "a", buffering=1)  # noqa: SIM115

    def children_specs(self) -> dict[str, Any]:
        return {f"key-{i}": {"payload": (), "timeout": 0} for i in range(KEYS)}

    async def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        node = self.cluster.node if self.cluster is not None else "-"
        start = time.monotonic()
        await asyncio.sleep(0.001)  # long enough to see two nodes at the same instant
        self.journal.write(f"{id} {message} {node} {start:.6f} {time.monotonic():.6f}\n")
        self.journal.flush()
        return Replace((*payload, message))

    async def handle_state_change(self, state: str) -> None:
        if state == "up" and self.source is None:
            self.source = await RabbitMQSource.start(
                self,
                os.environ.get("SEED_AMQP", "amqp://guest:guest@127.0.0.1:5672/"),
                queue=os.environ["SEED_QUEUE"],
                key=route,
            )
        elif state == "down" and self.source is not None:
            await self.source.stop()
            self.source = None
