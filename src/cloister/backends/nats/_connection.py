"""``NatsConnection``: the one nats-py client of a backend, and what happens to it.

It owns the client and its JetStream context, connects (and says clearly why it could
not), checks the server (2.11+, JetStream on, again after each reconnect), paces the
reconnects, and tells its listeners when the connection came back or was closed for
good. Everything above it (streams, buckets, logs, the backend) asks it for the client.

The first connection fails fast (each server tried twice); once connected it reconnects
forever with a capped exponential backoff and jitter (:meth:`NatsConnection._pick_server`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription as NatsSub
from nats.js import JetStreamContext

from cloister._backoff import Backoff
from cloister._quiet import Quiet
from cloister.backends.nats._config import NatsOptions, ParsedURL
from cloister.backends.nats._errors import (
    JETSTREAM_NOT_ENABLED_FOR_ACCOUNT,
    NATS_ERRORS,
    JetStreamUnavailableError,
    NatsAuthorizationError,
    check_server_version,
    describe,
    is_auth_failure,
    translate,
)
from cloister.errors import BackendError, BackendUnavailableError

log = logging.getLogger("cloister.backends.nats")

Listener = Callable[[], None]
SlowConsumerListener = Callable[[str], Awaitable[None]]
"""Called with the reply subject ("" for none) of a message nats-py dropped because the
subscription's queue was full."""


class _Client(NATS):
    """nats-py's client, told when the cluster loses a server.

    A server whose routes close (it died, or was stopped) is dropped from the
    ``connect_urls`` of the INFO every other server then sends its clients (6 ms after a
    kill -9, measured here). The clients of the lost server are moving to the others
    meanwhile, and requests to them find no responders for a moment: the crash prober
    must not take them for dead (``Backend.server_lost_at``). nats-py has no callback for
    a server that leaves (only for one discovered), so this hooks where it reads INFO."""

    server_lost_at: float | None = None
    _known_urls: frozenset[str] = frozenset()

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        urls = info.get("connect_urls")
        if isinstance(urls, list):
            now = frozenset(str(url) for url in urls)
            if self._known_urls - now:  # also on a reconnect: its first INFO
                self.server_lost_at = time.monotonic()
            self._known_urls = now
        await super()._process_info(info, initial_connection)


async def close_quietly(nc: NATS, timeout: float = 2.0) -> None:
    """Close a nats-py client, bounded: after a failed TLS handshake its close() hangs."""
    with suppress(*NATS_ERRORS):
        await asyncio.wait_for(nc.close(), timeout)


def _run(listeners: list[Listener], what: str, node: str) -> None:
    for listener in list(listeners):
        try:
            listener()
        except Exception:
            log.exception("%s callback of node %s failed", what, node)


class NatsConnection:
    """One node's nats-py client, its JetStream context and its connection events.

    Args:
        parsed: the servers (and credentials) of the backend's URL.
        options: the backend's options (timeouts, reconnect pacing, auth, TLS).
        cluster, node: who we are (the default client name, log messages).
    """

    def __init__(self, parsed: ParsedURL, options: NatsOptions, *, cluster: str, node: str):
        self.url = parsed.public
        self.options = options
        self.node = node
        self._parsed = parsed
        self._name = options.client_name or f"cloister/{cluster}/{node}"
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._connect_errors: list[BaseException] | None = None
        self._closed = False
        self._closed_reason: str | None = None
        self._reconnect_listeners: list[Listener] = []
        self._closed_listeners: list[Listener] = []
        self._slow_consumers: dict[int, SlowConsumerListener] = {}
        self._drops_log = Quiet()
        #: Messages nats-py dropped because a subscription's queue was full (a flood).
        self.dropped = 0
        first, longest = options.reconnect_wait
        # Jitter keeps half of each delay: nodes that lost the same server spread out.
        self._reconnect_backoff = Backoff(first, longest, jitter=0.5)
        #: The version of the server we connected to first.
        self.server_version: tuple[int, int, int] | None = None
        #: How many times the connection came back.
        self.reconnects = 0

    @property
    def nc(self) -> NATS | None:
        """The client once connected (until :meth:`close`); it may be reconnecting."""
        return self._nc

    @property
    def closed_reason(self) -> str | None:
        """The error nats-py closed the connection for, once it did so on its own."""
        return self._closed_reason

    @property
    def closed(self) -> bool:
        """True once :meth:`mark_closed` (or :meth:`close`) was called."""
        return self._closed

    # -- lifecycle --------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect, check the server (2.11+, JetStream on); clear errors otherwise."""
        if self._closed:
            raise BackendUnavailableError(f"this backend for {self.url} was closed; open a new one")
        if self._nc is not None:
            return
        nc = _Client()
        errors: list[BaseException] = []
        self._connect_errors = errors
        opts = self.options
        attempts = 2 * len(self._parsed.servers)
        deadline = attempts * (opts.connect_timeout + 0.2) + 1.0
        settings: dict[str, Any] = {
            "servers": list(self._parsed.servers),
            "name": self._name,
            "connect_timeout": opts.connect_timeout,
            # The first connection fails fast (each server tried twice); once connected
            # we reconnect forever, paced by _pick_server.
            "allow_reconnect": False,
            "max_reconnect_attempts": 1,
            "reconnect_time_wait": 0.1,
            "reconnect_to_server_handler": self._pick_server,
            "ping_interval": 5,
            "max_outstanding_pings": 3,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "closed_cb": self._on_closed,
            **opts.connect_kwargs(),
        }
        try:
            await asyncio.wait_for(nc.connect(**settings), deadline)
        except BaseException as exc:
            await close_quietly(nc, 0.5)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise self._connect_error(exc, errors) from None
        finally:
            self._connect_errors = None
        nc.options["allow_reconnect"] = True
        nc.options["max_reconnect_attempts"] = -1
        try:
            await self._check_server(nc)
        except BaseException:
            await close_quietly(nc)
            raise
        self._nc = nc
        self._js = nc.jetstream(timeout=opts.op_timeout)
        log.info(
            "node %s connected to NATS %s (server %s)",
            self.node,
            self.server_netloc(),
            ".".join(map(str, self.server_version or ())),
        )

    def _connect_error(self, exc: BaseException, errors: list[BaseException]) -> BackendError:
        seen = [*errors, exc]
        if any(is_auth_failure(e) for e in seen):
            return NatsAuthorizationError(
                f"NATS at {self.url} refused to connect: authorization violation: check "
                "user/password/token/creds"
            )
        tls = next((e for e in seen if isinstance(e, ssl.SSLError)), None)
        if tls is not None:
            return BackendUnavailableError(
                f"TLS with NATS at {self.url} failed ({describe(tls)}): check tls_ca, "
                "tls_cert/tls_key and the server's certificate"
            )
        real = [e for e in seen if not isinstance(e, nats.errors.NoServersError | TimeoutError)]
        cause = describe(real[-1]) if real else "no answer in time"
        return BackendUnavailableError(
            f"cannot connect to NATS at {self.url}: {cause}; is nats-server running there "
            "(and reachable from this machine)?"
        )

    async def _check_server(self, nc: NATS) -> None:
        version = nc.connected_server_version
        self.server_version = (version.major, version.minor, version.patch)
        check_server_version(self.server_version, self.url)
        js = nc.jetstream(timeout=self.options.op_timeout)
        try:
            # A freshly formed cluster may drop the first ones: three tries, no pause
            # (each one already waited op_timeout). Not retry_while_unavailable: that
            # lives in _streams, above this module, and paces by time, not by count.
            for attempt in range(3):
                try:
                    await js.account_info()
                    break
                except nats.errors.TimeoutError:
                    if attempt == 2:
                        raise
        except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError) as exc:
            raise JetStreamUnavailableError(
                f"NATS at {self.url} has no JetStream ({describe(exc)}): start nats-server "
                "with -js (or a jetstream {} block in its config)"
            ) from None
        except nats.js.errors.APIError as exc:
            if exc.err_code == JETSTREAM_NOT_ENABLED_FOR_ACCOUNT:
                raise JetStreamUnavailableError(
                    f"JetStream is not enabled for this account on NATS at {self.url}: enable "
                    "it for the account (jetstream: enabled) in the server config"
                ) from None
            raise translate(exc, "check JetStream", self.url) from exc
        except NATS_ERRORS as exc:
            raise translate(exc, "check JetStream", self.url) from exc

    def mark_closed(self) -> bool:
        """Note that we are closing it (no more reconnect events); False if already noted.

        The owner stops what uses the connection after this, then calls :meth:`close`.
        """
        if self._closed:
            return False
        self._closed = True
        return True

    async def close(self) -> None:
        """Flush what is buffered and close the client (marks closed first). Safe twice."""
        self.mark_closed()
        nc, self._nc, self._js = self._nc, None, None
        if nc is None:
            return
        if nc.is_connected:
            with suppress(*NATS_ERRORS):
                await self.barrier(nc)
        await close_quietly(nc)
        log.debug("node %s closed its NATS connection", self.node)

    # -- access -----------------------------------------------------------------------

    def client(self, what: str) -> NATS:
        """The connected client, or :class:`BackendUnavailableError` naming ``what``."""
        nc = self._nc
        if nc is None or nc.is_closed:
            raise BackendUnavailableError(
                f"{what}: the NATS backend of node {self.node} is not connected"
            )
        if not nc.is_connected:
            raise BackendUnavailableError(
                f"{what}: the connection to NATS at {self.url} is down; reconnecting"
            )
        return nc

    def jetstream(self, what: str) -> JetStreamContext:
        """The JetStream context of the connected client (see :meth:`client`)."""
        self.client(what)
        assert self._js is not None
        return self._js

    def server_at_least(self, version: tuple[int, int, int]) -> bool:
        """True when the server we are connected to is ``version`` or newer."""
        nc = self._nc
        if nc is None or not nc.is_connected:
            return False
        found = nc.connected_server_version
        return (found.major, found.minor, found.patch) >= version

    async def barrier(self, nc: NATS) -> None:
        """Return once the server has processed everything we sent before.

        nats-py's ``flush()`` writes its PING straight to the socket while SUB/UNSUB/PUB
        commands may still wait in its buffer for the flusher task, so one PONG proves
        nothing (a request right after ``serve`` then met "no responders"). The first
        round trip lets the flusher run; the second PING goes out behind everything.
        """
        timeout = max(1, round(self.options.op_timeout))  # nats-py wants whole seconds
        await nc.flush(timeout=timeout)
        await nc.flush(timeout=timeout)

    @property
    def server_lost_at(self) -> float | None:
        """When (``time.monotonic``) a server of the cluster was last lost (see
        :class:`_Client`); None if none was since we connected."""
        nc = self._nc
        return nc.server_lost_at if isinstance(nc, _Client) else None

    def server_netloc(self) -> str:
        """``host:port`` of the server we are connected to (the URL before that)."""
        url = None if self._nc is None else self._nc.connected_url
        return self.url if url is None else str(url.netloc)

    # -- events -----------------------------------------------------------------------

    def on_reconnected(self, listener: Listener) -> None:
        """Call ``listener`` (synchronously) each time the connection comes back."""
        self._reconnect_listeners.append(listener)

    def on_closed(self, listener: Listener) -> None:
        """Call ``listener`` (synchronously) when nats-py closes the connection for good
        while we did not close it ourselves."""
        self._closed_listeners.append(listener)

    def _pick_server(self, servers: list[Any], _info: dict[str, Any]) -> tuple[Any, float]:
        """Reconnect policy: least-tried server first; back off on repeated failures."""
        server = min(servers, key=lambda s: s.reconnects)
        if server.reconnects == 0:
            return server, 0.0
        return server, self._reconnect_backoff.delay(server.reconnects - 1)

    def on_slow_consumer(self, sub: NatsSub, listener: SlowConsumerListener) -> None:
        """Call ``listener`` for each message nats-py drops from ``sub``'s full queue."""
        self._slow_consumers[sub._id] = listener

    def forget_slow_consumer(self, sub: NatsSub) -> None:
        """Stop calling the listener :meth:`on_slow_consumer` registered for ``sub``."""
        self._slow_consumers.pop(sub._id, None)

    async def _on_slow_consumer(self, exc: nats.errors.SlowConsumerError) -> None:
        # Counted each time, logged once a minute: a flood must not flood the log too.
        self.dropped += 1
        if self._drops_log.due():
            log.warning(
                "node %s: messages on %s arrive faster than it handles them; past its "
                "queue bound they are dropped (%d so far; logged once a minute)",
                self.node,
                exc.subject[:200],
                self.dropped,
            )
        listener = self._slow_consumers.get(exc.sid)
        if listener is not None:
            await listener(exc.reply or "")

    async def _on_error(self, exc: Exception) -> None:
        if self._connect_errors is not None:
            self._connect_errors.append(exc)
            return
        if isinstance(exc, nats.errors.SlowConsumerError):
            await self._on_slow_consumer(exc)
            return
        if isinstance(exc, OSError | nats.errors.StaleConnectionError | nats.errors.NoServersError):
            log.debug("node %s: NATS connection error: %s", self.node, describe(exc))
        elif is_auth_failure(exc):
            log.error("node %s: NATS refused our credentials on reconnect: %s", self.node, exc)
        else:
            log.warning("node %s: NATS error: %s", self.node, describe(exc))

    async def _on_disconnected(self) -> None:
        if self._nc is not None and not self._closed:
            log.warning("node %s lost its connection to NATS at %s", self.node, self.url)

    async def _on_reconnected(self) -> None:
        if self._closed:
            return
        self.reconnects += 1
        log.info("node %s reconnected to NATS at %s", self.node, self.server_netloc())
        if self._nc is not None:
            version = self._nc.connected_server_version
            found = (version.major, version.minor, version.patch)
            try:
                check_server_version(found, self.server_netloc())
            except BackendError as exc:
                log.error("node %s: %s", self.node, exc)
        _run(self._reconnect_listeners, "reconnect", self.node)

    async def _on_closed(self) -> None:
        # Our own close() (and a failed connect) closes a client that is not, or no
        # longer, self._nc: nothing to report.
        if self._closed or self._nc is None:
            log.debug("node %s: NATS connection closed", self.node)
            return
        error = self._nc.last_error
        self._closed_reason = "no error given" if error is None else describe(error)
        log.error(
            "node %s: the connection to NATS at %s was closed for good (not by us: %s); "
            "nothing will reconnect it: close this backend and open a new one",
            self.node,
            self.url,
            self._closed_reason,
        )
        _run(self._closed_listeners, "closed", self.node)
