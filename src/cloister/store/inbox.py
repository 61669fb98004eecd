"""The durable inbox: where messages wait for the worker that owns their key.

A message for key ``k`` is appended to partition ``hash(k) % partitions`` of a backend log
and ``put`` returns only once the backend has stored it (JetStream's ack, on NATS). Each
partition is consumed by exactly one node — the ring places partitions, and the backend
refuses a second consumer — and a new consumer starts from the oldest unacknowledged
record. So a message survives the crash of any node, is handled in order per key, and is
removed only after its worker's ``handle_cast`` returned.

Messages that cannot be handled — undecodable, addressed to no worker, or failing
``max_attempts`` times — are parked in a dead-letter bucket with the reason, and the
record is acknowledged: a poison message never blocks its partition. Broker messages a
source could not turn into an inbox message are parked in the same bucket
(:meth:`Inbox.park_raw`), with their raw body and the source's name.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cloister import schema, wire
from cloister._quiet import Once
from cloister.backends import Backend, KeyValue, Log, LogRecord
from cloister.backends.base import HEADROOM
from cloister.errors import (
    CloisterError,
    ConfigurationError,
    InvalidIdError,
    MessageTooLargeError,
    WireFormatError,
)
from cloister.ring import key_hash
from cloister.schema import Keyring

log = logging.getLogger("cloister.store.inbox")

_UNSAFE_ID = re.compile(r"[^A-Za-z0-9_=-]")

#: The longest worker id, in bytes of its wire (msgpack) encoding. An id travels inside
#: records, and as a bucket key — ``w`` + base64url of those bytes, 4/3 as long — in the
#: subject of every state write: 1 KiB encoded is a subject token of at most 1,366
#: characters, well inside NATS's 4 KiB control line (a 10,000-character id made the
#: server close the connection), and leaves most of ``max_payload`` to the message.
MAX_ID_BYTES = 1024
#: The longest message id (``msg_id``), in UTF-8 bytes: it travels as a header.
MAX_MSG_ID_BYTES = 256
#: How much of a dead letter's raw body is kept when the whole would not fit the medium.
_RAW_KEPT = 64 * 1024


def check_worker_id(worker_id: Any) -> Any:
    """``worker_id`` if the cluster can carry it, else :class:`InvalidIdError` saying why.

    The ring places str, bytes, int and tuples of them (no bool, no float: ``8.0`` is not
    the id ``8``); ints must fit 64 bits and strs be valid Unicode (the wire carries them),
    and the encoded id may not exceed :data:`MAX_ID_BYTES`.
    """
    try:
        key_hash(worker_id)
    except TypeError as exc:
        raise InvalidIdError(f"worker id {_short(worker_id)}: {exc}") from None
    return _check_encoded(worker_id)


def _check_encoded(worker_id: Any) -> Any:
    """:func:`check_worker_id` for an id the ring already placed: its wire size."""
    kind = type(worker_id)
    if kind is str and len(worker_id) <= MAX_ID_BYTES - 8 and worker_id.isascii():
        return worker_id  # the common case, without encoding it
    if kind is int and -(2**63) <= worker_id < 2**64:
        return worker_id
    try:
        size = len(wire.encode(worker_id))
    except WireFormatError as exc:
        raise InvalidIdError(f"worker id {_short(worker_id)} cannot be encoded: {exc}") from None
    if size > MAX_ID_BYTES:
        raise InvalidIdError(
            f"worker id {_short(worker_id)} is {size} bytes encoded; the limit is "
            f"{MAX_ID_BYTES} (ids travel in subjects and headers): use a shorter id, or a "
            "hash of it"
        )
    return worker_id


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}...({len(text)} chars)"


class BackPressureError(CloisterError, TimeoutError):
    """Too many messages in flight on this node; the producer waited and gave up."""


@dataclass(slots=True)  # not frozen: built once per delivered message, on the hot path
class InboxMessage:
    """A decoded inbox record."""

    key: Any
    message: Any
    msg_id: str | None
    record: LogRecord


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message parked because it could not be handled."""

    id: str
    key: Any
    message: Any
    msg_id: str | None
    reason: str
    attempts: int
    at: float
    raw: bytes | None = None  # the undecodable bytes, when the message could not be read
    source: str | None = None  # the broker source that parked it (see cloister.sources)
    meta: dict[str, Any] | None = None  # what the source knew besides the body


class Inbox:
    """One manager's inbox on one node: producing side and decoding helpers."""

    def __init__(
        self,
        backend: Backend,
        name: str,
        *,
        partitions: int = 128,
        dedup_window: float = 120.0,
        max_in_flight: int = 4096,
        replicas: int | None = None,
    ) -> None:
        if not isinstance(partitions, int) or partitions < 1:
            raise ConfigurationError(f"partitions must be a whole number >= 1, got {partitions!r}")
        self.backend = backend
        self.name = name
        self.partitions = partitions
        self.dedup_window = dedup_window
        self.replicas = replicas
        self.max_in_flight = max_in_flight
        self._producing = 0  # puts awaiting the backend's acknowledgement
        self._waiting = 0  # puts waiting for room
        self._room = asyncio.Event()
        # Generated message ids: 64 random bits per inbox object, then a counter.
        self._id_prefix = f"{secrets.token_hex(8)}-"
        self._id_counter = itertools.count(1)
        self.log: Log | None = None
        self.dead: KeyValue | None = None
        self.bad_letters = 0  # dead letters that could not be read (skipped, logged)
        self._reported = Once()

    async def open(self) -> None:
        """Open (creating if needed) the log and the dead-letter bucket."""
        self.log = await self.backend.log(
            f"inbox-{self.name}",
            partitions=self.partitions,
            dedup_window=self.dedup_window,
            replicas=self.replicas,
        )
        self.dead = await self.backend.kv(f"dead-{self.name}")

    @classmethod
    async def attach(
        cls, backend: Backend, name: str, *, max_in_flight: int = 4096
    ) -> Inbox | None:
        """The producing side of manager ``name``'s existing inbox, with the partition
        count it was created with; None when no node ever opened it. Creates nothing
        (no dead-letter bucket either: an attached inbox only puts)."""
        log_ = await backend.existing_log(f"inbox-{name}")
        if log_ is None:
            return None
        inbox = cls(backend, name, partitions=log_.partitions, max_in_flight=max_in_flight)
        inbox.log = log_
        return inbox

    def misplaced(self, message: InboxMessage) -> str | None:
        """Why a decoded record must not reach a worker (None: it may). Its key must be a
        valid id exactly as stored — ``8.0`` or ``True`` is no worker's id, never coerced
        to ``8`` or ``1`` — and belong to the partition the record is in (a record put
        elsewhere by a foreign producer would wait for a worker that never comes there)."""
        key = message.key
        try:
            expected = self.partition_of(key)
            _check_encoded(key)
        except InvalidIdError as exc:
            return f"invalid worker id: {exc}"
        if expected != message.record.partition:
            return (
                f"wrong partition: the record is in partition {message.record.partition}, "
                f"its worker id belongs to partition {expected}"
            )
        return None

    def partition_of(self, key: Any) -> int:
        """The partition a key's messages go to (the same in every process).

        :class:`InvalidIdError` (a ``TypeError``) for a key the ring cannot place.
        """
        try:
            return key_hash(key) % self.partitions
        except TypeError as exc:
            raise InvalidIdError(f"worker id {_short(key)}: {exc}") from None

    @property
    def max_record(self) -> int | None:
        """The most bytes one record may have, besides its message id (None: no limit):
        the medium's ``max_payload`` less :data:`~cloister.backends.base.HEADROOM`."""
        limit = self.backend.max_payload
        return None if limit is None else limit - HEADROOM

    def new_msg_id(self) -> str:
        """A message id no other put uses: this inbox's random prefix and a counter.

        :meth:`put` gives one to every message that comes without, before the first
        attempt, so every retry of that put — the backend's, or a caller's that passes it
        back — carries the same id and the medium stores the message once.
        """
        return f"{self._id_prefix}{next(self._id_counter)}"

    def record(self, key: Any, message: Any, msg_id: str | None) -> tuple[int, bytes, str]:
        """``(partition, data, msg_id)``: the record :meth:`put` appends, checked.

        Checked: the id (:func:`check_worker_id`), the ``msg_id`` (a str of at most
        :data:`MAX_MSG_ID_BYTES`; one is generated when None) and the record's size,
        headers included, against the medium's ``max_payload``
        (:class:`MessageTooLargeError`).
        """
        return self._record(key, message, msg_id, self.max_record)

    def _record(
        self, key: Any, message: Any, msg_id: str | None, limit: int | None
    ) -> tuple[int, bytes, str]:
        """:meth:`record` with the medium's ``limit`` read once (a batch shares it)."""
        if msg_id is None:
            msg_id = self.new_msg_id()
        elif not isinstance(msg_id, str) or not msg_id:
            raise ConfigurationError(f"msg_id must be a non-empty str, got {msg_id!r:.80}")
        elif len(msg_id.encode("utf-8", "surrogatepass")) > MAX_MSG_ID_BYTES:
            raise ConfigurationError(
                f"msg_id {_short(msg_id)} is longer than {MAX_MSG_ID_BYTES} bytes"
            )
        partition = self.partition_of(key)  # the type check: what the ring can place
        _check_encoded(key)
        data = schema.encode(schema.INBOX, [key, message, msg_id], self.backend.keyring)
        if limit is not None:
            size = len(data) + len(msg_id.encode("utf-8", "surrogatepass"))
            if size > limit:
                raise MessageTooLargeError(
                    f"message for worker {_short(key)} is {size} bytes encoded; the medium "
                    f"stores at most {limit} ({limit + HEADROOM} max_payload less {HEADROOM} "
                    "for headers): send a smaller message, or store the bulk elsewhere and "
                    "cast a reference"
                )
        return partition, data, msg_id

    async def put(
        self, key: Any, message: Any, *, msg_id: str | None = None, timeout: float | None = 30.0
    ) -> int:
        """Store ``message`` for ``key`` durably; returns its log sequence.

        Every message carries a ``msg_id`` (generated when None: see :meth:`new_msg_id`),
        so a publish the backend retries is stored once, and a duplicate within the dedup
        window is dropped. Waits while this node already has ``max_in_flight`` puts
        outstanding, and raises :class:`BackPressureError` after ``timeout`` seconds of
        waiting. The record is checked first (see :meth:`record`).
        """
        log_ = self._require_log()
        partition, data, msg_id = self.record(key, message, msg_id)
        if self._producing >= self.max_in_flight:
            await self._wait_for_room(1, timeout)
        self._producing += 1
        try:
            return await log_.append(partition, data, msg_id=msg_id)
        finally:
            self._release(1)

    async def put_many(
        self, messages: Iterable[tuple[Any, Any, str | None]], *, timeout: float | None = 30.0
    ) -> list[int]:
        """Store every ``(key, message, msg_id)`` durably, pipelined; their sequences.

        Every record is checked before any is sent (one bad record sends nothing), and
        each gets a ``msg_id`` as in :meth:`put`. Returns once the medium stored them
        all; records of one key keep their order (see ``Log.append_many``). A batch
        larger than ``max_in_flight`` is sent in slices of that size.
        """
        log_ = self._require_log()
        limit, record = self.max_record, self._record
        records = [record(key, message, msg_id, limit) for key, message, msg_id in messages]
        sequences: list[int] = []
        step = max(1, self.max_in_flight)
        for start in range(0, len(records), step):
            batch = records[start : start + step]
            if self._producing + len(batch) > self.max_in_flight:
                await self._wait_for_room(len(batch), timeout)
            self._producing += len(batch)
            try:
                sequences += await log_.append_many(batch)
            finally:
                self._release(len(batch))
        return sequences

    def _release(self, count: int) -> None:
        self._producing -= count
        if self._waiting:  # somebody waits for room: let it look again
            self._room.set()

    async def _wait_for_room(self, count: int, timeout: float | None) -> None:
        self._waiting += 1
        try:
            async with asyncio.timeout(timeout):
                while self._producing + count > self.max_in_flight and self._producing:
                    self._room.clear()
                    await self._room.wait()
        except TimeoutError:
            raise BackPressureError(
                f"inbox {self.name!r}: all {self.max_in_flight} in-flight puts of this node "
                f"stayed busy for {timeout}s; the cluster is not keeping up (add nodes or "
                "slow the producers)"
            ) from None
        finally:
            self._waiting -= 1

    def decode(self, record: LogRecord) -> InboxMessage:
        """Decode a record; :class:`WireFormatError` when malformed."""
        key, message, msg_id = schema.decode(schema.INBOX, record.data, self.backend.keyring)
        return InboxMessage(key, message, msg_id, record)

    async def park(
        self,
        record: LogRecord,
        reason: str,
        *,
        attempts: int = 0,
        decoded: InboxMessage | None = None,
    ) -> DeadLetter:
        """Store a record in the dead-letter bucket with ``reason``."""
        dead = self._require_dead()
        letter = DeadLetter(
            id=f"{record.partition}-{record.sequence}",
            key=None if decoded is None else decoded.key,
            message=None if decoded is None else decoded.message,
            msg_id=None if decoded is None else decoded.msg_id,
            reason=reason,
            attempts=attempts,
            at=time.time(),
        )
        raw = None if decoded is not None else record.data
        fields = {
            "key": letter.key,
            "message": letter.message,
            "msg_id": letter.msg_id,
            "reason": reason,
            "attempts": attempts,
            "at": letter.at,
            "raw": raw,
        }
        await dead.put(letter.id, self._letter_bytes(fields, record.data))
        return letter

    def _letter_bytes(self, fields: dict[str, Any], body: bytes) -> bytes:
        """The encoded dead letter, or — when it cannot be encoded or would not fit the
        medium — one without its message, keeping the first bytes of ``body`` (the
        reason says so): a poison message is parked in any case, never redelivered
        forever because its dead letter is too large."""
        limit = self.max_record
        keyring = self.backend.keyring
        try:
            data = schema.encode(schema.DEAD_LETTER, fields, keyring)
        except WireFormatError as exc:
            why = f"not encodable: {exc}"
        else:
            if limit is None or len(data) <= limit:
                return data
            why = f"{len(data)} bytes, more than the {limit} the medium stores"
        room = _RAW_KEPT if limit is None else max(0, min(_RAW_KEPT, limit // 2))
        kept = bytes(body[:room])
        fields = {
            **fields,
            "key": fields["key"] if _encodable_id(fields["key"]) else None,
            "message": None,
            "raw": kept,
            "truncated": len(body),
            "reason": f"{str(fields['reason'])[:1000]} (dead letter {why}: message dropped, "
            f"first {len(kept)} of {len(body)} raw bytes kept)",
        }
        msg_id = fields.get("msg_id")
        if not isinstance(msg_id, str) or len(msg_id) > MAX_MSG_ID_BYTES:
            fields["msg_id"] = None
        if fields.get("meta") is not None:
            try:
                small = len(wire.encode(fields["meta"])) <= 4096
            except WireFormatError:
                small = False
            if not small:
                fields["meta"] = None
        return schema.encode(schema.DEAD_LETTER, fields, keyring)

    async def park_raw(
        self,
        body: bytes,
        reason: str,
        *,
        source: str,
        msg_id: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> DeadLetter:
        """Park a broker message that never became an inbox message (see ``cloister.sources``).

        It has no key, so :meth:`replay` leaves it alone (its source can replay it:
        ``Source.replay_parked``); :meth:`dead_letters` lists it with its ``raw`` body,
        ``source`` and ``meta``. Raises what the backend raises when it cannot store.
        """
        dead = self._require_dead()
        safe = _UNSAFE_ID.sub("_", source)[:64] or "source"
        letter = DeadLetter(
            id=f"src-{safe}-{time.time_ns()}-{uuid.uuid4().hex[:8]}",
            key=None,
            message=None,
            msg_id=msg_id,
            reason=reason,
            attempts=0,
            at=time.time(),
            raw=bytes(body),
            source=source,
            meta=meta,
        )
        record = {
            "key": None,
            "message": None,
            "msg_id": msg_id,
            "reason": reason,
            "attempts": 0,
            "at": letter.at,
            "raw": letter.raw,
            "source": source,
            "meta": meta,
        }
        await dead.put(letter.id, self._letter_bytes(record, letter.raw or b""))
        return letter

    async def discard(self, letter_id: str) -> None:
        """Remove one dead letter (it was handled some other way)."""
        await self._require_dead().delete(letter_id)

    async def dead_letters(self) -> list[DeadLetter]:
        """Every parked message, oldest first."""
        dead = self._require_dead()
        letters = []
        for name, entry in (await dead.entries()).items():
            try:
                letters.append(_read_letter(name, entry.value, self.backend.keyring))
            except WireFormatError as exc:
                if self._reported.first(name, entry.revision):  # once, not on every listing
                    self.bad_letters += 1
                    log.warning(
                        "inbox %r: skipping malformed dead letter %r: %s", self.name, name, exc
                    )
        return sorted(letters, key=lambda letter: letter.at)

    async def dead_letter_count(self) -> int:
        """How many messages are parked (none decoded: cheap enough to sample)."""
        return len(await self._require_dead().entries())

    async def replay(self, ids: list[str] | None = None) -> int:
        """Put parked messages back into the inbox (all, or those ``ids``); returns how many.

        Messages a source parked before they had a key are left to that source's
        ``replay_parked``.
        """
        self._require_dead()
        count = 0
        for letter in await self.dead_letters():
            if ids is not None and letter.id not in ids:
                continue
            if letter.key is None:
                continue  # no key to put it under (a source's or an undecodable record)
            try:
                check_worker_id(letter.key)
            except InvalidIdError as exc:
                log.warning("inbox %r: dead letter %r not replayed: %s", self.name, letter.id, exc)
                continue
            await self.put(letter.key, letter.message)
            await self.discard(letter.id)
            count += 1
        return count

    async def depth(self) -> int:
        """Messages stored and not yet handled, in all partitions."""
        return await self._require_log().depth()

    def _require_log(self) -> Log:
        if self.log is None:
            raise CloisterError(f"inbox {self.name!r} is not open; the manager opens it on start")
        return self.log

    def _require_dead(self) -> KeyValue:
        if self.dead is None:
            raise CloisterError(f"inbox {self.name!r} is not open; the manager opens it on start")
        return self.dead


def _read_letter(name: str, value: bytes, keyring: Keyring) -> DeadLetter:
    """A stored dead letter; :class:`WireFormatError` when it is malformed or forged."""
    data = schema.decode(schema.DEAD_LETTER, value, keyring)
    return DeadLetter(
        id=name,
        key=data.key,
        message=data.message,
        msg_id=data.msg_id,
        reason=data.reason,
        attempts=data.attempts,
        at=data.at,
        raw=data.raw,
        source=data.source,
        meta=data.meta,
    )


def _encodable_id(key: Any) -> bool:
    try:
        check_worker_id(key)
    except InvalidIdError:
        return False
    return True
