"""``cloister dev APP`` as a user runs it: its own nats-server, node processes, stdin."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from cloister.testing.pytest_plugin import require_nats_server
from tests.cli.support import cli_env, write_app

psutil = pytest.importorskip("psutil")

EVENT = r"\S+ INFO cloister\.events: "
"""How a node's event record starts (its log's text format), shown by dev after the prefix."""


class Dev:
    """A ``cloister dev`` child: its output read line by line, its stdin open for commands."""

    def __init__(self, folder: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cloister", "dev", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=cli_env(),
            cwd=folder,
        )
        self.lines: list[str] = []
        self.seen: set[int] = set()  # every descendant pid ever observed
        self._cond = threading.Condition()
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, pipe: IO[bytes]) -> None:
        for raw in iter(pipe.readline, b""):
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = 0
        with self._cond:
            while True:
                for line in self.lines[index:]:
                    if found := regex.search(line):
                        return found
                index = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    tail = "\n".join(self.lines[-40:])
                    raise AssertionError(f"no line matching {pattern!r}; last lines:\n{tail}")
                self._cond.wait(min(remaining, 0.2))

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{command}\n".encode())
        self.proc.stdin.flush()

    def descendants(self) -> list[psutil.Process]:
        """The processes below ``cloister dev`` now (nats-server and node processes)."""
        children: list[psutil.Process] = psutil.Process(self.proc.pid).children(recursive=True)
        self.seen.update(child.pid for child in children)
        return children

    def survivors(self, timeout: float = 5.0) -> list[str]:
        """Every descendant ever seen that is still alive ``timeout`` seconds from now."""
        procs = []
        for pid in self.seen:
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        return [
            f"{p.pid} {' '.join(p.cmdline())}"
            for p in alive
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        ]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.seen:  # never leave anything behind, even when the test failed
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                continue


@pytest.fixture
def app_folder(tmp_path: Path) -> Path:
    require_nats_server()
    write_app(tmp_path)
    return tmp_path


@pytest.fixture
def dev(app_folder: Path) -> Iterator[list[Dev]]:
    started: list[Dev] = []
    yield started
    for session in started:
        session.kill()


def _kinds(processes: list[psutil.Process]) -> list[str]:
    names = []
    for proc in processes:
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        names.append("nats-server" if "nats-server" in cmdline else "node")
    return sorted(names)


def test_dev_starts_adds_a_node_and_quits_cleanly(app_folder: Path, dev: list[Dev]) -> None:
    session = Dev(app_folder, "shopapp:Shop", "--nodes", "2", "--cluster", "devtest")
    dev.append(session)
    session.wait_for(r"^\s*dev \| nats-server on nats://127\.0\.0\.1:\d+ ")
    for node in ("node1", "node2"):
        session.wait_for(rf"^\s*{node} \| {EVENT}state \S+ -> ready epoch=\d+ members=node1,node2 ")
    assert _kinds(session.descendants()) == ["nats-server", "node", "node"]

    session.send("+")
    session.wait_for(r"^\s*dev \| started node3 \(pid \d+\)")
    session.wait_for(rf"^\s*node3 \| {EVENT}manager up workers=\d+ epoch=\d+ ")
    session.wait_for(rf"^\s*node1 \| {EVENT}state \S+ -> ready epoch=\d+ members=node1,node2,node3")
    assert _kinds(session.descendants()) == ["nats-server", "node", "node", "node"]

    session.send("k 2")
    session.wait_for(r"^\s*dev \| node2 killed by SIGKILL")
    session.send("q")
    assert session.proc.wait(30) == 0
    session.wait_for(r"^\s*dev \| nats-server stopped")
    for node in ("node1", "node3"):  # they left gracefully
        session.wait_for(rf"^\s*{node} \| {EVENT}node {node} pid=\d+ stopped ")
        session.wait_for(rf"^\s*dev \| {node} exited with code 0")
    assert session.survivors() == []


def test_dev_stops_everything_on_sigint(app_folder: Path, dev: list[Dev]) -> None:
    session = Dev(app_folder, "shopapp:Shop", "--nodes", "1", "--cluster", "devint")
    dev.append(session)
    session.wait_for(rf"^\s*node1 \| {EVENT}manager up workers=8 epoch=1 ")
    assert _kinds(session.descendants()) == ["nats-server", "node"]
    session.proc.send_signal(signal.SIGINT)
    assert session.proc.wait(30) == 0
    session.wait_for(rf"^\s*node1 \| {EVENT}node node1 pid=\d+ stopped ")
    session.wait_for(r"^\s*dev \| nats-server stopped")
    assert session.survivors() == []
