"""Send to a cluster from outside it: :class:`Client` (asyncio) and :class:`SyncClient`.

A web view, a cron job or a script casts to a key and asks a key without joining the
cluster: no member record, no epoch change, never the sentry::

    client = SyncClient("shop", backend="nats://127.0.0.1:4222")
    client.cast("Processor", "foo_42", {"qty": 1})     # stored in the durable inbox
    client.call("Processor", "foo_42", "balance?")     # answered by the key's owner

    async with Client("shop", backend="nats://127.0.0.1:4222") as client:
        await client.cast(Processor, "foo_42", {"qty": 1})
"""

from __future__ import annotations

from cloister.client.core import CLIENT_PREFIX, Client
from cloister.client.sync import SyncClient
from cloister.client.targets import ManagerRef, ManagerTarget

__all__ = ["CLIENT_PREFIX", "Client", "ManagerRef", "ManagerTarget", "SyncClient"]
