"""Requests between nodes: one call, a multicall, a multicast, and answering multicasts.

The handlers themselves and the wire envelope live in :mod:`~cloister.cluster.rpc`; this
room sends through the node's backend and turns every failure into a per-node
:class:`~cloister.cluster.rpc.CallResult`, so one bad node never loses the other replies.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from cloister import schema
from cloister.backends import Backend
from cloister.cluster.info import ClusterInfo
from cloister.cluster.rpc import (
    RESERVED,
    CallResult,
    Handler,
    Handlers,
    decode_reply,
    encode_request,
    failed,
)
from cloister.errors import (
    CloisterError,
    ClusterNotReadyError,
    ConfigurationError,
    RequestTimeoutError,
    WireFormatError,
)

log = logging.getLogger("cloister.cluster")

MULTICAST_TOPIC = "multicast"
"""The topic every node subscribes to for ``multicast``."""


class Requests:
    """Sends this node's requests; ``backend()`` raises when the node is not running."""

    def __init__(
        self,
        node: str,
        handlers: Handlers,
        backend: Callable[[], Backend],
        multicast_timeout: float,
    ) -> None:
        self.node = node
        self.handlers = handlers
        self._backend = backend
        # Multicasts are handled one at a time, in order: one that hangs would stop the rest.
        self._multicast_timeout = multicast_timeout

    async def call_one(self, node: str, handler: str, payload: Any, timeout: float) -> CallResult:
        """``handler`` on ``node`` (in process for this node); never raises but NotRunning."""
        backend = self._backend()
        if node == self.node:
            try:
                async with asyncio.timeout(timeout):
                    return CallResult(node, value=await self.handlers.invoke(handler, payload))
            except TimeoutError:
                return failed(node, ClusterNotReadyError(f"local handler {handler!r} timed out"))
            except Exception as exc:
                return failed(node, exc)
        try:
            reply = await backend.request(
                node,
                encode_request(
                    handler, payload, self.node, timeout=timeout, keyring=self.handlers.keyring
                ),
                timeout=timeout,
            )
        except Exception as exc:
            return failed(node, exc)
        return decode_reply(node, reply, self.handlers.keyring)

    async def multicall(
        self, handler: str, payload: Any, targets: Iterable[str], timeout: float
    ) -> dict[str, CallResult]:
        """``call_one`` on every target at once, by node."""
        results = await asyncio.gather(
            *(self.call_one(node, handler, payload, timeout) for node in targets)
        )
        return {result.node: result for result in results}

    async def multicast(self, handler: str, payload: Any, nodes: Iterable[str] | None) -> None:
        """Publish ``handler(payload)`` to every node (or ``nodes``)."""
        if handler.startswith(RESERVED):
            raise ConfigurationError(
                f"cannot multicast {handler!r}: the library's own handlers are called by "
                "request only (use multicall)"
            )
        backend = self._backend()
        message = {
            "h": handler,
            "p": payload,
            "f": self.node,
            "to": None if nodes is None else list(nodes),
        }
        await backend.publish(
            MULTICAST_TOPIC, schema.encode(schema.MULTICAST, message, self.handlers.keyring)
        )

    async def on_multicast(self, data: bytes) -> None:
        """Answer one multicast addressed to everyone or to this node."""
        try:
            message = schema.decode(schema.MULTICAST, data, self.handlers.keyring)
            name = message.h
            if name.startswith(RESERVED):
                raise WireFormatError(
                    f"multicast: {name[:100]!r} is one of the library's own handlers, "
                    "which are called by request only"
                )
        except WireFormatError as exc:
            self.handlers.malformed("multicast", exc)
            return
        targets = message.to
        if targets is not None and self.node not in targets:
            return
        try:
            await self.handlers.run(name, message.p, self._multicast_timeout)
        except RequestTimeoutError:
            pass  # counted and logged by run()
        except CloisterError as exc:  # a refusal (bad payload, not owner...): no traceback
            self.handlers.refused_multicast(name, exc)
        except Exception:
            self.handlers.errors += 1
            log.exception("multicast handler %r failed on node %s", name, self.node)


def infos(results: dict[str, CallResult]) -> dict[str, ClusterInfo | CloisterError]:
    """``cloister.info`` results as each node's :class:`ClusterInfo`, or its error."""
    states: dict[str, ClusterInfo | CloisterError] = {}
    for node, result in results.items():
        if result.error is not None:
            states[node] = result.error
            continue
        try:
            states[node] = ClusterInfo.from_wire(result.value)
        except WireFormatError as exc:
            states[node] = exc
    return states


class RemoteCalls:
    """The request half of :class:`~cloister.cluster.Cluster`'s API: register handlers,
    call one node, every node, or publish to them all."""

    node: str
    request_timeout: float
    _handlers: Handlers
    _requests: Requests

    def siblings(self, group: str | None = None) -> tuple[str, ...]:
        raise NotImplementedError  # the cluster's members (Cluster.siblings)

    def handle(self, name: str) -> Callable[[Handler], Handler]:
        """Register a handler callable by ``multicall``/``multicast``: ``@cluster.handle("x")``."""

        def register(fn: Handler) -> Handler:
            self.register_handler(name, fn)
            return fn

        return register

    def register_handler(self, name: str, fn: Handler, *, internal: bool = False) -> None:
        """Register ``fn`` as the handler ``name`` on this node.

        Names starting ``cloister.`` are reserved for the library's own components, which
        pass ``internal=True``; :class:`ConfigurationError` for a name taken already.
        """
        self._handlers.register(name, fn, builtin=internal)

    async def call(
        self, node: str, handler: str, payload: Any = None, *, timeout: float | None = None
    ) -> Any:
        """Invoke ``handler`` on one ``node`` and return its result (raises its error)."""
        return (await self._call_one(node, handler, payload, timeout)).unwrap()

    async def multicall(
        self,
        handler: str,
        payload: Any = None,
        *,
        nodes: Iterable[str] | None = None,
        timeout: float | None = None,
    ) -> dict[str, CallResult]:
        """Invoke ``handler`` on every member (or ``nodes``); one result per node.

        Errors (unknown handler, handler failure, timeout, dead node) are per-node results;
        this method itself only raises when the cluster is not running.
        """
        targets = list(self.siblings() if nodes is None else nodes)
        timeout = self.request_timeout if timeout is None else timeout
        return await self._requests.multicall(handler, payload, targets, timeout)

    async def multicast(
        self, handler: str, payload: Any = None, *, nodes: Iterable[str] | None = None
    ) -> None:
        """Invoke ``handler`` on every member (or ``nodes``) without waiting for results."""
        await self._requests.multicast(handler, payload, nodes)

    async def states(
        self, *, timeout: float | None = None
    ) -> dict[str, ClusterInfo | CloisterError]:
        """Every member's :class:`ClusterInfo` (or the error that member produced)."""
        return infos(await self.multicall("cloister.info", timeout=timeout))

    async def _call_one(
        self, node: str, handler: str, payload: Any, timeout: float | None
    ) -> CallResult:
        timeout = self.request_timeout if timeout is None else timeout
        return await self._requests.call_one(node, handler, payload, timeout)
