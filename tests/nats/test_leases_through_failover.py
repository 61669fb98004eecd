"""Leases through a stream fail-over, with the default heartbeat and failure timeout.

Killing the server that leads the members stream stalls membership writes for 4.5-8 s,
longer than the 3 s failure timeout. A new leader expires the records it does not hear of
within their TTL after taking over, so the renewals that hung on the old one must be given
up and sent again soon — and the sentry lease, in another stream, must not wait for them.
Before that, most runs lost the sentry lease and some expired members (epoch changes).
"""

from __future__ import annotations

import asyncio

import pytest

from cloister import Cluster
from cloister.backends._names import bucket_stream
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
