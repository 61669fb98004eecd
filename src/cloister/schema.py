"""The trust boundary: every record read from the medium or the wire is decoded here.

A record kind (:class:`Kind`) names a typed schema — a msgspec type checked strictly:
an ``int`` field refuses ``True`` and ``1.0``, a missing field is an error, nothing is
coerced — and :func:`decode` is the one way in. It checks, in this order:

1. **size**: at most :data:`MAX_RECORD_BYTES`;
2. **authenticity**: with a cluster secret (:class:`Keyring`), the record's HMAC-SHA256
   tag, bound to its kind, under one of the configured keys (see *Sealed records*);
3. **shape and types**: the schema, with limits on names (:data:`MAX_NAME`) and on
   nesting (tuples at most :data:`~cloister.wire.MAX_TUPLE_DEPTH` deep; other
   containers at most as deep as the interpreter's recursion limit allows);
4. **values** the schema cannot express (finite numbers), in ``__post_init__``.

It returns a typed object or raises :class:`~cloister.errors.WireFormatError` (its
subclass :class:`UnauthenticatedRecordError` for a bad or missing tag) — never another
exception, whatever the bytes. The bytes are :mod:`cloister.wire`'s msgpack, unchanged:
msgspec decodes them faster than ``msgpack`` plus hand checks did (``bench/wire.py``).

**Sealed records.** Without a secret a record is plain msgpack, as always. With one,
:meth:`Keyring.seal` prefixes it with ``0xC1`` (a byte msgpack never uses, so a sealed
record cannot be mistaken for a plain one), an 8-byte key id and the 32-byte tag of
``kind + NUL + body``. The first secret of a keyring signs, all of them verify: rotate by
deploying ``new,old`` everywhere, then ``new``. The kind in the tag keeps a sealed value
of one kind (a table value a user chose) from being replayed as another (a member
record); a record can still be replayed as itself, which the layers above tolerate
(fencing, TTLs, deduplication).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Annotated, Any, Generic, NoReturn, TypeVar

import msgspec

from cloister import wire
from cloister.errors import ConfigurationError, WireFormatError

log = logging.getLogger("cloister.schema")

T = TypeVar("T")

MAX_RECORD_BYTES = wire.MAX_BYTES
"""The largest record decoded at all (bigger ones are refused before any parsing)."""

MAX_NAME = 256
"""The longest node, group or handler name a control record may carry (characters)."""

SECRET_ENV = "CLOISTER_SECRET"
"""The environment variable a cluster secret is read from: one secret, or several
separated by commas (the first signs, all verify)."""

MAX_HANDLER_NAME = 1024
"""The longest handler name a request may carry (characters)."""

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]
HandlerName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_HANDLER_NAME)]
Count = Annotated[int, msgspec.Meta(ge=0)]
Positive = Annotated[float, msgspec.Meta(gt=0)]


def _finite(where: str = "", **values: float | None) -> None:
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{where}{name} should be a finite number, got {value!r}")


# -- schemas -------------------------------------------------------------------------------


class MemberWire(msgspec.Struct, frozen=True):
    """A member record (``members`` bucket, key = node name)."""

    node: Name
    inc: int
    weight: Positive
    groups: list[Name]
    started_at: float
    acked: Count = 0
    state: str = ""
    ttl: Positive | None = None

    def __post_init__(self) -> None:
        _finite(weight=self.weight, started_at=self.started_at, ttl=self.ttl)


MemberSpecWire = tuple[Positive, list[Name], int]
"""One member of an epoch record: ``[weight, groups, incarnation]``."""


class EpochWire(msgspec.Struct, frozen=True):
    """The published epoch record (``control`` bucket, key ``epoch``)."""

    epoch: Count
    sentry: str
    members: dict[Name, MemberSpecWire]

    def __post_init__(self) -> None:
        for name, spec in self.members.items():
            _finite(f"member {name!r}: ", weight=spec[0])


class SentryWire(msgspec.Struct, frozen=True):
    """The sentry lease (``control`` bucket, key ``sentry``)."""

    node: Name


class ClaimWire(msgspec.Struct, frozen=True):
    """A partition claim (``mgr-<name>`` bucket, key ``c.<partition>``)."""

    node: Name
    epoch: Count


class StoredWire(msgspec.Struct, frozen=True):
    """A stored worker (``mgr-<name>`` bucket): id, runtime spec, payload, watermark."""

    id: Any
    spec: dict[str, Any] | None = None
    payload: Any = None
    has_payload: bool = False
    deleted: bool = False
    w: Count | None = None


InboxWire = tuple[Any, Any, str | None]
"""An inbox record (a partition of the inbox log): ``[key, message, msg_id]``."""


class DeadLetterWire(msgspec.Struct, frozen=True):
    """A dead letter (``dead-<inbox>`` bucket)."""

    key: Any = None
    message: Any = None
    msg_id: str | None = None
    reason: str = ""
    attempts: int = 0
    at: float = 0.0
    raw: bytes | None = None
    source: str | None = None
    meta: dict[str, Any] | None = None
    truncated: int | None = None


class RequestWire(msgspec.Struct, frozen=True):
    """A request to a named handler (RPC and multicast): handler, payload, sender."""

    h: HandlerName
    p: Any = None
    f: str | None = None
    to: list[str] | None = None
    """A multicast's addressees (None: every node)."""
    t: float | None = None
    """Seconds the caller waits for the reply (None: an older or foreign caller)."""


class ReplyWire(msgspec.Struct, frozen=True):
    """A reply: ``r`` (the result) or ``e`` (an error kind) with ``m`` (its message)."""

    r: Any = None
    e: str | None = None
    m: str = "remote error"


class HandoffWire(msgspec.Struct, frozen=True):
    """A handoff batch (the payload of a ``handoff`` request)."""

    epoch: int
    workers: list[list[Any]]
    """Each ``[id, payload, casts, watermark]``, or with a fifth element: the worker's spec
    fields (a dict) when they differ from its children_specs (a permanent ``Timeout``)."""

    def __post_init__(self) -> None:
        for entry in self.workers:
            if (
                len(entry) not in (4, 5)
                or not isinstance(entry[2], list)
                or type(entry[3]) is not int
                or (len(entry) == 5 and not isinstance(entry[4], dict))
            ):
                raise ValueError(
                    "each worker is [id, payload, casts, watermark] or "
                    "[id, payload, casts, watermark, spec]"
                )


# -- kinds -----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Kind(Generic[T]):
    """One kind of record: its name (in tags and metrics), how errors name it, its type."""

    name: str
    what: str
    type: Any
    decoder: msgspec.msgpack.Decoder[T] = dataclass_field(init=False, repr=False)
    """Built once per kind: msgspec compiles the type into the decoder."""

    def __post_init__(self) -> None:
        decoder = msgspec.msgpack.Decoder(self.type, ext_hook=wire.ext_hook)
        object.__setattr__(self, "decoder", decoder)

    def parse(self, body: bytes | memoryview) -> T:
        """The typed value in ``body`` (plain msgpack); :class:`WireFormatError` if not."""
        with self._refusing():
            return self.decoder.decode(body)

    def convert(self, value: Any) -> T:
        """``value`` (already decoded, e.g. a request's payload) checked against the
        schema; :class:`WireFormatError` if it does not fit."""
        with self._refusing():
            return msgspec.convert(value, self.type, strict=True)  # type: ignore[no-any-return]

    @contextmanager
    def _refusing(self) -> Iterator[None]:
        """Whatever msgspec (or the recursion limit) refuses, as a WireFormatError."""
        try:
            yield
        except (msgspec.DecodeError, RecursionError) as exc:  # ValidationError included
            if isinstance(exc, RecursionError):
                why = "nested too deep"
            elif isinstance(exc, msgspec.ValidationError):
                why = str(exc)
            else:
                why = f"undecodable ({exc})"
            raise WireFormatError(f"{self.what}: {why}") from None


MEMBER: Kind[MemberWire] = Kind("member", "member record", MemberWire)
EPOCH: Kind[EpochWire] = Kind("epoch", "epoch record", EpochWire)
SENTRY: Kind[SentryWire] = Kind("sentry", "sentry lease", SentryWire)
CLAIM: Kind[ClaimWire] = Kind("claim", "partition claim", ClaimWire)
STATE: Kind[StoredWire] = Kind("state", "stored worker", StoredWire)
INBOX: Kind[InboxWire] = Kind("inbox", "inbox record", InboxWire)
DEAD_LETTER: Kind[DeadLetterWire] = Kind("dead_letter", "dead letter", DeadLetterWire)
TABLE: Kind[Any] = Kind("table", "table value", Any)
REQUEST: Kind[RequestWire] = Kind("request", "request", RequestWire)
REPLY: Kind[ReplyWire] = Kind("reply", "reply", ReplyWire)
MULTICAST: Kind[RequestWire] = Kind("multicast", "multicast", RequestWire)
HANDOFF: Kind[HandoffWire] = Kind("handoff", "handoff batch", HandoffWire)

KINDS = (MEMBER, EPOCH, SENTRY, CLAIM, STATE, INBOX, DEAD_LETTER, TABLE, REQUEST, REPLY)
"""The sealed kinds, as counted in ``cloister_unauthenticated_records_total{kind}``
(a multicast is counted as a request; a handoff batch travels inside one)."""


# -- sealing --------------------------------------------------------------------------------

SEALED = 0xC1
"""The first byte of a sealed record: the one byte msgpack never uses."""

_KEY_ID = 8
_TAG = 32
_HEADER = 1 + _KEY_ID + _TAG
_REMEMBERED = 4096  # distinct rejected records remembered, so each is counted once


class UnauthenticatedRecordError(WireFormatError):
    """A record without a valid tag from the cluster's secret: forged, written by a node
    or producer without the secret, or signed with a key this node no longer has."""


class ForeignRecordError(WireFormatError):
    """A sealed record read by a node that has no secret: written by a cluster that has
    one (or forged to look so). Not counted as unauthenticated: this node checks nothing."""


class Keyring:
    """The cluster secret(s) records are sealed with; empty: records are not sealed.

    ``Keyring(["new", "old"])`` signs with ``new`` and accepts both. Rejections are
    counted by kind (:attr:`rejected`), each distinct record once, and the first of each
    kind is logged at warning level.
    """

    def __init__(self, secrets: Iterable[str | bytes] = ()) -> None:
        keys = [s.encode() if isinstance(s, str) else bytes(s) for s in secrets]
        if any(not key for key in keys):
            raise ConfigurationError("a cluster secret must not be empty")
        self._keys = {_key_id(key): key for key in keys}
        self._signing = keys[0] if keys else None
        #: True when records are sealed (a secret is configured).
        self.signing = bool(keys)
        self._signing_id = _key_id(keys[0]) if keys else b""
        self.rejected: dict[str, int] = {}
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def resolve(cls, secret: str | bytes | Iterable[str | bytes] | None) -> Keyring:
        """The keyring for a ``secret=`` argument; None reads :data:`SECRET_ENV`. A str
        may hold several secrets separated by commas (the first signs)."""
        if secret is None:
            secret = os.environ.get(SECRET_ENV) or None
            if secret is None:
                return cls()
        if isinstance(secret, str):
            return cls(s.strip() for s in secret.split(",") if s.strip())
        if isinstance(secret, bytes):
            return cls([secret])
        return cls(secret)

    def seal(self, kind: Kind[Any], body: bytes) -> bytes:
        """``body`` with its tag; ``body`` itself when no secret is configured."""
        if self._signing is None:
            return body
        tag = hmac.digest(self._signing, _message(kind, body), "sha256")
        return b"\xc1" + self._signing_id + tag + body

    def open(self, kind: Kind[Any], data: bytes | memoryview) -> memoryview:
        """The body of a sealed ``data`` once its tag checks out; with no secret, ``data``
        itself unless it is sealed. :class:`UnauthenticatedRecordError` otherwise."""
        view = memoryview(data)
        sealed = len(view) > 0 and view[0] == SEALED
        if self._signing is None:
            if sealed:
                raise ForeignRecordError(
                    f"{kind.what}: sealed with a cluster secret this node does not have; "
                    f"start it with the cluster's secret ({SECRET_ENV} or secret=)"
                )
            return view
        if not sealed or len(view) < _HEADER:
            self._reject(kind, view, "carries no tag")
        key = self._keys.get(bytes(view[1 : 1 + _KEY_ID]))
        if key is None:
            self._reject(kind, view, "is signed with a key this node does not have")
        body = view[_HEADER:]
        expected = hmac.digest(key, _message(kind, body), "sha256")
        if not hmac.compare_digest(expected, view[1 + _KEY_ID : _HEADER]):
            self._reject(kind, view, "has a tag that does not match")
        return body

    def _reject(self, kind: Kind[Any], data: memoryview, why: str) -> NoReturn:
        name = "request" if kind is MULTICAST else kind.name
        digest = hashlib.sha256(data).digest()
        with self._lock:
            first = digest not in self._seen
            if first:
                self._seen[digest] = None
                if len(self._seen) > _REMEMBERED:
                    self._seen.popitem(last=False)
                count = self.rejected.get(name, 0)
                self.rejected[name] = count + 1
        if first and count == 0:
            log.warning(
                "rejected an unauthenticated %s: it %s (further ones are counted in "
                "cloister_unauthenticated_records_total{kind=%r})",
                kind.what,
                why,
                name,
            )
        raise UnauthenticatedRecordError(
            f"{kind.what} {why}: not written by a member with the cluster secret"
        )


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"cloister key id\x00" + key).digest()[:_KEY_ID]


def _message(kind: Kind[Any], body: bytes | memoryview) -> bytes:
    return kind.name.encode() + b"\x00" + bytes(body)


UNSIGNED = Keyring()
"""The keyring of a cluster without a secret: records are plain msgpack."""


# -- the one way in and out ---------------------------------------------------------------------


def decode(kind: Kind[T], data: bytes | memoryview, keyring: Keyring = UNSIGNED) -> T:
    """The typed record of ``kind`` in ``data``: size, tag, schema checked, in that order.

    Raises :class:`WireFormatError` (:class:`UnauthenticatedRecordError` for a bad tag)
    and nothing else, whatever ``data`` holds.
    """
    if len(data) > MAX_RECORD_BYTES:
        raise WireFormatError(
            f"{kind.what} of {len(data)} bytes exceeds the {MAX_RECORD_BYTES}-byte limit"
        )
    if keyring.signing or (data and data[0] == SEALED):
        data = keyring.open(kind, data)
    try:  # Kind.parse inlined: this is the hot path of every read
        return kind.decoder.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return kind.parse(data)  # raises the WireFormatError that says what was wrong


def encode(kind: Kind[Any], value: Any, keyring: Keyring = UNSIGNED) -> bytes:
    """``value`` as a record of ``kind``: :func:`cloister.wire.encode`, sealed when the
    keyring has a secret. :class:`WireFormatError` for a value the wire cannot carry."""
    return keyring.seal(kind, wire.encode(value))


__all__ = [
    "CLAIM",
    "DEAD_LETTER",
    "EPOCH",
    "HANDOFF",
    "INBOX",
    "KINDS",
    "MAX_HANDLER_NAME",
    "MAX_NAME",
    "MAX_RECORD_BYTES",
    "MEMBER",
    "MULTICAST",
    "REPLY",
    "REQUEST",
    "SECRET_ENV",
    "SENTRY",
    "STATE",
    "TABLE",
    "UNSIGNED",
    "ForeignRecordError",
    "Keyring",
    "Kind",
    "UnauthenticatedRecordError",
    "decode",
    "encode",
]
