"""Named handlers and the request envelope behind ``multicall`` / ``multicast``.

Only handlers registered by name (``cluster.handle("name")(fn)``) can be invoked from
another node — never arbitrary code. Requests and replies are msgpack maps:

- request: ``{"h": handler name, "p": payload, "f": sender, "t": seconds the caller waits}``
- reply: ``{"r": result}`` or ``{"e": error kind, "m": message}``, the kind one of a
  closed list (``unknown_handler``, ``bad_request``, ``handler_failed``, ``not_owner``,
  ``fenced``, ``unknown_worker``, ``busy``, ``timeout``)

A failing or unknown handler becomes an error *reply*; the caller turns it into a
:class:`CallResult` with ``error`` set, so one bad node never loses the other replies.

A node runs at most ``max_concurrent_requests`` handlers at once; the backend answers
what comes beyond that with :meth:`Handlers.refuse` (``busy``, raised as
:class:`~cloister.errors.NodeBusyError` by the caller) without running it. A handler
runs no longer than its caller waits (``"t"``, capped at :data:`MAX_HANDLER_SECONDS`):
past that nobody reads its reply, and it would hold a slot for nothing.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cloister import schema
from cloister._quiet import QuietByKind
from cloister.cluster.control import ClusterCounters
from cloister.errors import (
    CloisterError,
    ConfigurationError,
    FencedError,
    NodeBusyError,
    NotOwnerError,
    RemoteError,
    RequestTimeoutError,
    UnknownHandlerError,
    UnknownWorkerError,
    WireFormatError,
)
from cloister.schema import UNSIGNED, Keyring

log = logging.getLogger("cloister.cluster.rpc")

Handler = Callable[[Any], Any]
"""A handler takes the decoded payload and returns a msgpack-able result (may be async)."""

# The error kinds a reply may carry: a closed list, so a reply can never make the caller
# build an arbitrary exception. Anything else a handler raises is ``handler_failed``.
_ERRORS: dict[str, type[CloisterError]] = {
    "unknown_handler": UnknownHandlerError,
    "bad_request": WireFormatError,
    "handler_failed": RemoteError,
    "not_owner": NotOwnerError,
    "fenced": FencedError,
    "unknown_worker": UnknownWorkerError,
    "busy": NodeBusyError,
    "timeout": RequestTimeoutError,
}
_KIND_OF: dict[type[CloisterError], str] = {
    NotOwnerError: "not_owner",
    FencedError: "fenced",
    UnknownWorkerError: "unknown_worker",
}

RESERVED = "cloister."
"""The prefix of the library's own handler names (registered with ``builtin=True``)."""

MAX_HANDLER_SECONDS = 60.0
"""The longest a handler runs for one request, whatever the caller says it waits."""

GRACE_SECONDS = 1.0
"""How much longer than its caller waits a handler may run (its reply still in flight)."""


@dataclass(frozen=True, slots=True)
class CallResult:
    """One node's answer to a multicall: a value, or the error that node produced."""

    node: str
    value: Any = None
    error: CloisterError | None = None

    @property
    def ok(self) -> bool:
        """True when the node answered without error."""
        return self.error is None

    def unwrap(self) -> Any:
        """The value, or raise the node's error."""
        if self.error is not None:
            raise self.error
        return self.value


class Handlers:
    """The registry of named handlers on one node, and the request dispatcher."""

    def __init__(
        self,
        node: str,
        keyring: Keyring = UNSIGNED,
        *,
        max_concurrent: int = 256,
        default_timeout: float = 5.0,
        counters: ClusterCounters | None = None,
    ) -> None:
        self.node = node
        self.keyring = keyring
        self.counters = ClusterCounters() if counters is None else counters
        self.max_concurrent = max_concurrent
        self.default_timeout = default_timeout
        self._quiet = QuietByKind()  # a warning of each kind once a minute at most
        self._busy_reply = encode_reply(
            {
                "e": "busy",
                "m": f"node {node} is busy: it runs {max_concurrent} requests at once "
                "(max_concurrent_requests) and refused this one; retry after a pause",
            },
            keyring,
        )
        self._handlers: dict[str, Handler] = {}
        self._exempt: set[str] = set()

    @property
    def errors(self) -> int:
        """Requests and multicasts that could not be decoded, or whose handler failed
        (``counters.request_errors``)."""
        return self.counters.request_errors

    @errors.setter
    def errors(self, value: int) -> None:
        self.counters.request_errors = value

    def register(
        self, name: str, fn: Handler, *, builtin: bool = False, exempt: bool = False
    ) -> None:
        """Register ``fn`` under ``name``; names starting ``cloister.`` are reserved.

        ``exempt`` (built-in, synchronous and cheap handlers only: ping, info) is answered
        even when the node is busy, so a flooded node still says it is alive.
        """
        if not isinstance(name, str) or not name:
            raise ConfigurationError("a handler name must be a non-empty string")
        if name.startswith(RESERVED) and not builtin:
            raise ConfigurationError(f"handler name {name!r}: the 'cloister.' prefix is reserved")
        if name in self._handlers:
            raise ConfigurationError(f"a handler named {name!r} is already registered")
        if exempt:
            if not builtin or inspect.iscoroutinefunction(fn):
                raise ConfigurationError(
                    f"handler {name!r}: only synchronous built-in handlers can be exempt"
                )
            self._exempt.add(name)
        self._handlers[name] = fn

    async def invoke(self, name: str, payload: Any) -> Any:
        """Run the handler ``name`` locally."""
        fn = self._handlers.get(name)
        if fn is None:
            raise UnknownHandlerError(
                f"node {self.node} has no handler named {name!r}; register it on every node "
                f"with cluster.handle({name!r})"
            )
        result = fn(payload)
        if inspect.isawaitable(result):
            result = await result
        return result

    def refuse(self, request: bytes) -> bytes:
        """The reply to a request the node has no room for: an exempt handler's answer
        (ping, info), else ``busy`` (counted; logged once a minute, as a flood must not
        flood the log). Cheap and synchronous: it runs for every refusal."""
        if self._exempt and request:
            answer = self._answer_exempt(request)
            if answer is not None:
                return answer
        self.counters.requests_refused += 1
        if self._quiet.due("busy"):
            log.warning(
                "node %s is busy: %d requests running, refusing more (%d refused so far; "
                "logged once a minute)",
                self.node,
                self.max_concurrent,
                self.counters.requests_refused,
            )
        return self._busy_reply

    def _answer_exempt(self, request: bytes) -> bytes | None:
        try:
            message = decode_request(request, self.keyring)
        except WireFormatError:
            return None  # refused as busy: decoding it is all the work it gets
        name = message.h
        if name not in self._exempt:
            return None
        try:
            return encode_reply({"r": self._handlers[name](message.p)}, self.keyring)
        except Exception as exc:
            return self._failed(name, exc)

    def malformed(self, what: str, exc: WireFormatError) -> None:
        """Count a request or multicast that could not be decoded; log once a minute."""
        self.errors += 1
        if self._quiet.due(f"malformed {what}"):
            log.warning(
                "node %s rejected a malformed %s (%d errors so far; logged once a minute): %s",
                self.node,
                what,
                self.errors,
                exc,
            )

    def refused_multicast(self, name: str, exc: CloisterError) -> None:
        """Count a multicast its handler refused (a payload it could not take, say);
        log it once a minute per handler, without a traceback: senders repeat."""
        self.errors += 1
        if self._quiet.due(f"multicast {name}"):
            log.warning(
                "multicast handler %r on node %s refused a message (%d errors so far; logged "
                "once a minute): %s",
                name[:100],
                self.node,
                self.errors,
                exc,
            )

    def _failed(self, name: str, exc: Exception) -> bytes:
        """The reply to a handler that raised something unexpected (counted, logged)."""
        self.errors += 1
        log.exception("handler %r failed on node %s", name, self.node)
        return self._error_reply("handler_failed", name, exc)

    def _error_reply(self, kind: str, name: str, exc: Exception) -> bytes:
        return encode_reply(
            {"e": kind, "m": f"handler {name!r} on node {self.node} raised {exc!r}"}, self.keyring
        )

    def _deadline(self, message: schema.RequestWire) -> float:
        """Seconds the handler of ``message`` may run: what its caller waits, bounded."""
        waits = message.t
        if waits is None or not waits > 0:
            waits = self.default_timeout  # an old or foreign caller: our own default
        if math.isnan(waits):
            waits = self.default_timeout
        return min(float(waits) + GRACE_SECONDS, MAX_HANDLER_SECONDS)

    async def run(self, name: str, payload: Any, deadline: float) -> Any:
        """``invoke``, abandoned (cancelled) past ``deadline`` seconds: then counted,
        logged and :class:`RequestTimeoutError`."""
        scope = asyncio.timeout(deadline)
        try:
            async with scope:
                return await self.invoke(name, payload)
        except TimeoutError:
            if not scope.expired():
                raise  # the handler's own
        self.errors += 1
        log.warning(
            "handler %r on node %s ran past %gs (what its caller waits); abandoned",
            name,
            self.node,
            deadline,
        )
        raise RequestTimeoutError(
            f"handler {name!r} on node {self.node} ran past {deadline:g}s and was abandoned"
        )

    async def answer(self, request: bytes) -> bytes:
        """Decode a request, run its handler, encode the reply. Never raises."""
        try:
            message = decode_request(request, self.keyring)
            name = message.h
        except WireFormatError as exc:
            self.malformed("request", exc)
            return encode_reply({"e": "bad_request", "m": str(exc)}, self.keyring)
        try:
            result = await self.run(name, message.p, self._deadline(message))
            return encode_reply({"r": result}, self.keyring)
        except RequestTimeoutError as exc:  # ours, or one the handler met itself
            return encode_reply({"e": "timeout", "m": str(exc)}, self.keyring)
        except UnknownHandlerError as exc:
            return encode_reply({"e": "unknown_handler", "m": str(exc)}, self.keyring)
        except CloisterError as exc:  # an expected refusal (not owner, unknown worker...)
            log.debug("handler %r on node %s refused: %r", name, self.node, exc)
            return self._error_reply(_KIND_OF.get(type(exc), "handler_failed"), name, exc)
        except Exception as exc:
            return self._failed(name, exc)


def encode_request(
    name: str,
    payload: Any,
    sender: str,
    *,
    timeout: float | None = None,
    keyring: Keyring = UNSIGNED,
) -> bytes:
    """The request envelope for handler ``name``, whose caller waits ``timeout`` seconds
    (None: the serving node's default), sealed when ``keyring`` has a secret."""
    fields: dict[str, Any] = {"h": name, "p": payload, "f": sender}
    if timeout is not None:
        fields["t"] = timeout
    return schema.encode(schema.REQUEST, fields, keyring)


def decode_request(request: bytes, keyring: Keyring = UNSIGNED) -> schema.RequestWire:
    """A request envelope, checked; :class:`WireFormatError` if malformed or forged."""
    return schema.decode(schema.REQUEST, request, keyring)


def encode_reply(fields: dict[str, Any], keyring: Keyring = UNSIGNED) -> bytes:
    """A reply envelope: ``{"r": result}`` or ``{"e": kind, "m": message}``."""
    return schema.encode(schema.REPLY, fields, keyring)


def decode_reply(node: str, reply: bytes, keyring: Keyring = UNSIGNED) -> CallResult:
    """Turn a reply envelope into a :class:`CallResult`."""
    try:
        message = schema.decode(schema.REPLY, reply, keyring)
    except WireFormatError as exc:
        return CallResult(node, error=type(exc)(f"reply from {node}: {exc}"))
    if message.e is not None:
        kind = _ERRORS.get(message.e, RemoteError)
        return CallResult(node, error=kind(message.m))
    return CallResult(node, value=message.r)


def failed(node: str, exc: Exception) -> CallResult:
    """A :class:`CallResult` for a transport failure."""
    if isinstance(exc, CloisterError):
        return CallResult(node, error=exc)
    return CallResult(node, error=RemoteError(f"request to node {node} failed: {exc!r}"))


__all__ = [
    "CallResult",
    "Handler",
    "Handlers",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
    "failed",
]
