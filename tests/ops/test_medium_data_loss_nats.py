"""A nats-server that comes back with an empty store, under three ``cloister run`` nodes.

The deployment mistake of issue 15: the server runs without a volume and is recreated
(stop it, delete its store, start it on the same port) while a producer casts. The nodes
must say so (an ERROR line, ``cloister_medium_data_loss_total``, ``cloister status``),
publish a new epoch, all be ``ready`` again, and handle new casts — without a restart.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import urllib.request
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from cloister.backends import open_backend
from cloister.store.inbox import Inbox
from cloister.testing import NatsServer, ProcessGroup, eventually, free_port, wait_for_event_async
from tests._support.counter import KEYS, Counter
from tests._support.nodes import ClusterNodes
from tests.cli.support import cli_env, cloister

# Never go through an HTTP proxy to reach a loopback port.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))

PARTITIONS = Counter.partitions
NODES = ("a", "b", "c")
RECOVERY = 10.0
"""Seconds within which the cluster must be whole again (the issue's bound)."""

APP = f"""
from cloister import DynamicManager, Replace


class Tally(DynamicManager):
    partitions = {PARTITIONS}

    def children_specs(self):
        return {{key: {{"payload": 0}} for key in {KEYS!r}}}

    async def handle_cast(self, message, id, payload):
        return Replace(payload + 1)
"""


class Producer(threading.Thread):
    """Casts round the keys into the manager's inbox until stopped, as a client would,
    retrying a put the medium did not acknowledge (it restarts meanwhile)."""

    def __init__(self, url: str) -> None:
        super().__init__(name="producer", daemon=True)
        self.url = url
        self.acked = 0
        self.failed = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        asyncio.run(self._cast())

    async def _cast(self) -> None:
        backend = open_backend(self.url, "shop", "producer")
        await backend.connect()
        try:
            inbox = Inbox(backend, "Tally", partitions=PARTITIONS)
            await inbox.open()
            seq = 0
            while not self.stopping.is_set():
                seq += 1
                try:
                    await inbox.put(KEYS[seq % len(KEYS)], 1, msg_id=f"m{seq}", timeout=2)
                    self.acked += 1
                except Exception:  # the server is away or recreating its streams: again
                    self.failed += 1
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.01)
        finally:
            await backend.close()


def status(server: NatsServer) -> dict[str, Any]:
    result = cloister("status", "--json", "--backend", server.url, "--cluster", "shop")
    assert result.returncode in (0, 1), result.stderr
    if not result.stdout.strip():
        return {"epoch": None, "members": [], "data_loss": None}
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def whole(document: dict[str, Any], above: int) -> bool:
    """Every node ready on the published epoch, which is above ``above``."""
    epoch, members = document["epoch"], document["members"]
    return (
        epoch is not None
        and epoch > above
        and sorted(m["node"] for m in members) == list(NODES)
        and all(m["state"] == "ready" and m["epoch"] == epoch for m in members)
    )


def handled(document: dict[str, Any]) -> int:
    return sum(
        (m.get("manager") or {}).get("counters", {}).get("casts", 0) for m in document["members"]
    )


def scrape(port: int) -> str:
    with _HTTP.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
    return text


def sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} in:\n{metrics}")


async def test_a_wiped_nats_store_is_reported_and_the_cluster_rebuilds_itself(
    nats_server: NatsServer, node_processes: ProcessGroup, tmp_path: Path
) -> None:
    (tmp_path / "tallyapp.py").write_text(APP)
    ports = {name: free_port() for name in NODES}
    nodes = {
        name: node_processes.spawn_python(
            *("-m", "cloister", "run", "tallyapp:Tally", "--backend", nats_server.url),
            *("--cluster", "shop", "--name", name, "--consensus", "3"),
            *("--heartbeat", "0.5", "--failure-timeout", "2", "--metrics-port", str(ports[name])),
            cwd=tmp_path,
            env=cli_env(),
            name=name,
        )
        for name in NODES
    }
    for node in nodes.values():
        await wait_for_event_async(node, r"^manager up workers=\d+ ", timeout=30)
    await eventually(lambda: whole(status(nats_server), 0), timeout=20, what="a whole cluster")
    producer = Producer(nats_server.url)
    producer.start()
    try:
        await eventually(lambda: handled(status(nats_server)) >= 50, timeout=20, what="casts")
        before = status(nats_server)["epoch"]
        marks = {name: node.mark() for name, node in nodes.items()}

        # The store is lost: the server stops, its store is deleted, it starts again.
        nats_server.kill()
        shutil.rmtree(nats_server.store_dir)
        await nats_server.restart_async()

        await eventually(
            lambda: whole(status(nats_server), before),
            timeout=RECOVERY,
            what="a new epoch, every node ready again",
        )
        document = status(nats_server)
        assert document["data_loss"] is not None and document["data_loss"]["epoch"] >= before
        for member in document["members"]:
            assert member["data_losses"] == 1 and member["rebuilding"] is False
        for name, node in nodes.items():
            await node.wait_for_line_async(
                r"ERROR cloister\.cluster: node \w+: the medium .* lost its data",
                since=marks[name],
                stream="stderr",
            )
            assert sample(scrape(ports[name]), "cloister_medium_data_loss_total") == 1.0

        # New casts are handled (the counters restarted with the workers' partitions).
        now = handled(document)
        await eventually(
            lambda: handled(status(nats_server)) >= now + 50, timeout=20, what="new casts handled"
        )
    finally:
        producer.stopping.set()
        producer.join(10)
    for node in nodes.values():
        assert node.is_running, node.tail()


async def test_a_server_restarted_with_its_store_is_no_data_loss(nats_server: NatsServer) -> None:
    """The same outage with the store kept: reconnects and re-listings, never a loss."""
    async with AsyncExitStack() as stack:
        nodes = ClusterNodes(stack, nats_server.url, cluster="kept")
        for name in NODES:
            await nodes.start_manager(name, Counter, consensus=3)
        await eventually(lambda: nodes.agreed(set(NODES)), timeout=20, what="a whole cluster")
        for key in KEYS:
            await nodes.managers["a"].cast(key, 1)
        await eventually(lambda: sum(m.counters.casts for m in nodes.managers.values()) == 16)
        nats_server.kill()
        await nats_server.restart_async()
        await asyncio.sleep(3 * nodes.failure_timeout)  # reconnected, re-listed, renewed
        await eventually(lambda: nodes.agreed(set(NODES)), timeout=20, what="whole again")
        for cluster in nodes.clusters.values():
            assert cluster.counters.medium_data_loss == 0, cluster.node
        assert sum(m.counters.state_lost for m in nodes.managers.values()) == 0
        for key in KEYS:  # the stored payloads survived
            assert await nodes.managers["b"].call(key, None) == 1
