"""Real ``cloister run`` node processes of :mod:`tests.client.app` for the client tests."""

from __future__ import annotations

from pathlib import Path

from cloister.testing import NatsServer, NodeProcess, ProcessGroup, wait_for_event
from tests.cli.support import cli_env

REPO = Path(__file__).resolve().parents[2]
APP = "tests.client.app:Orders"


def spawn_node(group: ProcessGroup, server: NatsServer, cluster: str, name: str) -> NodeProcess:
    """Start node ``name`` running :class:`tests.client.app.Orders` (heartbeat 0.5 s,
    failure timeout 2 s); returns once its manager is up."""
    node = group.spawn_python(
        "-m",
        "cloister",
        "run",
        APP,
        "--backend",
        server.url,
        "--cluster",
        cluster,
        "--name",
        name,
        "--heartbeat",
        "0.5",
        "--failure-timeout",
        "2",
        cwd=REPO,
        env=cli_env(),
        name=name,
    )
    wait_for_event(node, r"^manager up workers=\d+ epoch=\d+", timeout=30)
    return node
