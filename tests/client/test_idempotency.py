"""Every cast is stored once, even when the medium stored it and its acknowledgement was
lost (nats-py raises a timeout, the backend publishes again): the message id a cast gets
before its first attempt travels with every retry, and JetStream drops the repeat.

The lost acknowledgement is played on a real nats-server: the JetStream context the
backend publishes through stores each publish for real and, once, raises the timeout
nats-py raises when an acknowledgement does not come in time.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

import nats.errors
import pytest

from cloister import Client
from cloister.backends import open_backend
from cloister.backends.nats._log import NatsLog
from cloister.store.inbox import Inbox
from cloister.testing import NatsServer, eventually
from tests._support.nodes import ClusterNodes
from tests._support.timing import NATS
from tests.client.test_client import Ledger


class LosesOneAck:
    """A JetStream context that stores every publish to ``prefix`` but loses the
    acknowledgement of the first one (``publish`` and ``publish_async`` alike, and the
    pipelined appends' acks: see :func:`_lose_one_ack`)."""

    def __init__(self, js: Any, prefix: str) -> None:
        self.js = js
        self.prefix = prefix
        self.lost = 0

    def _lose(self, subject: str) -> bool:
        if self.lost or not subject.startswith(self.prefix):
            return False
        self.lost += 1
        return True

    async def publish(self, subject: str, *args: Any, **kwargs: Any) -> Any:
        ack = await self.js.publish(subject, *args, **kwargs)
        if self._lose(subject):
            raise nats.errors.TimeoutError
        return ack

    async def publish_async(self, subject: str, *args: Any, **kwargs: Any) -> Any:
        future = await self.js.publish_async(subject, *args, **kwargs)
        if not self._lose(subject):
            return future
        await future  # stored...
        lost: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        lost.set_exception(nats.errors.TimeoutError())  # ...and its ack never came
        return lost

    def __getattr__(self, name: str) -> Any:
        return getattr(self.js, name)


def _lose_one_ack(
    log: Any, monkeypatch: pytest.MonkeyPatch, *, pipelined: bool = False
) -> LosesOneAck:
    """Lose one ack of ``log``'s appends; with ``pipelined``, of its ``append_many``
    too, whose frames go below the JetStream context and whose acks come to a
    subscription of the log's own (patched before its first use subscribes it)."""
    assert isinstance(log, NatsLog)
    conn = log._conn
    proxy = LosesOneAck(conn.jetstream("test"), log.prefix)
    monkeypatch.setattr(conn, "jetstream", lambda what: proxy)
    if pipelined:
        framed = log._framed
        assert framed._nc is None, "no pipelined append before the fault is in place"
        real = framed._on_ack

        async def on_ack(msg: Any) -> None:
            if not proxy._lose(log.prefix):  # the record was stored; its ack is lost
                await real(msg)

        monkeypatch.setattr(framed, "_on_ack", on_ack)
    return proxy


async def test_a_put_without_msg_id_retried_after_a_lost_ack_is_stored_once(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = open_backend(nats_server.url, "idem", "producer")
    await backend.connect()
    try:
        inbox = Inbox(backend, "solo", partitions=4)
        await inbox.open()
        proxy = _lose_one_ack(inbox.log, monkeypatch)
        await inbox.put("k1", "once")
        assert proxy.lost == 1  # the fault happened: the backend had to publish again
        assert await inbox.depth() == 1
        # The same fault without a message id stores the record twice: the id is what
        # makes the retry harmless.
        proxy.lost = 0
        assert inbox.log is not None
        await inbox.log.append(0, b"raw", msg_id=None)
        assert proxy.lost == 1
        assert await inbox.depth() == 3
    finally:
        await backend.close()


async def test_manager_and_client_casts_survive_a_lost_ack_stored_once(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with AsyncExitStack() as stack:
        nodes = ClusterNodes(stack, nats_server.url, cluster="idem", timing=NATS)
        manager = await nodes.start_manager("a", Ledger)
        await eventually(lambda: manager.state == "up", 20, "manager up")
        node_proxy = _lose_one_ack(manager.inbox.log, monkeypatch)
        await manager.cast("k1", "from the node")  # no msg_id: one is generated
        assert node_proxy.lost == 1

        client = await stack.enter_async_context(Client("idem", backend=nats_server.url))
        await client.cast(Ledger, "k2", "warm up")  # opens the client's inbox
        client_proxy = _lose_one_ack(client._inboxes["ledger"].log, monkeypatch, pipelined=True)
        await client.cast(Ledger, "k2", "from the client")
        assert client_proxy.lost == 1
        client_proxy.lost = 0
        await client.cast_many(Ledger, [("k3", n) for n in range(5)])  # pipelined
        assert client_proxy.lost == 1

        async def settled() -> bool:
            histories = [await client.call(Ledger, key, "history") for key in ("k1", "k2", "k3")]
            return histories == [
                ["from the node"],
                ["warm up", "from the client"],
                [0, 1, 2, 3, 4],
            ]

        await eventually(settled, 10, "every cast handled once")
        await eventually(lambda: _zero(manager.inbox_depth()), 10, "inbox drained")
        assert await settled()  # a stored duplicate would be handled by now


async def _zero(depth: Any) -> bool:
    return bool(await depth == 0)
