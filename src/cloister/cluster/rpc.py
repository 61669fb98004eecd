"""Named handlers and the request envelope behind ``multicall`` / ``multicast``.

Only handlers registered by name (``cluster.handle("name")(fn)``) can be invoked from
another node — never arbitrary code. Requests and replies are msgpack maps:

- request: ``{"h": handler name, "p": payload, "f": sender}``
- reply: ``{"r": result}`` or ``{"e": error kind, "m": message}``, the kind one of a
  closed list (``unknown_handler``, ``bad_request``, ``handler_failed``, ``not_owner``,
  ``fenced``, ``unknown_worker``)

A failing or unknown handler becomes an error *reply*; the caller turns it into a
:class:`CallResult` with ``error`` set, so one bad node never loses the other replies.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cloister import wire
from cloister.errors import (
    CloisterError,
    ConfigurationError,
    FencedError,
    NotOwnerError,
    RemoteError,
    UnknownHandlerError,
    UnknownWorkerError,
    WireFormatError,
)

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
}
_KIND_OF: dict[type[CloisterError], str] = {
    NotOwnerError: "not_owner",
    FencedError: "fenced",
    UnknownWorkerError: "unknown_worker",
}


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

    def __init__(self, node: str) -> None:
        self.node = node
        self.errors = 0
        self._handlers: dict[str, Handler] = {}

    def register(self, name: str, fn: Handler, *, builtin: bool = False) -> None:
        """Register ``fn`` under ``name``; names starting ``cloister.`` are reserved."""
        if not isinstance(name, str) or not name:
            raise ConfigurationError("a handler name must be a non-empty string")
        if name.startswith("cloister.") and not builtin:
            raise ConfigurationError(f"handler name {name!r}: the 'cloister.' prefix is reserved")
        if name in self._handlers:
            raise ConfigurationError(f"a handler named {name!r} is already registered")
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

    async def answer(self, request: bytes) -> bytes:
        """Decode a request, run its handler, encode the reply. Never raises."""
        try:
            message = wire.decode_map(request, "request", ("h",))
            name = wire.field(message, "h", str, "request")
        except WireFormatError as exc:
            self.errors += 1
            log.warning("rejected a malformed request: %s", exc)
            return wire.encode({"e": "bad_request", "m": str(exc)})
        try:
            result = await self.invoke(name, message.get("p"))
            return wire.encode({"r": result})
        except UnknownHandlerError as exc:
            return wire.encode({"e": "unknown_handler", "m": str(exc)})
        except CloisterError as exc:  # an expected refusal (not owner, unknown worker...)
            log.debug("handler %r on node %s refused: %r", name, self.node, exc)
            kind = _KIND_OF.get(type(exc), "handler_failed")
            return wire.encode(
                {"e": kind, "m": f"handler {name!r} on node {self.node} raised {exc!r}"}
            )
        except Exception as exc:
            self.errors += 1
            log.exception("handler %r failed on node %s", name, self.node)
            return wire.encode(
                {"e": "handler_failed", "m": f"handler {name!r} on node {self.node} raised {exc!r}"}
            )


def encode_request(name: str, payload: Any, sender: str) -> bytes:
    """The request envelope for handler ``name``."""
    return wire.encode({"h": name, "p": payload, "f": sender})


def decode_reply(node: str, reply: bytes) -> CallResult:
    """Turn a reply envelope into a :class:`CallResult`."""
    try:
        message = wire.decode_map(reply, f"reply from {node}")
    except WireFormatError as exc:
        return CallResult(node, error=exc)
    if "e" in message:
        kind = _ERRORS.get(str(message.get("e")), RemoteError)
        return CallResult(node, error=kind(str(message.get("m", "remote error"))))
    return CallResult(node, value=message.get("r"))


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
    "encode_request",
    "failed",
]
