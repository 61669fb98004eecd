"""Body decoders for sources: ``"json"``, ``"msgpack"``, ``"bytes"`` or a function of yours."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from cloister import wire
from cloister.errors import ConfigurationError

Decoder = Callable[[bytes], Any]
"""Turns a broker message's body into the value handed to the key function."""


def _json(body: bytes) -> Any:
    return json.loads(body)


def _msgpack(body: bytes) -> Any:
    return wire.decode(body)  # size limit, no pickling, tuples come back as tuples


def _passthrough(body: bytes) -> Any:
    return body


DECODERS: dict[str, Decoder] = {"json": _json, "msgpack": _msgpack, "bytes": _passthrough}


def resolve_decoder(decode: str | Decoder) -> tuple[str, Decoder]:
    """The decoder's name (for dead-letter reasons) and the function itself."""
    if callable(decode):
        return getattr(decode, "__name__", "custom"), decode
    if decode in DECODERS:
        return decode, DECODERS[decode]
    raise ConfigurationError(
        f"decode must be one of {sorted(DECODERS)} or a function bytes -> value, got {decode!r}"
    )
