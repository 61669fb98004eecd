"""``cloister dev --metrics-port BASE``: every node serves its metrics, on consecutive ports."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

from cloister.testing import wait_for
from tests.cli.test_dev import Dev, app_folder, dev  # noqa: F401  (fixtures)

# Never go through an HTTP proxy to reach a loopback port.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_run(length: int) -> int:
    """The first of ``length`` consecutive free loopback ports."""
    for base in range(29_000, 60_000, 97):
        sockets = []
        try:
            for port in range(base, base + length):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise AssertionError("no run of free ports")


def _node_of(port: int) -> str | None:
    try:
        with _HTTP.open(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("cloister_epoch{"):
            return line.split('node="', 1)[1].split('"', 1)[0]
    return None


def _started(number: int, port: int) -> str:
    return rf"started node{number} \(pid \d+, metrics on http://127\.0\.0\.1:{port}/metrics\)"


def test_dev_nodes_serve_metrics_on_consecutive_ports(app_folder: Path, dev: list[Dev]) -> None:  # noqa: F811
    base = _free_run(3)
    session = Dev(app_folder, "shopapp:Shop", "--nodes", "2", "--metrics-port", str(base))
    dev.append(session)
    for number in (1, 2):
        session.wait_for(_started(number, base + number - 1))
    session.send("+")
    session.wait_for(_started(3, base + 2))
    for number in (1, 2, 3):
        port = base + number - 1
        assert wait_for(lambda p=port: _node_of(p), 20, f"metrics on {port}") == f"node{number}"
    session.send("q")
    assert session.proc.wait(30) == 0
