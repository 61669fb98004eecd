"""A control plane that heals, against real ``cloister node`` processes on a real
nats-server: garbage written into the ``members`` and ``control`` buckets by another
client of the account (here the project's own backend, as any NATS client could) kills
no node, and a node started afterwards joins."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack

from cloister.backends import open_backend
from cloister.cluster.control import EPOCH_KEY
from cloister.testing import NatsServer, ProcessGroup
from tests.hostile.support import member, run_app
from tests.nats.support import Nodes, wait_for


async def _attack(url: str, cluster: str) -> None:
    backend = open_backend(url, cluster, "attacker")
    await backend.connect()
    try:
        members = await backend.kv("members", ttl_keys=True)
        await members.put("zero", member("zero", weight=0))
        await members.put("acked", member("acked", acked="x"))
        await members.put("ghost", member("a", inc=99))  # a's name under another key
        await members.put("junk", b"\xc1\xc1\xc1")
        await members.put("zombie", member("zombie"))  # well-formed, without a TTL
        control = await backend.kv("control", ttl_keys=True)
        await control.put(EPOCH_KEY, b"\xc1 not an epoch")
    finally:
        await backend.close()


async def _read(url: str, cluster: str) -> tuple[bool, bool]:
    """(the ghost and the record without TTL are gone, the epoch record decodes again)."""
    backend = open_backend(url, cluster, "reader")
    await backend.connect()
    try:
        members = await backend.kv("members", ttl_keys=True)
        control = await backend.kv("control", ttl_keys=True)
        ghost = await members.get("ghost") or await members.get("zombie")
        entry = await control.get(EPOCH_KEY)
        try:
            readable = entry is not None and isinstance(msgpack.unpackb(entry.value), dict)
        except Exception:
            readable = False
        return ghost is None, readable
    finally:
        await backend.close()


def test_garbage_in_the_control_buckets_kills_no_node_and_a_new_one_joins(
    nats_server: NatsServer, node_processes: ProcessGroup
) -> None:
    nodes = Nodes(node_processes, nats_server.url, "hostile", consensus=2)
    nodes.start("a", "b")
    nodes.wait_ready(("a", "b"))
    asyncio.run(_attack(nats_server.url, "hostile"))

    def healed() -> bool | None:
        ghost_gone, readable = asyncio.run(_read(nats_server.url, "hostile"))
        return True if ghost_gone and readable else None

    wait_for(healed, 30, "the sentry deleted the ghost and zombie, overwrote the garbage epoch")
    nodes.start("c")
    nodes.wait_ready(("a", "b", "c"), timeout=30)
    for name in ("a", "b", "c"):
        assert nodes.procs[name].returncode is None, nodes.procs[name].tail()
    logged = "\n".join(line.text for name in "ab" for line in nodes.procs[name].lines)
    assert "malformed member record" in logged and "ghost member" in logged
    assert "malformed epoch record" in logged


# A bug planted in the members watch of the child process only (the test's own code path
# stays intact): a record under the key "boom" makes the watch raise, as any bug of ours
# in a critical task would.
BUGGY_APP = """
from cloister import DynamicManager, Ok
from cloister.cluster import control

_apply = control.Control.apply_member_event


def _buggy(self, event):
    if event.key == "boom":
        raise RuntimeError("a bug in the members watch, on purpose")
    return _apply(self, event)


control.Control.apply_member_event = _buggy


class Shop(DynamicManager):
    def children_specs(self):
        return {"k": {"timeout": 0.5}}

    def perform(self, id, payload):
        return Ok(None)
"""


async def _boom(url: str, cluster: str) -> None:
    backend = open_backend(url, cluster, "attacker")
    await backend.connect()
    try:
        await (await backend.kv("members", ttl_keys=True)).put("boom", member("boom"))
    finally:
        await backend.close()


def test_a_critical_task_that_dies_makes_cloister_run_exit_non_zero(
    nats_server: NatsServer, node_processes: ProcessGroup, tmp_path: Path
) -> None:
    node = run_app(node_processes, tmp_path, BUGGY_APP, nats_server.url, "buggy")
    asyncio.run(_boom(nats_server.url, "buggy"))
    code = wait_for(lambda: node.returncode, 30, "cloister run to exit")
    assert code == 1, node.tail()
    # loudly: the error says which task died of what, on one line of its own at the end
    node.wait_for_line(
        r"^cloister run: error: node a stopped: its task .*members watch died of RuntimeError",
        stream="stderr",
        timeout=5,
    )
