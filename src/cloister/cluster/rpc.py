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

from cloister import schema
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

    def __init__(self, node: str, keyring: Keyring = UNSIGNED) -> None:
        self.node = node
        self.keyring = keyring
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
            message = decode_request(request, self.keyring)
            name = message.h
        except WireFormatError as exc:
            self.errors += 1
            log.warning("rejected a malformed request: %s", exc)
            return encode_reply({"e": "bad_request", "m": str(exc)}, self.keyring)
        try:
            result = await self.invoke(name, message.p)
            return encode_reply({"r": result}, self.keyring)
        except UnknownHandlerError as exc:
            return encode_reply({"e": "unknown_handler", "m": str(exc)}, self.keyring)
        except CloisterError as exc:  # an expected refusal (not owner, unknown worker...)
            log.debug("handler %r on node %s refused: %r", name, self.node, exc)
            kind = _KIND_OF.get(type(exc), "handler_failed")
            return encode_reply(
                {"e": kind, "m": f"handler {name!r} on node {self.node} raised {exc!r}"},
                self.keyring,
            )
        except Exception as exc:
            self.errors += 1
            log.exception("handler %r failed on node %s", name, self.node)
            return encode_reply(
                {
                    "e": "handler_failed",
                    "m": f"handler {name!r} on node {self.node} raised {exc!r}",
                },
                self.keyring,
            )


def encode_request(name: str, payload: Any, sender: str, keyring: Keyring = UNSIGNED) -> bytes:
    """The request envelope for handler ``name`` (sealed when ``keyring`` has a secret)."""
    return schema.encode(schema.REQUEST, {"h": name, "p": payload, "f": sender}, keyring)


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
