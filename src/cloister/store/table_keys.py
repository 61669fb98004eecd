"""Table keys as dotted tokens, so that a key prefix is a prefix of whole tokens.

A backend key is a string of ``[A-Za-z0-9_=.-]`` whose dots separate tokens (NATS carries
it as a subject, and a subject filter matches whole tokens only: ``a.b.>``). Base64 of a
key's msgpack (:mod:`cloister.store.keys`, what the manager's state table uses) is exact,
but a prefix of the key is no prefix of its encoding. Tables are queried by prefix
(:meth:`~cloister.store.table.Table.select`), so their keys are spelled one token per
byte instead, in a grammar where every prefix of a key is a prefix of its tokens:

- ``str`` → ``s``, one token per UTF-8 byte, ``=``
- ``bytes`` → ``b``, one token per byte, ``=``
- ``int`` → ``i``, its decimal digits (one token, ``-`` for negatives)
- ``tuple`` → ``t``, the tokens of each element in order, ``=``

A byte of ``[A-Za-z0-9_-]`` is its own one-character token; any other byte is ``=`` and
two upper-case hex digits. The lone ``=`` ends a string, bytes or tuple. The whole bucket
key is ``k.`` + the tokens joined by dots: ``"user:42"`` → ``k.s.u.s.e.r.=3A.4.2.=``.

The encoding is injective and keeps the type (``1`` is not ``"1"``, a tuple stays a tuple);
:func:`decode_table_key` refuses anything that is not the canonical spelling of a key.
"""

from __future__ import annotations

from typing import Any, Final

from cloister.errors import ConfigurationError, WireFormatError

NAMESPACE: Final = "k"
"""First token of every table key: a table's own records are ``k.…``."""
MAX_KEY_LENGTH: Final = 1024
"""Longest bucket key (characters) a table writes or reads: an ASCII key of up to about
500 characters (other bytes take two tokens' worth each)."""

_END: Final = "="
_SAFE: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_BYTE_TOKENS: Final = tuple(chr(b) if b in _SAFE else f"={b:02X}" for b in range(256))
_TOKEN_BYTES: Final = {token: b for b, token in enumerate(_BYTE_TOKENS)}
_PREFIX_TYPES_HINT: Final = "a table prefix is a str, bytes or tuple (of table keys)"


def _byte_tokens(data: bytes, out: list[str]) -> None:
    out.extend(_BYTE_TOKENS[b] for b in data)


def _tokens(key: Any, out: list[str]) -> None:
    if isinstance(key, str):
        out.append("s")
        _byte_tokens(key.encode("utf-8", "surrogatepass"), out)
        out.append(_END)
    elif isinstance(key, bytes):
        out.append("b")
        _byte_tokens(key, out)
        out.append(_END)
    elif isinstance(key, int) and not isinstance(key, bool):
        out.extend(("i", str(key)))
    elif isinstance(key, tuple):
        out.append("t")
        for part in key:
            _tokens(part, out)
        out.append(_END)
    else:
        raise ConfigurationError(
            f"invalid table key part {key!r}: {type(key).__name__} is not allowed; "
            "table keys must be str, bytes, int (not bool) or tuples of them"
        )


def encode_table_key(key: Any) -> str:
    """The bucket key of table key ``key`` (see the module docstring)."""
    out = [NAMESPACE]
    _tokens(key, out)
    return ".".join(out)


def table_prefix(prefix: Any) -> str:
    """The bucket-key prefix (whole tokens, ending with ``.``) of keys starting with ``prefix``.

    ``None``: every key of the table; a ``str``: the string keys that start with it; a
    ``bytes``: the bytes keys that start with it; a ``tuple``: the tuple keys whose first
    elements equal its elements. Ints are no prefix of anything but themselves.
    """
    out = [NAMESPACE]
    if prefix is None:
        pass
    elif isinstance(prefix, str):
        out.append("s")
        _byte_tokens(prefix.encode("utf-8", "surrogatepass"), out)
    elif isinstance(prefix, bytes):
        out.append("b")
        _byte_tokens(prefix, out)
    elif isinstance(prefix, tuple):
        out.append("t")
        for part in prefix:
            _tokens(part, out)
    else:
        raise ConfigurationError(
            f"invalid table prefix {prefix!r}: {type(prefix).__name__} is not allowed; "
            f"{_PREFIX_TYPES_HINT}"
        )
    return ".".join(out) + "."


class _Reader:
    """Reads the tokens of one bucket key back into a key."""

    def __init__(self, stored: str, tokens: list[str]) -> None:
        self.stored = stored
        self.tokens = tokens
        self.at = 0

    def take(self) -> str:
        if self.at >= len(self.tokens):
            raise WireFormatError(f"table key {self.stored!r} ends early")
        token = self.tokens[self.at]
        self.at += 1
        return token

    def data(self) -> bytes:
        found = bytearray()
        while (token := self.take()) != _END:
            byte = _TOKEN_BYTES.get(token)
            if byte is None:
                raise WireFormatError(f"table key {self.stored!r}: {token!r} is no byte token")
            found.append(byte)
        return bytes(found)

    def key(self) -> Any:
        kind = self.take()
        if kind == "s":
            try:
                return self.data().decode("utf-8", "surrogatepass")
            except UnicodeDecodeError as exc:
                raise WireFormatError(f"table key {self.stored!r} is not UTF-8 ({exc})") from None
        if kind == "b":
            return self.data()
        if kind == "i":
            digits = self.take()
            try:
                return int(digits)
            except ValueError:
                raise WireFormatError(f"table key {self.stored!r}: {digits!r} is no int") from None
        if kind == "t":
            parts = []
            while self.at < len(self.tokens) and self.tokens[self.at] != _END:
                parts.append(self.key())
            self.take()
            return tuple(parts)
        raise WireFormatError(f"table key {self.stored!r}: unknown type token {kind!r}")


def decode_table_key(stored: str) -> Any:
    """The key :func:`encode_table_key` turned into ``stored``; :class:`WireFormatError`
    for anything else (a foreign record, a non-canonical spelling)."""
    if len(stored) > MAX_KEY_LENGTH:  # also bounds the nesting the reader recurses into
        raise WireFormatError(f"bucket key of {len(stored)} characters is too long for a table")
    tokens = stored.split(".")
    if tokens[0] != NAMESPACE:
        raise WireFormatError(f"bucket key {stored!r} is not a table key (no {NAMESPACE!r} token)")
    reader = _Reader(stored, tokens)
    reader.at = 1
    key = reader.key()
    if reader.at != len(tokens) or encode_table_key(key) != stored:
        raise WireFormatError(f"bucket key {stored!r} is not in canonical form")
    return key
