"""Members authenticated, against real ``cloister node`` processes on a real nats-server:
nodes started with ``CLOISTER_SECRET`` ignore a well-formed member record and overwrite an
epoch record that another client of the account wrote without the secret, a node with
the secret joins them afterwards, and a node without it refuses to join and exits."""

from __future__ import annotations

import asyncio

from cloister import schema
from cloister.backends import open_backend
from cloister.cluster.control import EPOCH_KEY
from cloister.local import NodeProcess
from cloister.schema import Keyring
from cloister.testing import NatsServer, ProcessGroup, wait_for_event
from tests.cli.support import cli_env
from tests.hostile.support import member
from tests.nats.support import Nodes, wait_for

SECRET = "a secret every node of the cluster has"


def spawn(nodes: Nodes, name: str, secret: str | None) -> NodeProcess:
    """Node ``name`` as a process, with ``CLOISTER_SECRET`` set to ``secret`` (or unset)."""
    env = cli_env(None if secret is None else {schema.SECRET_ENV: secret})
    proc = nodes.group.spawn_python(*nodes.argv(name), name=f"{nodes.cluster}-{name}", env=env)
    nodes.procs[name] = proc
    return proc


async def _forge(url: str, cluster: str) -> None:
    backend = open_backend(url, cluster, "mallory")  # no secret: what an attacker has
    await backend.connect()
    try:
        members = await backend.kv("members", ttl_keys=True)
        await members.create("mallory", member("mallory", ttl=60.0), ttl=60)
        control = await backend.kv("control", ttl_keys=True)
        forged = {"epoch": 1000, "sentry": "mallory", "members": {"mallory": [1.0, [], 7]}}
        await control.put(EPOCH_KEY, schema.encode(schema.EPOCH, forged))
    finally:
        await backend.close()


async def _epoch_sentry(url: str, cluster: str) -> str | None:
    """The sentry named by the epoch record if it authenticates with the secret."""
    backend = open_backend(url, cluster, "reader")
    await backend.connect()
    try:
        entry = await (await backend.kv("control", ttl_keys=True)).get(EPOCH_KEY)
        if entry is None:
            return None
        try:
            return schema.decode(schema.EPOCH, entry.value, Keyring([SECRET])).sentry
        except schema.UnauthenticatedRecordError:
            return None
    finally:
        await backend.close()


def test_sealed_nodes_ignore_forgeries_and_outsiders_cannot_join(
    nats_server: NatsServer, node_processes: ProcessGroup
) -> None:
    nodes = Nodes(node_processes, nats_server.url, "sealed", consensus=2)
    for name in ("a", "b"):
        wait_for_event(spawn(nodes, name, SECRET), r"^node \S+ pid=\d+ started ", timeout=30)
    nodes.wait_ready(("a", "b"))
    asyncio.run(_forge(nats_server.url, "sealed"))

    def repaired() -> bool | None:
        return True if asyncio.run(_epoch_sentry(nats_server.url, "sealed")) in "ab" else None

    wait_for(repaired, 30, "the sentry overwrote the forged epoch record with a sealed one")
    wait_for_event(spawn(nodes, "c", SECRET), r"^node \S+ pid=\d+ started ", timeout=30)
    nodes.wait_ready(("a", "b", "c"), timeout=30)  # mallory is no member

    outsider = spawn(nodes, "d", None)
    assert outsider.wait(timeout=60) != 0, outsider.tail()
    assert "cannot join cluster 'sealed'" in outsider.output, outsider.tail()
    for name in ("a", "b", "c"):
        assert nodes.procs[name].returncode is None, nodes.procs[name].tail()
    logged = "\n".join(line.text for name in "abc" for line in nodes.procs[name].lines)
    assert "rejected an unauthenticated member record" in logged
