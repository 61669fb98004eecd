"""Leases through a stream fail-over, with the default heartbeat and failure timeout.

Killing the server that leads the members stream stalls membership writes for 4.5-8 s,
longer than the 3 s failure timeout. A new leader expires the records it does not hear of
within their TTL after taking over, so the renewals that hung on the old one must be given
up and sent again soon — and the sentry lease, in another stream, must not wait for them.
Before that, most runs lost the sentry lease and some expired members (epoch changes).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from cloister import Cluster
from cloister.backends import open_backend
from cloister.backends._names import bucket_stream
from cloister.cluster.probe import Prober
from cloister.testing import NatsCluster


async def test_no_lease_is_lost_when_the_members_stream_leader_dies(
    nats_cluster: NatsCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="cloister.cluster")
    nodes = [
        Cluster("leases", f"n{i}", backend=nats_cluster.url, backend_options={"replicas": 3})
        for i in range(3)
    ]
    try:
        for node in nodes:
            await node.start()
        await asyncio.gather(*(node.wait_ready(30) for node in nodes))
        epoch, sentry = nodes[0].epoch, nodes[0].sentry
        leader = await nats_cluster.wait_stream_leader_async(bucket_stream("leases", "members"))
        leader.kill()
        await asyncio.sleep(12)  # the election, and a failure timeout after it
        assert [node.epoch for node in nodes] == [epoch] * 3, caplog.text
        assert nodes[0].sentry == sentry
        assert "lost its membership" not in caplog.text
        assert "lost the sentry lease" not in caplog.text
        await leader.restart_async()
    finally:
        for node in nodes:
            await node.stop()


async def test_the_clients_of_a_lost_server_are_not_taken_for_crashed(
    nats_cluster: NatsCluster,
) -> None:
    """Kill the server some nodes are connected to: every client is told the cluster lost
    a server (``Backend.server_lost_at``), and a prober running all along reports none of
    the moving nodes unreachable; a node killed later is still found at once."""
    probed = open_backend(nats_cluster.url, "moves", "prober")
    await probed.connect()
    nodes = [open_backend(nats_cluster.url, "moves", f"n{i}") for i in range(6)]
    victim = None

    async def pong(payload: bytes) -> bytes:
        return b"pong"

    try:
        for node in nodes:
            await node.connect()
            await node.serve(pong)
        ours = probed._server_netloc()
        theirs = {node._server_netloc() for node in nodes} - {ours}
        assert theirs, "every node on the prober's server: nothing would move"
        netloc = theirs.pop()
        victim = next(s for s in nats_cluster.live_servers if s.url.endswith(netloc))
        targets = {f"n{i}": 1 for i in range(6)}

        async def ping(node: str, timeout: float) -> object:
            return await probed.request(node, b"", timeout=timeout)

        prober = Prober(ping, lambda: targets, lambda: None, interval=0.02)
        prober.allow_for(probed.reconnect_spread, lambda: probed.server_lost_at)
        assert probed.server_lost_at is None
        victim.kill()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            await prober.probe_once()
            assert prober.unreachable == {}, "a live node taken for crashed"
            await asyncio.sleep(prober.interval)
        assert probed.server_lost_at is not None
        moved = [node for node in nodes if node.reconnects]
        assert moved, "no node was on the killed server"

        await nodes[0].close()  # a crash, long after the loss: confirmed as usual
        await prober.probe_once()
        assert prober.unreachable == {"n0": 1}
    finally:
        for backend in [probed, *nodes]:
            await backend.close()
        if victim is not None:
            await victim.restart_async()
