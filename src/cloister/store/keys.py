"""Bucket keys for arbitrary keys: exact, reversible, and safe on every backend.

A backend key is a short string of ``[A-Za-z0-9_=.-]`` (NATS carries it as a subject
token), while pycloister keys are ``str``, ``bytes``, ``int`` and tuples of them. A key is
stored as ``prefix`` + unpadded base64url of its :mod:`cloister.wire` encoding: no hashing,
so no collisions, and the original key (with its type: ``1`` is not ``"1"``, a tuple
stays a tuple) comes back from the listing.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from cloister import wire
from cloister.errors import WireFormatError


def encode_key(key: Any, prefix: str) -> str:
    """The bucket key of ``key``: ``prefix`` + base64url(wire.encode(key)), unpadded."""
    return prefix + base64.urlsafe_b64encode(wire.encode(key)).decode().rstrip("=")


def decode_key(stored: str, prefix: str) -> Any:
    """The key :func:`encode_key` turned into ``stored``; :class:`WireFormatError` if none."""
    if not stored.startswith(prefix):
        raise WireFormatError(f"bucket key {stored!r} does not start with {prefix!r}")
    text = stored[len(prefix) :]
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise WireFormatError(f"bucket key {stored!r} is not base64url ({exc})") from None
    key = wire.decode(data)
    if encode_key(key, prefix) != stored:  # junk characters, padding, a non-canonical form
        raise WireFormatError(f"bucket key {stored!r} is not in canonical form")
    return key
