"""Liveness and readiness of one node, served over HTTP: ``/healthz`` and ``/readyz``.

Orchestrators (Kubernetes probes, docker-compose healthchecks) ask two questions:

``/healthz`` — *is this process alive?* (restart it if not)
    The node's event loop answers within ``loop_deadline`` seconds (the HTTP server runs
    in its own thread and asks the loop, so a loop held by a blocking callback fails the
    probe instead of hanging it), the node has not died (its connection closed for good,
    or a task it cannot live without ended) and, once it has started, its medium is
    connected. While it is still starting (connecting to the medium, with backoff up to
    ``--connect-timeout``) it is alive.
``/readyz`` — *should it get traffic, and is a rolling update safe to continue?*
    Alive, state ``ready`` (every member acknowledged the current epoch), not paused (a
    lapsed lease), and every attached manager ``up`` and settled on the node's epoch (its
    partitions claimed and its workers started). A suspended node (short of consensus, or
    its lease lost) is not ready.

Each answers ``200`` or ``503`` with a small JSON body naming every check, so ``curl``
shows why. Any other path is a ``404``, except ``/metrics`` when the endpoint also
serves Prometheus metrics (:mod:`cloister.metrics`). :class:`ProbeServer` is that
endpoint; ``cloister run --metrics-port`` serves all three paths, ``--health-port`` only
the probes (no ``prometheus_client`` needed).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from cloister.cluster.states import State
from cloister.errors import CloisterError

if TYPE_CHECKING:
    from cloister.cluster import Cluster
    from cloister.manager import DynamicManager

__all__ = [
    "Health",
    "HealthReport",
    "PortInUseError",
    "ProbeServer",
    "serve_health",
]

log = logging.getLogger("cloister.health")

LOOP_DEADLINE = 2.0
"""Seconds the event loop has to answer a probe before the node counts as not alive."""

Exposition = Callable[[], tuple[bytes, str]]
"""Renders the metrics page: ``(body, content type)``; called in the server's thread."""


class PortInUseError(CloisterError, OSError):
    """The probe or metrics endpoint could not listen: its port is taken."""


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The answer to one probe: the verdicts and every check behind them."""

    live: bool
    ready: bool
    checks: dict[str, Any] = field(default_factory=dict)

    def body(self, probe: str) -> bytes:
        """The JSON body of ``probe`` (``healthz`` or ``readyz``)."""
        ok = self.live if probe == "healthz" else self.ready
        return json.dumps({"status": "ok" if ok else "fail", **self.checks}).encode()


class Health:
    """Answers liveness and readiness for ``cluster`` and the managers attached to it.

    :meth:`report` is called from another thread (the HTTP server's); it asks the event
    loop the node runs on for a snapshot and waits at most ``loop_deadline`` seconds.
    Create it on that loop (or call :meth:`bind` there).
    """

    def __init__(self, cluster: Cluster, *, loop_deadline: float = LOOP_DEADLINE) -> None:
        self.cluster = cluster
        self.loop_deadline = loop_deadline
        self.managers: list[DynamicManager] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Ask ``loop`` for the snapshots (the loop ``cluster`` runs on)."""
        self._loop = loop

    def attach(self, manager: DynamicManager) -> None:
        """Count ``manager`` in readiness: ready only while it is up and settled."""
        if manager not in self.managers:
            self.managers.append(manager)

    def detach(self, manager: DynamicManager) -> None:
        """Stop counting ``manager`` (it is stopping)."""
        with contextlib.suppress(ValueError):
            self.managers.remove(manager)

    def report(self) -> HealthReport:
        """Both verdicts, from any thread but the loop's own (it would wait for itself)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return HealthReport(False, False, {"loop": "not running"})
        answer: concurrent.futures.Future[HealthReport] = concurrent.futures.Future()

        def on_loop() -> None:
            if answer.set_running_or_notify_cancel():
                try:
                    answer.set_result(self.snapshot())
                except Exception as exc:  # a bug here must fail the probe, loudly
                    answer.set_exception(exc)

        try:
            loop.call_soon_threadsafe(on_loop)
            return answer.result(timeout=self.loop_deadline)
        except concurrent.futures.TimeoutError:
            answer.cancel()
            return HealthReport(
                False,
                False,
                {"loop": f"did not answer within {self.loop_deadline:g}s (held by a callback?)"},
            )
        except RuntimeError:  # the loop closed meanwhile
            return HealthReport(False, False, {"loop": "not running"})

    def snapshot(self) -> HealthReport:
        """Both verdicts, read on the event loop (see the module's docstring)."""
        cluster = self.cluster
        state = cluster.state
        checks: dict[str, Any] = {"loop": "ok", "state": str(state), "epoch": cluster.epoch}
        live = True
        if cluster.crashed:
            live = False
            checks["failure"] = str(cluster.failure)
        if state is State.DOWN:
            checks["medium"] = "starting"
        elif state is State.STOPPED:
            checks["medium"] = "closed"
        else:
            try:
                connected = cluster.backend.connected
            except CloisterError:  # stopped between the state read and this one
                connected = False
            checks["medium"] = "connected" if connected else "disconnected"
            live = live and connected
        ready = live and state is State.READY and not cluster.paused
        if cluster.paused:
            checks["paused"] = True
        managers: dict[str, str] = {}
        for manager in self.managers:
            settled = manager.state == "up" and manager.fence == cluster.epoch
            managers[manager.manager_name] = (
                "settled" if settled else f"{manager.state} (settled on epoch {manager.fence})"
            )
            ready = ready and settled
        if managers:
            checks["managers"] = managers
        return HealthReport(live, ready, checks)


class ProbeServer:
    """An HTTP endpoint in a thread: ``/healthz``, ``/readyz`` and optionally ``/metrics``.

    Args:
        health: answers the probes.
        host: the address to listen on (``0.0.0.0``: every interface, as a container
            needs to be probed and scraped from outside; ``127.0.0.1``: this host only).
        port: the port (0: any free one, see :attr:`port`).
        metrics: renders ``/metrics``; None answers it 404.
        flag: the option that chose the port, named when the port is taken.
    """

    def __init__(
        self,
        health: Health,
        *,
        host: str,
        port: int,
        metrics: Exposition | None = None,
        flag: str = "the port",
    ) -> None:
        self.health = health
        self.host = host
        self.metrics = metrics
        self.flag = flag
        self._requested_port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port it listens on (the one picked, if 0 was asked for)."""
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Listen and serve in a daemon thread.

        Raises:
            PortInUseError: the port is taken; the message names it and what to do.
            OSError: the address cannot be bound for another reason.
        """
        with contextlib.suppress(RuntimeError):  # started on the node's loop: ask that one
            self.health.bind(asyncio.get_running_loop())
        server_class = _IPv6Server if ":" in self.host else ThreadingHTTPServer
        try:
            server = server_class((self.host, self._requested_port), self._handler())
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(
                    errno.EADDRINUSE,
                    f"port {self._requested_port} on {self.host} is already in use (another "
                    f"process, or another node on this host, listens there): choose another "
                    f"{self.flag}, or 0 for any free port",
                ) from None
            raise
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="cloister probes", daemon=True
        )
        self._thread.start()
        paths = "/healthz, /readyz" + (", /metrics" if self.metrics is not None else "")
        log.info("serving %s on http://%s:%d", paths, self.host, self.port)

    async def close(self) -> None:
        """Stop serving (waits for the thread). Safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        thread, self._thread = self._thread, None
        await asyncio.to_thread(_shutdown, server, thread)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "cloister"

            def do_GET(self) -> None:
                self._answer()

            def do_HEAD(self) -> None:
                self._answer()  # the same status and headers; _send writes no body

            def _answer(self) -> None:
                path = self.path.split("?", 1)[0].rstrip("/") or "/"
                if path in ("/healthz", "/readyz"):
                    report = endpoint.health.report()
                    ok = report.live if path == "/healthz" else report.ready
                    self._send(200 if ok else 503, report.body(path[1:]), "application/json")
                elif path == "/metrics" and endpoint.metrics is not None:
                    content, kind = endpoint.metrics()
                    self._send(200, content, kind)
                else:
                    known = "/healthz, /readyz" + (
                        ", /metrics" if endpoint.metrics is not None else ""
                    )
                    self._send(404, f"no such path; try {known}\n".encode(), "text/plain")

            def _send(self, code: int, content: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(content)

            def log_message(self, format: str, *args: Any) -> None:
                # One log stream, one format: requests go through logging, at debug.
                log.debug("%s %s", self.address_string(), format % args)

        return Handler


class _IPv6Server(ThreadingHTTPServer):
    """The endpoint on an IPv6 address (``::`` is every interface, IPv4 ones too)."""

    address_family = socket.AF_INET6


def _shutdown(server: ThreadingHTTPServer, thread: threading.Thread | None) -> None:
    server.shutdown()
    server.server_close()
    if thread is not None:
        thread.join(5.0)


@contextlib.asynccontextmanager
async def serve_health(
    cluster: Cluster, *, port: int, host: str = "0.0.0.0", flag: str = "the port"
) -> AsyncIterator[ProbeServer]:
    """Serve ``/healthz`` and ``/readyz`` for ``cluster`` on ``host:port`` while inside.

    Raises:
        PortInUseError: the port is taken.
    """
    server = ProbeServer(Health(cluster), host=host, port=port, flag=flag)
    server.start()
    try:
        yield server
    finally:
        await server.close()
