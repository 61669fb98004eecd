"""A local NATS cluster (3 servers by default) with JetStream, for tests.

The servers are routed to each other on loopback, each with its own store, log and
monitoring port. Kill and restart single servers through :attr:`NatsCluster.servers` and
find the server that leads a stream (or the JetStream meta group) to kill the right one.
"""

# The async waits take a timeout so that expiry raises our error carrying logs and state
# (asyncio.timeout would only raise a bare TimeoutError).

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from cloister.local._lifecycle import Lifecycle
from cloister.local._wait import poll, poll_async
from cloister.local.errors import ClusterFormationError, HarnessError, ServerStartError
from cloister.local.nats_server import HOST, NatsServer
from cloister.local.ports import free_port

__all__ = ["NatsCluster"]

log = logging.getLogger("cloister.local")

_START_ATTEMPTS = 3
_CLUSTER_POLL = 0.05


class NatsCluster(Lifecycle):
    """``size`` routed ``nats-server`` processes forming one JetStream cluster.

    Servers are named ``n1`` ... ``n<size>`` and share the cluster name ``name``. Once
    :meth:`start` returns, the JetStream meta leader is elected and sees every other
    server as a current peer, so replicated (R3) streams can be created at once.

    Args:
        size: number of servers (3 gives R3 storage).
        name: the NATS cluster name.
        user, password, token: client credentials every server requires.
        base_dir: parent directory of the servers' directories; a temporary one (removed
            by :meth:`stop`) if ``None``.
        binary: the ``nats-server`` to run (see :func:`~cloister.local.find_nats_server`).
        extra_config: raw config lines given to every server.
        start_timeout: seconds :meth:`start` waits for the cluster to form.
        quick_formation: seconds after which a fresh cluster still without a meta
            leader is started afresh (see :meth:`start`).
        die_with_parent: on Linux, have the kernel kill the servers if this process dies.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        name: str = "cloister-test",
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        binary: str | os.PathLike[str] | None = None,
        extra_config: str = "",
        start_timeout: float = 30.0,
        quick_formation: float = 2.5,
        die_with_parent: bool = True,
    ) -> None:
        if size < 1:
            raise HarnessError(f"a cluster needs at least one server, not {size}")
        self.size = size
        self.name = name
        self.start_timeout = start_timeout
        self.quick_formation = quick_formation
        self._server_options: dict[str, Any] = {
            "user": user,
            "password": password,
            "token": token,
            "binary": binary,
            "extra_config": extra_config,
            "die_with_parent": die_with_parent,
            "cluster_name": name,
        }
        self._owns_dir = base_dir is None
        self._base_dir = Path(
            tempfile.mkdtemp(prefix="cloister-nats-cluster-") if base_dir is None else base_dir
        )
        self.servers: list[NatsServer] = []
        self._stopped = False
        self._make_servers()

    # ------------------------------------------------------------------ addresses

    @property
    def urls(self) -> list[str]:
        """Client URLs of all servers, as ``nats.connect(servers=...)`` takes them."""
        return [s.url for s in self.servers]

    @property
    def url(self) -> str:
        """All servers in one URL, ``nats://127.0.0.1:p1,127.0.0.1:p2,...``.

        This is the form cloister backend URLs take. ``nats.connect`` does not split such
        a string: give it :attr:`urls` (or :meth:`connect_kwargs`) instead.
        """
        return "nats://" + ",".join(f"{HOST}:{s.port}" for s in self.servers)

    @property
    def base_dir(self) -> Path:
        """The parent directory of the servers' directories."""
        return self._base_dir

    @property
    def live_servers(self) -> list[NatsServer]:
        """The servers whose process is running."""
        return [s for s in self.servers if s.is_running]

    def server(self, name: str) -> NatsServer:
        """The server whose ``server_name`` is ``name`` (as NATS reports it, e.g. ``n2``).

        Raises:
            KeyError: no server of that name.
        """
        for server in self.servers:
            if server.name == name:
                return server
        raise KeyError(f"no server named {name!r} in cluster {self.name!r}")

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect(**kwargs)``: all servers and credentials."""
        kwargs = self.servers[0].connect_kwargs()
        kwargs["servers"] = self.urls
        return kwargs

    # ------------------------------------------------------------------ lifecycle

    def start(self, *, timeout: float | None = None) -> Self:
        """Start all servers and wait until the cluster has formed (see :meth:`wait_ready`).

        A fresh cluster usually elects its JetStream meta leader in well under a second,
        but now and then the first election is lost and the next one comes only after
        NATS's election timeout (4 to 9 s). So a cluster without a leader after
        :attr:`quick_formation` seconds is killed and started afresh (at most twice),
        as is one whose port was taken by another process meanwhile.

        Raises:
            ServerStartError: a server exited or never became healthy.
            ClusterFormationError: no meta leader with all peers current in time.
        """
        first = time.monotonic()
        deadline = first + (self.start_timeout if timeout is None else timeout)
        for attempt in range(1, _START_ATTEMPTS + 1):
            last = attempt == _START_ATTEMPTS
            began = time.monotonic()
            budget = deadline - began if last else min(deadline - began, self.quick_formation)
            try:
                self._start_once(budget)
            except (ServerStartError, ClusterFormationError) as exc:
                self._kill_all()
                in_use = isinstance(exc, ServerStartError) and exc.address_in_use
                slow = isinstance(exc, ClusterFormationError)
                if last or not (in_use or slow) or time.monotonic() >= deadline:
                    raise
                why = "a port was taken" if in_use else f"no meta leader after {budget:.1f}s"
                log.warning("NATS cluster %s: %s, starting afresh", self.name, why)
                self._make_servers()
                continue
            except BaseException:
                self._kill_all()
                raise
            log.info(
                "NATS cluster %s (%d servers) formed in %.3fs (attempt %d, %.3fs in all)",
                self.name,
                self.size,
                time.monotonic() - began,
                attempt,
                time.monotonic() - first,
            )
            break
        return self

    def wait_ready(self, timeout: float | None = None) -> NatsServer:
        """Block until the cluster has a JetStream meta leader that all servers agree on
        and that sees every other server as a current peer; return the leader.

        Call it after restarting a server to wait until the cluster is whole again.

        Raises:
            ServerStartError: a server is not running (restart it first).
            ClusterFormationError: not formed within ``timeout`` seconds.
        """
        timeout = self.start_timeout if timeout is None else timeout
        leader = poll(self._formed, timeout, _CLUSTER_POLL)
        if leader is None:
            raise self._formation_error(timeout)
        return leader

    async def wait_ready_async(self, timeout: float | None = None) -> NatsServer:
        """Like :meth:`wait_ready`, but awaitable: the event loop keeps running meanwhile."""
        timeout = self.start_timeout if timeout is None else timeout
        leader = await poll_async(self._formed, timeout, _CLUSTER_POLL)
        if leader is None:
            raise self._formation_error(timeout)
        return leader

    def stop(self) -> None:
        """Terminate every server and remove ``base_dir`` if it was temporary. Idempotent."""
        for server in self.servers:
            server.stop()
        if self._owns_dir and not self._stopped:
            shutil.rmtree(self._base_dir, ignore_errors=True)
        self._stopped = True

    def _was_started(self) -> bool:
        return any(s._was_started() for s in self.servers)

    def __repr__(self) -> str:
        return f"<NatsCluster {self.name} {self.url} live={[s.name for s in self.live_servers]}>"

    # ------------------------------------------------------------------ leaders

    def meta_leader(self) -> NatsServer | None:
        """The running server that says it leads the JetStream meta group, if any."""
        for server in self.live_servers:
            meta = _get(server, "jsz").get("meta_cluster") or {}
            if meta.get("leader") == server.name:
                return server
        return None

    def stream_leader(self, stream: str, *, account: str | None = None) -> NatsServer | None:
        """The running server that says it leads ``stream``, or ``None`` (none right now).

        Read from the monitoring endpoint ``/jsz?streams=true&raft=true``. ``account``
        narrows the search (e.g. ``"$G"``, the account of servers without accounts).
        The same is available from a client: ``(await js.stream_info(stream)).cluster.leader``
        names the leader; :meth:`server` turns the name into a :class:`NatsServer`.
        """
        params: dict[str, str | int | bool] = {"streams": True, "consumers": False, "raft": True}
        if account is not None:
            params["acc"] = account
        for server in self.live_servers:
            for acc in _get(server, "jsz", **params).get("account_details") or []:
                if account is not None and acc.get("name") != account:
                    continue
                for detail in acc.get("stream_detail") or []:
                    leader = (detail.get("cluster") or {}).get("leader")
                    if detail.get("name") == stream and leader == server.name:
                        return server
        return None

    def wait_stream_leader(
        self,
        stream: str,
        *,
        timeout: float = 15.0,
        exclude: NatsServer | None = None,
        account: str | None = None,
    ) -> NatsServer:
        """Wait until ``stream`` has a leader (other than ``exclude``) and return it.

        Raises:
            ClusterFormationError: no such leader within ``timeout`` seconds.
        """
        leader = poll(self._stream_leader_check(stream, exclude, account), timeout, _CLUSTER_POLL)
        if leader is None:
            raise ClusterFormationError(f"stream {stream!r} has no leader after {timeout:.1f}s")
        return leader

    async def wait_stream_leader_async(
        self,
        stream: str,
        *,
        timeout: float = 15.0,
        exclude: NatsServer | None = None,
        account: str | None = None,
    ) -> NatsServer:
        """Like :meth:`wait_stream_leader`, but awaitable."""
        check = self._stream_leader_check(stream, exclude, account)
        leader = await poll_async(check, timeout, _CLUSTER_POLL)
        if leader is None:
            raise ClusterFormationError(f"stream {stream!r} has no leader after {timeout:.1f}s")
        return leader

    # ------------------------------------------------------------------ internals

    def _make_servers(self) -> None:
        ports = [(free_port(HOST), free_port(HOST), free_port(HOST)) for _ in range(self.size)]
        routes = [f"nats-route://{HOST}:{cluster}" for _, _, cluster in ports]
        self.servers = []
        for i, (client, monitor, cluster) in enumerate(ports, start=1):
            server_dir = self._base_dir / f"n{i}"
            shutil.rmtree(server_dir, ignore_errors=True)
            self.servers.append(
                NatsServer(
                    name=f"n{i}",
                    port=client,
                    monitor_port=monitor,
                    cluster_port=cluster,
                    routes=routes,
                    base_dir=server_dir,
                    start_timeout=self.start_timeout,
                    **self._server_options,
                )
            )

    def _start_once(self, timeout: float) -> None:
        began = time.monotonic()
        for server in self.servers:
            server.start(wait=False)
        self.wait_ready(timeout)
        for server in self.servers:  # formed: each /healthz is ok at once, or nearly
            server.wait_ready(max(1.0, timeout - (time.monotonic() - began)))

    def _kill_all(self) -> None:
        for server in self.servers:
            server.kill()

    def _formed(self) -> NatsServer | None:
        for server in self.servers:
            server.ensure_running()
        metas = [_get(s, "jsz").get("meta_cluster") or {} for s in self.servers]
        leaders = {m.get("leader") for m in metas}
        if len(leaders) != 1 or not (name := leaders.pop()):
            return None
        try:
            leader = self.server(name)
        except KeyError:
            return None
        peers = metas[self.servers.index(leader)].get("replicas") or []
        current = [p for p in peers if p.get("current") and not p.get("offline")]
        if metas[0].get("cluster_size") != self.size or len(current) != self.size - 1:
            return None
        return leader

    def _stream_leader_check(
        self, stream: str, exclude: NatsServer | None, account: str | None
    ) -> Callable[[], NatsServer | None]:
        def check() -> NatsServer | None:
            leader = self.stream_leader(stream, account=account)
            return None if leader is exclude else leader

        return check

    def _formation_error(self, timeout: float) -> ClusterFormationError:
        parts = [f"NATS cluster {self.name} did not form within {timeout:.1f}s."]
        for server in self.servers:
            meta = _get(server, "jsz").get("meta_cluster") if server.is_running else None
            parts.append(f"{server!r}: meta_cluster={meta}")
            parts.append(f"last lines of {server.log_path}:\n{server.log_tail(10)}")
        return ClusterFormationError("\n".join(parts))


def _get(server: NatsServer, path: str, **params: str | int | bool) -> dict[str, Any]:
    """A monitoring document, or ``{}`` when the server does not answer."""
    try:
        doc = server.monitor(path, **params)
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}
