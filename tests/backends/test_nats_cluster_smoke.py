"""The cluster core on the NATS backend, in one process: the quick end-to-end check.

(The acceptance tests with real node processes live in ``tests/nats``.)
"""

from __future__ import annotations

import asyncio
import time

from cloister import Cluster, State
from cloister.testing import NatsServer, eventually
from tests._support.timing import NATS_FAILURE_TIMEOUT as FAILURE_TIMEOUT
from tests._support.timing import NATS_HEARTBEAT as HEARTBEAT


def agreed(nodes: list[Cluster]) -> bool:
    """Every node is ready on the same epoch with the same members."""
    first = nodes[0]
    return all(
        node.state is State.READY
        and node.epoch == first.epoch
        and node.siblings() == tuple(sorted(n.node for n in nodes))
        for node in nodes
    )


async def test_three_nodes_assemble_and_survive_a_leave(nats_server: NatsServer) -> None:
    nodes = [
        Cluster(
            "smoke",
            name,
            backend=nats_server.url,
            consensus=2,
            heartbeat=HEARTBEAT,
            failure_timeout=FAILURE_TIMEOUT,
        )
        for name in ("a", "b", "c")
    ]
    try:
        started = time.monotonic()
        await asyncio.gather(*(node.start() for node in nodes))
        await asyncio.gather(*(node.wait_ready(10) for node in nodes))
        await eventually(lambda: agreed(nodes), 10, "three nodes agreeing")
        assembled = time.monotonic() - started
        epoch = nodes[0].epoch
        fingerprints = {node.info.fingerprint for node in nodes}
        assert len(fingerprints) == 1
        assert sum(node.is_sentry for node in nodes) == 1
        replies = await nodes[0].multicall("cloister.ping")
        assert {n: r.value for n, r in replies.items()} == {"a": "pong", "b": "pong", "c": "pong"}

        leaving = nodes.pop(1)
        left_at = time.monotonic()
        await leaving.stop()
        converged = await eventually(
            lambda: agreed(nodes) and nodes[0].epoch > epoch, 5, "the other two agreeing"
        )
        assert converged < FAILURE_TIMEOUT, "a graceful leave must not wait for the TTL"
        assert nodes[0].siblings() == ("a", "c")
        assert sum(node.is_sentry for node in nodes) == 1
        print(
            f"\nNATS smoke: 3 nodes ready in {assembled:.2f}s (epoch {epoch}); "
            f"leave seen by both in {time.monotonic() - left_at:.3f}s"
        )
    finally:
        await asyncio.gather(*(node.stop() for node in nodes))


async def test_a_crashed_node_expires(nats_server: NatsServer) -> None:
    """A node that stops heartbeating (its backend closes without a leave) is removed: at
    once, since requests to it find no responders (long before its record expires)."""
    nodes = [
        Cluster(
            "crash",
            name,
            backend=nats_server.url,
            consensus=1,
            heartbeat=HEARTBEAT,
            failure_timeout=FAILURE_TIMEOUT,
        )
        for name in ("a", "b", "c")
    ]
    victim = nodes[2]
    try:
        await asyncio.gather(*(node.start() for node in nodes))
        await eventually(lambda: agreed(nodes), 10, "three nodes agreeing")
        victim = nodes[2]
        nodes = nodes[:2]
        # Simulate kill -9: stop its tasks and drop the connection, without a leave.
        await victim._supervisor.close()
        assert victim._backend is not None
        await victim._backend.close()
        detected = await eventually(
            lambda: agreed(nodes), FAILURE_TIMEOUT + 3, "the survivors dropping the victim"
        )
        print(f"\nNATS smoke: crash detected by both survivors in {detected:.2f}s")
        assert sum(node.counters.crashes_seen for node in nodes) == 1  # seen, not expired
    finally:
        await asyncio.gather(*(node.stop() for node in [*nodes, victim]))
