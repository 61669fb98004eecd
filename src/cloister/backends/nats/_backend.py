"""``NatsBackend``: one node's connection to a cluster over NATS with JetStream.

Subjects and buckets are namespaced by cluster name, so clusters sharing a NATS never
see each other:

- requests to a node: ``cloister.<cluster>.node.<node>`` (request/reply, "no responders"
  when nobody serves the node);
- topics: ``cloister.<cluster>.topic.<topic>`` (core NATS publish/subscribe);
- buckets: ``cloister_<len>_<cluster>_2_kv_<len>_<bucket>`` (JetStream KV streams,
  :mod:`._kv`);
- logs: stream ``cloister_<len>_<cluster>_3_log_<len>_<name>`` on
  ``cloister.<cluster>.log.<name>.<partition>`` (work-queue streams with one pull consumer
  per claimed partition, :mod:`._log`).

Every one of these names is built by :mod:`cloister.backends._names`, whose encoding is
injective: no two (cluster, bucket) or (cluster, log) pairs share a stream.

The backend composes the layers below it: one :class:`~._connection.NatsConnection`
(the client, reconnects, server checks), the buckets (:mod:`._kv`) and the logs
(:mod:`._log`) on streams opened through :mod:`._streams`. The connection reconnects
forever with a capped exponential backoff and jitter; after a reconnect every watch ends
with :class:`~cloister.errors.BackendUnavailableError` (so the caller watches again and
re-lists) and the ``on_reconnect`` callbacks run. Should nats-py close the connection for
good without our :meth:`NatsBackend.close`, the ``on_closed`` callbacks run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import (
    DEFAULT_SUB_PENDING_BYTES_LIMIT,
    DEFAULT_SUB_PENDING_MSGS_LIMIT,
)
from nats.aio.subscription import Subscription as NatsSub

from cloister._tasks import Supervisor
from cloister.backends import _names
from cloister.backends.base import (
    PENDING_MESSAGES,
    TOPIC_PENDING_BYTES,
    Backend,
    KeyValue,
    Log,
    MessageHandler,
    RequestHandler,
    ServeLimits,
    Subscription,
)
from cloister.backends.nats._bucket import ensure_stream
from cloister.backends.nats._config import NatsOptions, ParsedURL, build_options, parse_url
from cloister.backends.nats._connection import NatsConnection
from cloister.backends.nats._errors import NATS_ERRORS, describe, translate
from cloister.backends.nats._kv import NatsKV, WatchFeed
from cloister.backends.nats._log import PARTITIONS, NatsLog, ensure_log_stream
from cloister.backends.nats._streams import stream_info
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
        with suppress(*NATS_ERRORS):
            await self._sub.unsubscribe()
        self._task.cancel()
        with suppress(asyncio.CancelledError):
            await self._task


ELECTION_SECONDS = 9.0  # an R3 stream-leader election (4.5-8 s measured) + 1 s
# A connection moving to another server after its own died: < 20 ms measured here idle;
# allowed generously for a loaded machine (only after a server was lost: a plain crash
# is confirmed in 0.1 s).
MOVE_SECONDS = 1.0


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
        _names.check_cluster(cluster)
        self._parsed: ParsedURL = parse_url(url)
        self.options: NatsOptions = build_options(self._parsed, options)
        self.url = self._parsed.public
        self.cluster = cluster
        self.node = _names.check_token("node name", node)
        self._conn = NatsConnection(self._parsed, self.options, cluster=cluster, node=self.node)
        self._conn.on_reconnected(self._on_reconnected)
        self._conn.on_closed(self._on_closed)
        self._supervisor = Supervisor(f"nats-backend {node}")
        self._reconnect_callbacks: list[Callable[[], None]] = []
        self._closed_callbacks: list[Callable[[], None]] = []
        self._data_loss_callbacks: list[Callable[[str], None]] = []
        self._buckets: dict[str, NatsKV] = {}
        self._logs: dict[str, tuple[NatsLog, float, int]] = {}  # log, dedup window, replicas
        self._watches: set[WatchFeed] = set()
        self._subscriptions: set[NatsSubscription] = set()
        self._serving: tuple[NatsSub, asyncio.Task[None]] | None = None
        self._requests_running = 0  # handler calls started by the serve loop, not done

    def __repr__(self) -> str:
        return f"<NatsBackend {self.url} cluster={self.cluster} node={self.node}>"

    @property
    def server_version(self) -> tuple[int, int, int] | None:
        """The version of the NATS server we connected to (None before :meth:`connect`)."""
        return self._conn.server_version

    @property
    def failover_time(self) -> float:
        """Replicated streams (``replicas`` > 1) elect a new leader when theirs is lost;
        measured here on 3 servers (nats-server 2.11+): writes fail for 4.5-8 s. So 9 s;
        a single server has nobody to fail over to (0)."""
        return ELECTION_SECONDS if self.options.replicas > 1 else 0.0

    @property
    def reconnect_spread(self) -> tuple[float, float]:
        """A move takes one connect to a server nobody tried (< 20 ms here, idle; more on a
        loaded machine, with the servers electing leaders): allow :data:`MOVE_SECONDS`. A
        return to a restarted server waits the reconnect backoff, up to
        ``reconnect_wait``'s longest delay, plus a move."""
        return MOVE_SECONDS, self.options.reconnect_wait[1] + MOVE_SECONDS

    @property
    def server_lost_at(self) -> float | None:
        """From the INFO the servers send when one of them leaves the cluster."""
        return self._conn.server_lost_at

    @property
    def connected(self) -> bool:
        """True while the client is connected (not reconnecting, not closed)."""
        nc = self._nc
        return nc is not None and nc.is_connected

    @property
    def closed_reason(self) -> str | None:
        """The error nats-py closed the connection for (the server's ``-ERR``, say
        ``maximum control line exceeded``), once it closed it on its own."""
        return self._conn.closed_reason

    @property
    def max_payload(self) -> int | None:
        """The server's ``max_payload`` (from its INFO; headers count towards it)."""
        nc = self._conn.nc
        return None if nc is None else int(nc.max_payload)

    @property
    def reconnects(self) -> int:
        """How many times the connection to NATS came back after a loss."""
        return self._conn.reconnects

    @property
    def _nc(self) -> NATS | None:
        # The nats-py client, for tests that watch the connection itself.
        return self._conn.nc

    def _server_netloc(self) -> str:
        return self._conn.server_netloc()

    # -- lifecycle --------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect, check the server (2.11+, JetStream on); clear errors otherwise."""
        await self._conn.connect()

    async def close(self) -> None:
        """Stop serving and watching, flush what is buffered, close. Safe twice."""
        if not self._conn.mark_closed():
            return
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
            with suppress(*NATS_ERRORS):
                await sub.unsubscribe()
        await self._supervisor.close()
        await self._conn.close()

    # -- connection events --------------------------------------------------------------

    def _on_reconnected(self) -> None:
        """The connection came back: end the watches, reconcile, restore lost streams."""
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

    def _on_closed(self) -> None:
        """nats-py closed the connection for good, not our close(): tell the callbacks."""
        for callback in list(self._closed_callbacks):
            try:
                callback()
            except Exception:
                log.exception("closed callback of node %s failed", self.node)

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (synchronously, cheap) each time the connection comes back."""
        self._reconnect_callbacks.append(callback)

    def on_data_loss(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(why)`` when this node re-creates buckets or logs a restarted
        server lost (after a reconnect; see :meth:`Backend.on_data_loss`)."""
        self._data_loss_callbacks.append(callback)

    def on_closed(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (synchronously, cheap) when the connection to NATS is closed
        for good while this backend was not closed with :meth:`close`.

        nats-py then stopped reconnecting (its ``closed_cb``); the backend is of no more
        use and a new one must be opened. The loss is logged at ERROR level.
        """
        self._closed_callbacks.append(callback)

    # -- key-value --------------------------------------------------------------------

    async def kv(self, bucket: str, *, ttl_keys: bool = False) -> KeyValue:
        """Open (creating if needed) the bucket :func:`~cloister.backends._names.bucket_name`.

        Every bucket allows per-key TTL and shows expiries to watchers, so ``ttl_keys``
        changes nothing here.
        """
        full = _names.bucket_name(self.cluster, bucket)
        known = self._buckets.get(bucket)
        if known is None:
            await ensure_stream(self._conn, full)
            known = self._buckets[bucket] = NatsKV(self._conn, bucket, full, self._watches)
        return known

    async def log(
        self,
        name: str,
        *,
        partitions: int,
        dedup_window: float = 120.0,
        replicas: int | None = None,
    ) -> Log:
        """Open (creating if needed) the log ``name``: stream
        :func:`~cloister.backends._names.log_stream`.

        ``replicas`` defaults to the backend's ``replicas`` option; an existing stream keeps
        its replicas and dedup window. The partition count is fixed for the log's lifetime.
        """
        stream = _names.log_stream(self.cluster, name)
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
        prefix = _names.log_subjects(self.cluster, name)
        await ensure_log_stream(
            self._conn,
            stream,
            f"{prefix}.*",
            partitions=partitions,
            dedup_window=float(dedup_window),
            replicas=replicas,
        )
        opened = NatsLog(self._conn, name, stream, prefix, partitions)
        self._logs[name] = (opened, float(dedup_window), replicas)
        return opened

    async def existing_log(self, name: str) -> Log | None:
        """The stream's metadata holds the partition count (see :mod:`._log`)."""
        known = self._logs.get(name)
        if known is not None:
            return known[0]
        stream = _names.log_stream(self.cluster, name)
        info = await stream_info(self._conn, stream, f"open log {name!r}")
        if info is None:
            return None
        found = (info.config.metadata or {}).get(PARTITIONS, "")
        if not found.isdigit() or int(found) < 1:
            raise BackendError(
                f"stream {stream} has no valid partition count ({PARTITIONS}={found!r}): "
                "it is not a cloister log; remove it (nats stream rm) or use another name"
            )
        return await self.log(
            name,
            partitions=int(found),
            dedup_window=float(info.config.duplicate_window or 120.0),
            replicas=info.config.num_replicas,
        )

    async def _restore_buckets(self) -> None:
        """After a reconnect: re-create buckets and logs a restarted (emptied) server lost."""
        restored = []
        for kv in list(self._buckets.values()):
            try:
                created = await ensure_stream(self._conn, kv.bucket)
            except BackendError as exc:
                log.debug("node %s could not check bucket %s: %s", self.node, kv.bucket, exc)
                continue
            if created:
                restored.append(kv.bucket)
        for opened, dedup_window, replicas in list(self._logs.values()):
            try:
                created = await ensure_log_stream(
                    self._conn,
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
            why = f"re-created stream(s) {', '.join(restored)}: the server had lost them"
            log.warning("node %s %s", self.node, why)
            for callback in list(self._data_loss_callbacks):
                try:
                    callback(why)
                except Exception:
                    log.exception("data-loss callback of node %s failed", self.node)
            self._run_reconnect_callbacks()  # reconcile again, against the new buckets

    # -- request / reply --------------------------------------------------------------

    def _node_subject(self, node: str) -> str:
        return _names.node_subject(self.cluster, node)

    async def serve(self, handler: RequestHandler, limits: ServeLimits | None = None) -> None:
        """Answer requests to this node; within ``limits`` (see :class:`ServeLimits`).

        nats-py queues what arrives for the subscription; with ``limits`` that queue holds
        at most ``max_pending_bytes`` (and :data:`PENDING_MESSAGES` messages), and a
        request it drops is answered ``refuse`` from the connection's error callback, so
        even a flood that outruns the node gets fast "busy" replies, never silence.
        """
        nc = self._conn.client("serve")
        previous, self._serving = self._serving, None
        if previous is not None:
            self._conn.forget_slow_consumer(previous[0])
            with suppress(*NATS_ERRORS):
                await previous[0].unsubscribe()
            previous[1].cancel()
        pending_bytes, pending_msgs = (
            DEFAULT_SUB_PENDING_BYTES_LIMIT,
            DEFAULT_SUB_PENDING_MSGS_LIMIT,
        )
        if limits is not None:
            pending_bytes, pending_msgs = limits.max_pending_bytes, PENDING_MESSAGES
        try:
            sub = await nc.subscribe(
                self._node_subject(self.node),
                pending_bytes_limit=pending_bytes,
                pending_msgs_limit=pending_msgs,
            )
            await self._conn.barrier(nc)  # the server knows the subscription on return
        except NATS_ERRORS as exc:
            raise translate(exc, "serve", self.url) from exc
        if limits is not None:
            self._conn.on_slow_consumer(sub, lambda reply: self._refuse(reply, b"", limits))
        task = self._supervisor.spawn(self._serve_loop(sub, handler, limits), "serve")
        self._serving = (sub, task)

    async def _serve_loop(
        self, sub: NatsSub, handler: RequestHandler, limits: ServeLimits | None
    ) -> None:
        messages: AsyncIterator[Msg] = sub.messages
        refused = 0
        async for msg in messages:
            if not msg.reply:
                continue
            if limits is not None and self._requests_running >= limits.max_concurrent:
                await self._refuse(msg.reply, msg.data, limits)
                refused += 1
                if refused % 64 == 0:
                    # A flood is refused from the queue without an await that suspends:
                    # let the heartbeat and the running requests have the loop now and then.
                    await asyncio.sleep(0)
                continue
            self._requests_running += 1
            task = self._supervisor.spawn(self._answer(msg, handler), "request")
            task.add_done_callback(self._request_done)

    def _request_done(self, _task: asyncio.Task[None]) -> None:
        self._requests_running -= 1

    async def _answer(self, msg: Msg, handler: RequestHandler) -> None:
        headers: dict[str, str] | None = None
        try:
            reply = await handler(msg.data)
        except Exception as exc:
            log.exception("request handler of node %s failed", self.node)
            reply, headers = b"", {ERROR_HEADER: describe(exc)[:1000]}
        nc = self._conn.nc
        if nc is None or nc.is_closed:
            return
        try:
            await nc.publish(msg.reply, bytes(reply), headers=headers)
        except NATS_ERRORS as exc:
            log.debug("node %s could not send a reply: %s", self.node, describe(exc))

    async def _refuse(self, reply: str, request: bytes, limits: ServeLimits) -> None:
        """Answer a request we will not run with the busy reply ``limits.refuse`` builds."""
        nc = self._conn.nc
        if not reply or nc is None or nc.is_closed:
            return
        try:
            await nc.publish(reply, limits.refuse(request))
        except NATS_ERRORS as exc:
            log.debug("node %s could not refuse a request: %s", self.node, describe(exc))

    async def request(self, node: str, payload: bytes, *, timeout: float) -> bytes:
        nc = self._conn.client(f"request to node {node!r}")
        try:
            reply = await nc.request(self._node_subject(node), bytes(payload), timeout=timeout)
        except nats.errors.NoRespondersError:
            raise NoSuchNodeError(
                f"no responders for node {node!r} in cluster {self.cluster!r}"
            ) from None
        except nats.errors.TimeoutError:
            raise RequestTimeoutError(f"node {node!r} did not answer within {timeout:g}s") from None
        except NATS_ERRORS as exc:
            raise translate(exc, f"request to node {node!r}", self.url) from exc
        if reply.headers and ERROR_HEADER in reply.headers:
            raise RemoteError(f"node {node} failed: {reply.headers[ERROR_HEADER]}")
        return bytes(reply.data)

    # -- topics -----------------------------------------------------------------------

    def _topic_subject(self, topic: str) -> str:
        return _names.topic_subject(self.cluster, topic)

    async def publish(self, topic: str, payload: bytes) -> None:
        nc = self._conn.client(f"publish on topic {topic!r}")
        try:
            await nc.publish(self._topic_subject(topic), bytes(payload))
        except NATS_ERRORS as exc:
            raise translate(exc, f"publish on topic {topic!r}", self.url) from exc

    async def subscribe(self, topic: str, handler: MessageHandler) -> Subscription:
        nc = self._conn.client(f"subscribe to topic {topic!r}")
        try:
            sub = await nc.subscribe(
                self._topic_subject(topic),
                pending_bytes_limit=TOPIC_PENDING_BYTES,
                pending_msgs_limit=PENDING_MESSAGES,
            )
            await self._conn.barrier(nc)
        except NATS_ERRORS as exc:
            raise translate(exc, f"subscribe to topic {topic!r}", self.url) from exc
        subscription = NatsSubscription(self, topic, sub, handler)
        self._subscriptions.add(subscription)
        return subscription
