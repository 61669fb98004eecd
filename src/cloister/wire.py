"""Wire encoding: msgpack with explicit checks. Nothing is ever unpickled.

Every record that crosses a backend is msgpack, encoded here and decoded through
:mod:`cloister.schema` (typed, checked, optionally authenticated); :func:`decode` is the
untyped decoder both share, and it turns any malformed input into a
:class:`~cloister.errors.WireFormatError` that names what was wrong.
"""

from __future__ import annotations

import threading
from typing import Any

import msgpack
import msgspec

from cloister.errors import WireFormatError

MAX_BYTES = 64 * 1024 * 1024
"""Hard limit so that a hostile or corrupt payload cannot make us allocate without bound."""

TUPLE_EXT = 1
"""Tuples travel as this msgpack extension type so that they come back as tuples, not
lists: worker ids such as ("tenant", 7) must keep their type to keep their place on the
ring."""
# Each tuple level is a nested unpack in C: a few hundred levels overflow the C stack and
# kill the process (a 1.9 KB message did). Tuples deeper than this are refused both ways.
MAX_TUPLE_DEPTH = 32


def _default(value: Any) -> Any:
    if isinstance(value, tuple):
        depth = _thread.depth
        if depth >= MAX_TUPLE_DEPTH:
            raise ValueError(f"tuples nested more than {MAX_TUPLE_DEPTH} deep")
        _thread.depth = depth + 1
        try:
            # A fresh packer: this thread's own one is busy with the enclosing value.
            return msgpack.ExtType(TUPLE_EXT, _encode_with(_new_packer(), list(value)))
        finally:
            _thread.depth = depth
    # strict_types sends subclasses here: pass them on as their base type.
    for base in (bool, int, float, str, bytes, dict, list):
        if isinstance(value, base):
            return base(value)  # type: ignore[arg-type]
    raise TypeError(f"unsupported type {type(value).__name__}")


def ext_hook(code: int, data: memoryview) -> Any:
    """The decoders' extension hook: tuples (at most :data:`MAX_TUPLE_DEPTH` deep), and
    no other extension."""
    if code != TUPLE_EXT:
        raise WireFormatError(f"unknown msgpack extension type {code}")
    depth = _thread.depth
    if depth >= MAX_TUPLE_DEPTH:
        raise WireFormatError(f"tuples nested more than {MAX_TUPLE_DEPTH} deep")
    _thread.depth = depth + 1
    try:
        return _TUPLE.decode(data)
    finally:
        _thread.depth = depth


def _new_packer() -> msgpack.Packer:
    return msgpack.Packer(use_bin_type=True, strict_types=True, default=_default)


class _ThreadPacker(threading.local):
    """One reusable packer per thread: building a packer costs more than most packs."""

    def __init__(self) -> None:
        self.packer = _new_packer()
        self.depth = 0  # tuples being encoded or decoded around the current one


_thread = _ThreadPacker()
# msgspec's decoder (stateless, thread-safe) decodes the same values as msgpack's, faster.
_ANY: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(ext_hook=ext_hook)
# A tuple's extension data is a msgpack array: decoded straight into a tuple.
_TUPLE: msgspec.msgpack.Decoder[tuple[Any, ...]] = msgspec.msgpack.Decoder(tuple, ext_hook=ext_hook)


def encode(value: Any) -> bytes:
    """Encode a msgpack-able value; a clear error for anything else."""
    return _encode_with(_thread.packer, value)


def _encode_with(packer: msgpack.Packer, value: Any) -> bytes:
    try:
        return packer.pack(value)  # type: ignore[no-any-return]
    except WireFormatError:
        raise  # from a nested tuple: already says what was wrong
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireFormatError(
            f"cannot encode {type(value).__name__} for the wire ({exc}); use None, bool, "
            "int, float, str, bytes, and lists/tuples/dicts of them"
        ) from exc


def decode(data: bytes | memoryview) -> Any:
    """Decode msgpack bytes; malformed input raises :class:`WireFormatError`."""
    if len(data) > MAX_BYTES:
        raise WireFormatError(f"message of {len(data)} bytes exceeds the {MAX_BYTES} limit")
    try:
        return _ANY.decode(data)
    except msgspec.DecodeError as exc:
        raise WireFormatError(f"undecodable message ({exc})") from None
    except RecursionError:
        raise WireFormatError("undecodable message (containers nested too deep)") from None


def decode_map(data: bytes, what: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Decode a msgpack map and check that the ``required`` fields are present."""
    value = decode(data)
    if not isinstance(value, dict):
        raise WireFormatError(f"{what}: expected a map, got {type(value).__name__}")
    missing = [name for name in required if name not in value]
    if missing:
        raise WireFormatError(f"{what}: missing field(s) {', '.join(missing)}")
    return value


def field(message: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    """Return ``message[name]`` after checking its type."""
    value = message.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
        raise WireFormatError(
            f"{what}: field {name!r} should be {_kind_name(kind)}, got {type(value).__name__}"
        )
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__
