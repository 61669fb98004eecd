"""pytest fixtures for testing against real NATS servers and real node processes.

Enable them in a ``conftest.py``::

    pytest_plugins = ["cloister.testing.pytest_plugin"]

Fixtures (all function-scoped: every test gets fresh servers and processes):

- ``nats_server``: one started :class:`~cloister.testing.NatsServer` with JetStream.
- ``nats_cluster``: a started 3-server :class:`~cloister.testing.NatsCluster` (R3 capable).
- ``nats_server_factory`` / ``nats_cluster_factory``: call with the constructor's keyword
  arguments (e.g. ``user=..., password=...``) for servers of your own; started, and
  stopped at teardown.
- ``node_processes``: a :class:`~cloister.testing.ProcessGroup`; ``spawn(argv)`` /
  ``spawn_python(*args)`` start children, all killed at teardown.

Server data and logs live under the test's ``tmp_path``, so they stay for inspection
after a failure; the failure report also shows the tail of every server log and process
output the test used. A missing ``nats-server`` skips the test, unless the environment
says ``CI=true``: then it fails.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import pytest

from cloister.local._lifecycle import Lifecycle
from cloister.local.errors import NatsServerNotFoundError
from cloister.local.nats_cluster import NatsCluster
from cloister.local.nats_server import NatsServer, find_nats_server
from cloister.local.processes import NodeProcess, ProcessGroup
from cloister.testing.ci import unavailable

__all__ = [
    "Factory",
    "nats_cluster",
    "nats_cluster_factory",
    "nats_server",
    "nats_server_factory",
    "node_processes",
    "require_nats_server",
]

R = TypeVar("R", bound=Lifecycle)


def require_nats_server() -> Path:
    """Return the ``nats-server`` binary; skip the test without one (fail under ``CI=true``)."""
    try:
        return find_nats_server()
    except NatsServerNotFoundError as exc:
        unavailable(f"a missing nats-server: {exc}")


class Factory(Generic[R]):
    """Makes started resources (servers or clusters) under one directory; stops them all.

    Call it with the resource's constructor arguments; ``base_dir`` defaults to a fresh
    subdirectory of the test's ``tmp_path``.
    """

    def __init__(self, make: Callable[..., R], base_dir: Path, prefix: str) -> None:
        self._make = make
        self.base_dir = base_dir
        self.prefix = prefix
        self.made: list[R] = []

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        """Build a resource with these arguments, start it and return it."""
        kwargs.setdefault("base_dir", self.base_dir / f"{self.prefix}-{len(self.made) + 1}")
        resource = self._make(*args, **kwargs)
        self.made.append(resource)
        return resource.start()

    def stop(self) -> None:
        """Stop every resource made here."""
        for resource in self.made:
            resource.stop()


@pytest.fixture
def nats_server_factory(tmp_path: Path) -> Iterator[Factory[NatsServer]]:
    """A callable starting NATS servers (``NatsServer`` keyword arguments); stopped after."""
    require_nats_server()
    factory = Factory(NatsServer, tmp_path, "nats")
    try:
        yield factory
    finally:
        factory.stop()


@pytest.fixture
def nats_server(nats_server_factory: Factory[NatsServer]) -> NatsServer:
    """A fresh, started ``nats-server`` with JetStream on a free loopback port."""
    return nats_server_factory()


@pytest.fixture
def nats_cluster_factory(tmp_path: Path) -> Iterator[Factory[NatsCluster]]:
    """A callable starting NATS clusters (``NatsCluster`` arguments); stopped after."""
    require_nats_server()
    factory = Factory(NatsCluster, tmp_path, "nats-cluster")
    try:
        yield factory
    finally:
        factory.stop()


@pytest.fixture
def nats_cluster(nats_cluster_factory: Factory[NatsCluster]) -> NatsCluster:
    """A fresh, formed 3-server NATS cluster with JetStream (R3 streams possible)."""
    return nats_cluster_factory(3)


@pytest.fixture
def node_processes(tmp_path: Path) -> Iterator[ProcessGroup]:
    """A :class:`ProcessGroup` for spawning child processes; all are killed at teardown.

    Each child's output is also written to ``tmp_path/nodes/<name>.log``.
    """
    group = ProcessGroup(log_dir=tmp_path / "nodes")
    try:
        yield group
    finally:
        group.stop()


def _diagnostics(value: object) -> list[tuple[str, str]]:
    """Report sections (title, text) with the logs of a fixture value."""
    if isinstance(value, NatsServer):
        return [(f"nats-server {value.name} log ({value.log_path})", value.log_tail())]
    if isinstance(value, NatsCluster):
        return [item for server in value.servers for item in _diagnostics(server)]
    if isinstance(value, ProcessGroup):
        return [item for proc in value.processes for item in _diagnostics(proc)]
    if isinstance(value, NodeProcess):
        return [(f"process {value.name} (pid {value.pid}) output", value.tail())]
    if isinstance(value, Factory):
        return [item for made in value.made for item in _diagnostics(made)]
    return []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach server logs and process output to the report of a failed test."""
    report = yield
    if report.failed:
        seen: set[tuple[str, str]] = set()
        for value in getattr(item, "funcargs", {}).values():
            for section in _diagnostics(value):
                if section not in seen:
                    seen.add(section)
                    report.sections.append(section)
    return report
