"""``cloister run tests.sources._source_app:SourceApp``: the fault app fed by a broker source.

The journaled :class:`~tests.faults.app.FaultApp` (one line per handling, flushed before
the handler returns) with a source started next to the manager, with default settings:
``SOURCE_KIND`` (``rabbitmq``, ``redis`` or ``jetstream``), ``SOURCE_URL`` and
``SOURCE_NAME`` (the queue or stream prefix; for JetStream the stream, read on the
subjects ``SOURCE_SUBJECT.<p>``). Bodies are ``{"key": k, "seq": n}``. Every half
second the node prints ``source counters {json}`` when they changed (what a killed node
received is known too); on a graceful stop the source stops first and the node prints
``source stopped {json}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from typing import Any, Self

from cloister import Cluster
from cloister.sources import (
    JetStreamSource,
    RabbitMQSource,
    RedisStreamsSource,
    Source,
    SourceMessage,
)
from tests.faults.app import FaultApp


def key(body: Any, meta: SourceMessage) -> tuple[Any, Any, str]:
    return body["key"], body["seq"], f"{body['key']}-{body['seq']}"


async def open_source(manager: FaultApp) -> Source:
    """The source the environment names, started on ``manager`` with default settings."""
    kind, url, name = (os.environ[f"SOURCE_{v}"] for v in ("KIND", "URL", "NAME"))
    if kind == "rabbitmq":
        return await RabbitMQSource.start(manager, url, queue=name, key=key)
    if kind == "redis":
        return await RedisStreamsSource.start(manager, url, stream=name, key=key)
    subject = os.environ["SOURCE_SUBJECT"]
    return await JetStreamSource.start(manager, url, stream=name, subject=subject, key=key)


class SourceApp(FaultApp):
    """FaultApp plus a source: started after the manager, stopped before it."""

    source: Source | None = None
    reporting: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, cluster: Cluster | None = None, **options: Any) -> Self:
        manager = await super().start(cluster, **options)
        manager.source = source = await open_source(manager)
        manager.reporting = asyncio.get_running_loop().create_task(report(source))
        return manager

    async def stop(self) -> None:
        if self.reporting is not None:
            self.reporting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reporting
        if self.source is not None:
            await self.source.stop()
            print("source stopped " + json.dumps(self.source.counters), flush=True)
        await super().stop()


async def report(source: Source) -> None:
    """Print the source's counters every half second when they changed."""
    last: dict[str, int] = {}
    while True:
        await asyncio.sleep(0.5)
        if source.counters != last:
            last = dict(source.counters)
            print("source counters " + json.dumps(last), flush=True)
