"""What the hostile tests share: records as a node would write them, with fields changed;
an app run by ``cloister run``; a cast from outside."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from cloister.backends import open_backend
from cloister.store.inbox import Inbox
from cloister.testing import NodeProcess, ProcessGroup, wait_for_event
from tests.cli.support import cli_env


def member(node: str, /, **changes: Any) -> bytes:
    """A member record as node ``node`` writes it, with ``changes`` to its fields (raw
    msgpack: the tests write what the project's own encoder would refuse)."""
    fields: dict[str, Any] = {
        "node": node,
        "inc": 7,
        "weight": 1.0,
        "groups": [],
        "started_at": 1.0,
        "acked": 0,
        "state": "ready",
    }
    fields.update(changes)
    return bytes(msgpack.packb(fields, use_bin_type=True))


def exported(cluster: Any, family: str) -> Callable[[str], float]:
    """The values of ``cloister_<family>_total{kind}`` a node's collector exports now, as a
    function of the kind (what a Prometheus scrape of the node would read)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from cloister.metrics import NodeCollector

    registry = CollectorRegistry()
    registry.register(NodeCollector(cluster))
    text = generate_latest(registry).decode()
    where = f'cluster="{cluster.name}",kind="{{}}",node="{cluster.node}"'

    def value(kind: str) -> float:
        prefix = f"cloister_{family}_total{{{where.format(kind)}}} "
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        assert len(lines) == 1, f"{prefix!r} exported {len(lines)} times"
        return float(lines[0].removeprefix(prefix))

    return value


def run_app(
    group: ProcessGroup,
    directory: Path,
    source: str,
    url: str,
    cluster: str,
    *extra: str,
    name: str = "a",
    env: dict[str, str] | None = None,
) -> NodeProcess:
    """``cloister run app:Shop`` of the app ``source`` (written to ``directory/app.py``),
    as node ``name`` of ``cluster`` on ``url`` (``env``: CLOISTER_* settings); returns once
    its manager is up."""
    (directory / "app.py").write_text(source)
    node = group.spawn_python(
        "-m", "cloister", "run", "app:Shop",
        "--backend", url, "--cluster", cluster, "--name", name,
        "--heartbeat", "0.5", "--failure-timeout", "2", *extra,
        cwd=directory, env=cli_env(env),
    )  # fmt: skip
    wait_for_event(node, r"^manager up ", timeout=30)
    return node


async def cast(url: str, cluster: str, key: str, message: Any, msg_id: str | None = None) -> None:
    """Cast ``message`` to worker ``key`` of manager ``Shop`` through its durable inbox,
    from a connection of our own (as an outside producer would)."""
    backend = open_backend(url, cluster, "caster")
    await backend.connect()
    try:
        inbox = Inbox(backend, "Shop", partitions=128)
        await inbox.open()
        await inbox.put(key, message, msg_id=msg_id, timeout=10)
    finally:
        await backend.close()


def metric(node: NodeProcess, name: str) -> float:
    """The sum of the series ``name`` (every label set) that node serves on the metrics
    port it printed (started with ``--metrics-port 0``)."""
    port = int(wait_for_event(node, r"^metrics port=(\d+)", timeout=5).group(1))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    total = 0.0
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series == name or series.startswith(name + "{"):
            total += float(value)
    return total
