"""NatsCluster: a real 3-server JetStream cluster, and an R3 stream losing its leader."""

from __future__ import annotations

import asyncio
import logging
import time

import nats
from nats.js.api import StorageType, StreamConfig

from cloister.testing import NatsCluster

log = logging.getLogger("cloister.testing")


async def test_cluster_forms_with_distinct_servers(nats_cluster: NatsCluster) -> None:
    assert [s.name for s in nats_cluster.servers] == ["n1", "n2", "n3"]
    assert len({s.port for s in nats_cluster.servers}) == 3
    assert nats_cluster.url == "nats://" + ",".join(
        f"127.0.0.1:{s.port}" for s in nats_cluster.servers
    )
    assert nats_cluster.meta_leader() in nats_cluster.servers
    for server in nats_cluster.servers:
        varz = server.varz()
        assert varz["cluster"]["name"] == "cloister-test"
        assert varz["server_name"] == server.name

    nc = await nats.connect(**nats_cluster.connect_kwargs())
    try:
        js = nc.jetstream()
        info = await js.add_stream(StreamConfig(name="R3", subjects=["r3.>"], num_replicas=3))
        assert info.config.num_replicas == 3
        info = await js.stream_info("R3")
        assert info.cluster is not None
        leader = nats_cluster.wait_stream_leader("R3", timeout=5)
        assert leader.name == info.cluster.leader
        assert nats_cluster.server(leader.name) is leader
        assert nats_cluster.stream_leader("R3", account="$G") is leader
        assert nats_cluster.stream_leader("NO_SUCH_STREAM") is None
    finally:
        await nc.close()


async def _publish_until_ok(js: nats.js.JetStreamContext, subject: str) -> int:
    """Publish one message, retrying until it is acknowledged; return the failed tries."""
    failures = 0
    while True:
        try:
            await js.publish(subject, b"after", timeout=0.5)
            return failures
        except Exception:
            failures += 1
            await asyncio.sleep(0.1)


async def test_r3_stream_survives_sigkill_of_its_leader(nats_cluster: NatsCluster) -> None:
    nc = await nats.connect(**nats_cluster.connect_kwargs(), max_reconnect_attempts=-1)
    try:
        js = nc.jetstream()
        await js.add_stream(
            StreamConfig(name="FAIL", subjects=["fail.>"], num_replicas=3, storage=StorageType.FILE)
        )
        # A new R3 stream answers only once it has a leader (until then: no responders,
        # nothing stored), which takes a moment on a busy machine.
        old = await nats_cluster.wait_stream_leader_async("FAIL", timeout=10)
        for i in range(20):
            while True:
                try:
                    await js.publish("fail.x", f"m{i}".encode())
                    break
                except nats.js.errors.NoStreamResponseError:
                    await asyncio.sleep(0.1)

        killed_at = time.monotonic()
        old.kill()
        async with asyncio.timeout(20):
            failures = await _publish_until_ok(js, "fail.x")
        put_ok = time.monotonic() - killed_at
        new = await nats_cluster.wait_stream_leader_async("FAIL", exclude=old, timeout=10)
        elected = time.monotonic() - killed_at
        log.info(
            "R3 leader %s SIGKILLed: puts succeed again after %.2fs (%d failed tries), "
            "new leader %s seen after %.2fs",
            old.name,
            put_ok,
            failures,
            new.name,
            elected,
        )
        assert new is not old
        assert (await js.stream_info("FAIL")).state.messages == 21

        began = time.monotonic()
        await old.restart_async(timeout=20)
        await nats_cluster.wait_ready_async(timeout=20)
        log.info("killed server %s back and current in %.2fs", old.name, time.monotonic() - began)
        await js.publish("fail.x", b"whole again")
    finally:
        await nc.close()


def test_cluster_context_manager_cleans_up() -> None:
    from cloister.testing.pytest_plugin import require_nats_server

    require_nats_server()
    began = time.monotonic()
    with NatsCluster(3) as cluster:
        log.info("3-server cluster formed in %.3fs", time.monotonic() - began)
        pids = [s.pid for s in cluster.servers]
        base = cluster.base_dir
    assert all(p is not None for p in pids)
    assert not base.exists()
    assert all(not s.is_running for s in cluster.servers)
