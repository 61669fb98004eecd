"""``NatsBackend``: one node's connection to a cluster over NATS with JetStream.

Subjects and buckets are namespaced by cluster name, so clusters sharing a NATS never
see each other:

- requests to a node: ``cloister.<cluster>.node.<node>`` (request/reply, "no responders"
  when nobody serves the node);
- topics: ``cloister.<cluster>.topic.<topic>`` (core NATS publish/subscribe);
- buckets: ``cloister_<cluster>_<bucket>`` (JetStream KV streams, :mod:`._kv`);
- logs: stream ``cloister_<cluster>_log_<name>`` on ``cloister.<cluster>.log.<name>.<partition>``
  (work-queue streams with one pull consumer per claimed partition, :mod:`._log`).

The connection reconnects forever with a capped exponential backoff and jitter; after a
reconnect every watch ends with :class:`~cloister.errors.BackendUnavailableError` (so
the caller watches again and re-lists) and the ``on_reconnect`` callbacks run.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSub
from nats.js import JetStreamContext

from cloister._tasks import Supervisor
from cloister.backends.base import (
    Backend,
    KeyValue,
    Log,
    MessageHandler,
    RequestHandler,
    Subscription,
)
from cloister.backends.nats._config import NatsOptions, ParsedURL, build_options, parse_url
from cloister.backends.nats._errors import (
    JETSTREAM_NOT_ENABLED_FOR_ACCOUNT,
    JetStreamUnavailableError,
    NatsAuthorizationError,
    check_server_version,
    describe,
    is_auth_failure,
    translate,
)
from cloister.backends.nats._kv import NatsKV, WatchFeed, ensure_stream
from cloister.backends.nats._log import NatsLog, ensure_log_stream
from cloister.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
    NoSuchNodeError,
    RemoteError,
    RequestTimeoutError,
)

log = logging.getLogger("cloister.backends.nats")

#: Reply header carrying the error of a request handler that raised.
ERROR_HEADER = "Cloister-Error"
_CLUSTER = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_BUCKET = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TOKENS = re.compile(r"^[A-Za-z0-9_=-]+(?:\.[A-Za-z0-9_=-]+)*$")
_NATS_ERRORS = (nats.errors.Error, OSError, asyncio.TimeoutError)


def _subject_part(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _TOKENS.match(name):
        raise ConfigurationError(
            f"invalid {kind} {name!r} for NATS: use [A-Za-z0-9_=.-], without a leading, "
            "trailing or doubled '.'"
        )
    return name


async def _close_quietly(nc: NATS, timeout: float = 2.0) -> None:
    """Close a nats-py client, bounded: after a failed TLS handshake its close() hangs."""
    with suppress(*_NATS_ERRORS):
        await asyncio.wait_for(nc.close(), timeout)


class NatsSubscription(Subscription):
    """A topic subscription: one owned task hands messages to the handler in order."""

    def __init__(self, backend: NatsBackend, topic: str, sub: NatsSub, handler: MessageHandler):
        self.topic = topic
        self._backend = backend
        self._sub = sub
        self._handler = handler
        self._task = backend._supervisor.spawn(self._pump(), f"topic {topic}")

    async def _pump(self) -> None:
        async for msg in self._sub.messages:
            try:
                await self._handler(msg.data)
            except Exception:
                log.exception(
                    "subscriber of topic %r on node %s failed", self.topic, self._backend.node
                )

    async def close(self) -> None:
        """Unsubscribe and stop the delivery task (safe twice)."""
        self._backend._subscriptions.discard(self)
        with suppress(*_NATS_ERRORS):
            await self._sub.unsubscribe()
        self._task.cancel()
        with suppress(asyncio.CancelledError):
            await self._task


class NatsBackend(Backend):
    """One node's connection to one cluster on NATS with JetStream (server 2.11+).

    Args:
        url: ``nats://[user:pass@]host[:port][,host[:port]...]`` or ``tls://...``.
        cluster: the cluster name (``[A-Za-z0-9_-]``); namespaces every subject and bucket.
        node: this node's name.
        user, password, token: credentials (they may also come in the URL's userinfo).
        creds: path of a NATS ``.creds`` file (JWT + nkey; needs the ``nkeys`` package).
        tls: an :class:`ssl.SSLContext` (or True); or tls_ca / tls_cert / tls_key paths.
        tls_hostname: the name to verify the server certificate against.
        connect_timeout: seconds per connection attempt (default 2).
        op_timeout: seconds a JetStream operation may take (default 2).
        replicas: replicas of the buckets this backend creates (1; use 3 on 3 servers).
        marker_ttl: seconds an expiry marker stays visible to watchers (default 60).
        watch_heartbeat: idle heartbeat of watch consumers (default 1 s); a watch whose
            heartbeats stop is re-created by nats-py from where it left off.
        reconnect_wait: (first, longest) delay between reconnect attempts (0.05, 1.0).
        name: the client connection name shown by the server (default cloister/<cluster>/<node>).
    """

    def __init__(self, url: str, cluster: str, node: str, **options: Any) -> None:
        if not isinstance(cluster, str) or not _CLUSTER.match(cluster):
            raise ConfigurationError(
                f"invalid cluster name {cluster!r}: use 1-64 characters of [A-Za-z0-9_-]"
            )
        self._parsed: ParsedURL = parse_url(url)
        self.options: NatsOptions = build_options(self._parsed, options)
        self.url = self._parsed.public
        self.cluster = cluster
        self.node = _subject_part("node name", node)
        self._base = f"cloister.{cluster}"
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._supervisor = Supervisor(f"nats-backend {node}")
        self._reconnect_callbacks: list[Callable[[], None]] = []
        self._buckets: dict[str, NatsKV] = {}
        self._logs: dict[str, tuple[NatsLog, float, int]] = {}  # log, dedup window, replicas
        self._watches: set[WatchFeed] = set()
        self._subscriptions: set[NatsSubscription] = set()
        self._serving: tuple[NatsSub, asyncio.Task[None]] | None = None
        self._connect_errors: list[BaseException] | None = None
        self._closed = False
        self.server_version: tuple[int, int, int] | None = None
        self.reconnects = 0

    def __repr__(self) -> str:
        return f"<NatsBackend {self.url} cluster={self.cluster} node={self.node}>"

    # -- lifecycle --------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect, check the server (2.11+, JetStream on); clear errors otherwise."""
        if self._closed:
            raise BackendUnavailableError(f"this backend for {self.url} was closed; open a new one")
        if self._nc is not None:
            return
        nc = NATS()
        errors: list[BaseException] = []
        self._connect_errors = errors
        opts = self.options
        attempts = 2 * len(self._parsed.servers)
        deadline = attempts * (opts.connect_timeout + 0.2) + 1.0
        settings: dict[str, Any] = {
            "servers": list(self._parsed.servers),
            "name": opts.client_name or f"cloister/{self.cluster}/{self.node}",
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
            await _close_quietly(nc, 0.5)
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
            await _close_quietly(nc)
            raise
        self._nc = nc
        self._js = nc.jetstream(timeout=opts.op_timeout)
        log.info(
            "node %s connected to NATS %s (server %s)",
            self.node,
            self._server_netloc(),
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
            for attempt in range(3):  # a freshly formed cluster may drop the first ones
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
        except _NATS_ERRORS as exc:
            raise translate(exc, "check JetStream", self.url) from exc

    async def close(self) -> None:
        """Stop serving and watching, flush what is buffered, close. Safe twice."""
        if self._closed:
            return
        self._closed = True
        gone = BackendUnavailableError(f"the NATS backend of node {self.node} was closed")
        for feed in list(self._watches):
            feed.interrupt(gone)
        self._watches.clear()
        # Unsubscribe first (flushed below): once close() returns, requests to this node
        # fail with "no responders" at once instead of timing out.
        subs = [s._sub for s in self._subscriptions]
        if self._serving is not None:
            subs.append(self._serving[0])
        self._subscriptions.clear()
        self._serving = None
        for sub in subs:
            with suppress(*_NATS_ERRORS):
                await sub.unsubscribe()
        await self._supervisor.close()
        nc, self._nc, self._js = self._nc, None, None
        if nc is None:
            return
        if nc.is_connected:
            with suppress(*_NATS_ERRORS):
                await self._barrier(nc)
        await _close_quietly(nc)
        log.debug("node %s closed its NATS connection", self.node)

    def _client(self, what: str) -> NATS:
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

    def _server_at_least(self, version: tuple[int, int, int]) -> bool:
        """True when the server we are connected to is ``version`` or newer."""
        nc = self._nc
        if nc is None or not nc.is_connected:
            return False
        found = nc.connected_server_version
        return (found.major, found.minor, found.patch) >= version

    def _jetstream(self, what: str) -> JetStreamContext:
        self._client(what)
        assert self._js is not None
        return self._js

    async def _barrier(self, nc: NATS) -> None:
        """Return once the server has processed everything we sent before.

        nats-py's ``flush()`` writes its PING straight to the socket while SUB/UNSUB/PUB
        commands may still wait in its buffer for the flusher task, so one PONG proves
        nothing (a request right after ``serve`` then met "no responders"). The first
        round trip lets the flusher run; the second PING goes out behind everything.
        """
        timeout = max(1, round(self.options.op_timeout))  # nats-py wants whole seconds
        await nc.flush(timeout=timeout)
        await nc.flush(timeout=timeout)

    def _server_netloc(self) -> str:
        url = None if self._nc is None else self._nc.connected_url
        return self.url if url is None else str(url.netloc)

    # -- connection events --------------------------------------------------------------

    def _pick_server(self, servers: list[Any], _info: dict[str, Any]) -> tuple[Any, float]:
        """Reconnect policy: least-tried server first; back off on repeated failures."""
        server = min(servers, key=lambda s: s.reconnects)
        if server.reconnects == 0:
            return server, 0.0
        first, longest = self.options.reconnect_wait
        delay = min(longest, first * 2 ** min(server.reconnects - 1, 30))
        return server, delay * random.uniform(0.5, 1.0)

    async def _on_error(self, exc: Exception) -> None:
        if self._connect_errors is not None:
            self._connect_errors.append(exc)
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
        log.info("node %s reconnected to NATS at %s", self.node, self._server_netloc())
        if self._nc is not None:
            version = self._nc.connected_server_version
            found = (version.major, version.minor, version.patch)
            try:
                check_server_version(found, self._server_netloc())
            except BackendError as exc:
                log.error("node %s: %s", self.node, exc)
        lost = BackendUnavailableError(
            f"the connection to NATS at {self.url} was re-established: watch again"
        )
        for feed in list(self._watches):
            feed.interrupt(lost)
        self._run_reconnect_callbacks()
        if self._buckets or self._logs:
            self._supervisor.spawn(self._restore_buckets(), "restore buckets")

    def _run_reconnect_callbacks(self) -> None:
        for callback in list(self._reconnect_callbacks):
            try:
                callback()
            except Exception:
                log.exception("reconnect callback of node %s failed", self.node)

    async def _on_closed(self) -> None:
        log.debug("node %s: NATS connection closed", self.node)

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        self._reconnect_callbacks.append(callback)

    # -- key-value --------------------------------------------------------------------

    async def kv(self, bucket: str, *, ttl_keys: bool = False) -> KeyValue:
        """Open (creating if needed) ``cloister_<cluster>_<bucket>``.

        Every bucket allows per-key TTL and shows expiries to watchers, so ``ttl_keys``
        changes nothing here.
        """
        if not isinstance(bucket, str) or not _BUCKET.match(bucket):
            raise ConfigurationError(
                f"invalid bucket name {bucket!r} for NATS: use 1-64 characters of [A-Za-z0-9_-]"
            )
        known = self._buckets.get(bucket)
        if known is None:
            full = f"cloister_{self.cluster}_{bucket}"
            await ensure_stream(self, full)
            known = self._buckets[bucket] = NatsKV(self, bucket, full)
        return known

    async def log(
        self,
        name: str,
        *,
        partitions: int,
        dedup_window: float = 120.0,
        replicas: int | None = None,
    ) -> Log:
        """Open (creating if needed) the log ``name``: stream ``cloister_<cluster>_log_<name>``.

        ``replicas`` defaults to the backend's ``replicas`` option; an existing stream keeps
        its replicas and dedup window. The partition count is fixed for the log's lifetime.
        """
        if not isinstance(name, str) or not _BUCKET.match(name):
            raise ConfigurationError(
                f"invalid log name {name!r} for NATS: use 1-64 characters of [A-Za-z0-9_-]"
            )
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            raise ConfigurationError(f"partitions must be a whole number >= 1, got {partitions!r}")
        if isinstance(dedup_window, bool) or not isinstance(dedup_window, int | float):
            raise ConfigurationError(f"dedup_window must be seconds > 0, got {dedup_window!r}")
        if not dedup_window > 0:
            raise ConfigurationError(f"dedup_window must be seconds > 0, got {dedup_window!r}")
        if replicas is None:
            replicas = self.options.replicas
        if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= 5:
            raise ConfigurationError(
                f"replicas must be a whole number from 1 to 5, got {replicas!r}"
            )
        known = self._logs.get(name)
        if known is not None:
            if known[0].partitions != partitions:
                raise ConfigurationError(
                    f"log {name!r} exists with {known[0].partitions} partitions, not "
                    f"{partitions}; the partition count of a log is fixed for its lifetime"
                )
            return known[0]
        stream = f"cloister_{self.cluster}_log_{name}"
        prefix = f"{self._base}.log.{name}"
        await ensure_log_stream(
            self,
            stream,
            f"{prefix}.*",
            partitions=partitions,
            dedup_window=float(dedup_window),
            replicas=replicas,
        )
        opened = NatsLog(self, name, stream, prefix, partitions)
        self._logs[name] = (opened, float(dedup_window), replicas)
        return opened

    async def _restore_buckets(self) -> None:
        """After a reconnect: re-create buckets and logs a restarted (emptied) server lost."""
        restored = []
        for kv in list(self._buckets.values()):
            try:
                created = await ensure_stream(self, kv.bucket)
            except BackendError as exc:
                log.debug("node %s could not check bucket %s: %s", self.node, kv.bucket, exc)
                continue
            if created:
                restored.append(kv.bucket)
        for opened, dedup_window, replicas in list(self._logs.values()):
            try:
                created = await ensure_log_stream(
                    self,
                    opened.stream,
                    f"{opened.prefix}.*",
                    partitions=opened.partitions,
                    dedup_window=dedup_window,
                    replicas=replicas,
                )
            except BackendError as exc:
                log.debug("node %s could not check log %s: %s", self.node, opened.stream, exc)
                continue
            if created:
                restored.append(opened.stream)
        if restored:
            log.warning(
                "node %s re-created stream(s) %s: the server had lost them",
                self.node,
                ", ".join(restored),
            )
            self._run_reconnect_callbacks()  # reconcile again, against the new buckets

    # -- request / reply --------------------------------------------------------------

    def _node_subject(self, node: str) -> str:
        return f"{self._base}.node.{_subject_part('node name', node)}"

    async def serve(self, handler: RequestHandler) -> None:
        nc = self._client("serve")
        previous, self._serving = self._serving, None
        if previous is not None:
            with suppress(*_NATS_ERRORS):
                await previous[0].unsubscribe()
            previous[1].cancel()
        try:
            sub = await nc.subscribe(self._node_subject(self.node))
            await self._barrier(nc)  # the server knows the subscription on return
        except _NATS_ERRORS as exc:
            raise translate(exc, "serve", self.url) from exc
        task = self._supervisor.spawn(self._serve_loop(sub, handler), "serve")
        self._serving = (sub, task)

    async def _serve_loop(self, sub: NatsSub, handler: RequestHandler) -> None:
        messages: AsyncIterator[Msg] = sub.messages
        async for msg in messages:
            if msg.reply:
                self._supervisor.spawn(self._answer(msg, handler), "request")

    async def _answer(self, msg: Msg, handler: RequestHandler) -> None:
        headers: dict[str, str] | None = None
        try:
            reply = await handler(msg.data)
        except Exception as exc:
            log.exception("request handler of node %s failed", self.node)
            reply, headers = b"", {ERROR_HEADER: describe(exc)[:1000]}
        nc = self._nc
        if nc is None or nc.is_closed:
            return
        try:
            await nc.publish(msg.reply, bytes(reply), headers=headers)
        except _NATS_ERRORS as exc:
            log.debug("node %s could not send a reply: %s", self.node, describe(exc))

    async def request(self, node: str, payload: bytes, *, timeout: float) -> bytes:
        nc = self._client(f"request to node {node!r}")
        try:
            reply = await nc.request(self._node_subject(node), bytes(payload), timeout=timeout)
        except nats.errors.NoRespondersError:
            raise NoSuchNodeError(
                f"no responders for node {node!r} in cluster {self.cluster!r}"
            ) from None
        except nats.errors.TimeoutError:
            raise RequestTimeoutError(f"node {node!r} did not answer within {timeout:g}s") from None
        except _NATS_ERRORS as exc:
            raise translate(exc, f"request to node {node!r}", self.url) from exc
        if reply.headers and ERROR_HEADER in reply.headers:
            raise RemoteError(f"node {node} failed: {reply.headers[ERROR_HEADER]}")
        return bytes(reply.data)

    # -- topics -----------------------------------------------------------------------

    def _topic_subject(self, topic: str) -> str:
        return f"{self._base}.topic.{_subject_part('topic', topic)}"

    async def publish(self, topic: str, payload: bytes) -> None:
        nc = self._client(f"publish on topic {topic!r}")
        try:
            await nc.publish(self._topic_subject(topic), bytes(payload))
        except _NATS_ERRORS as exc:
            raise translate(exc, f"publish on topic {topic!r}", self.url) from exc

    async def subscribe(self, topic: str, handler: MessageHandler) -> Subscription:
        nc = self._client(f"subscribe to topic {topic!r}")
        try:
            sub = await nc.subscribe(self._topic_subject(topic))
            await self._barrier(nc)
        except _NATS_ERRORS as exc:
            raise translate(exc, f"subscribe to topic {topic!r}", self.url) from exc
        subscription = NatsSubscription(self, topic, sub, handler)
        self._subscriptions.add(subscription)
        return subscription
