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
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from cloister import wire
from cloister.backends import Backend, KeyValue, Log, LogRecord
from cloister.errors import CloisterError, ConfigurationError, WireFormatError
from cloister.ring import key_hash

_UNSAFE_ID = re.compile(r"[^A-Za-z0-9_=-]")


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
        self._room = asyncio.Event()
        self.log: Log | None = None
        self.dead: KeyValue | None = None

    async def open(self) -> None:
        """Open (creating if needed) the log and the dead-letter bucket."""
        self.log = await self.backend.log(
            f"inbox-{self.name}",
            partitions=self.partitions,
            dedup_window=self.dedup_window,
            replicas=self.replicas,
        )
        self.dead = await self.backend.kv(f"dead-{self.name}")

    def partition_of(self, key: Any) -> int:
        """The partition a key's messages go to (the same in every process).

        :class:`TypeError` for a key the ring cannot place (as ``check_id``).
        """
        try:
            return key_hash(key) % self.partitions
        except TypeError as exc:
            raise TypeError(f"worker id {key!r}: {exc}") from None

    async def put(
        self, key: Any, message: Any, *, msg_id: str | None = None, timeout: float | None = 30.0
    ) -> int:
        """Store ``message`` for ``key`` durably; returns its log sequence.

        Waits while this node already has ``max_in_flight`` puts outstanding, and raises
        :class:`BackPressureError` after ``timeout`` seconds of waiting.
        """
        log = self._require_log()
        if msg_id is not None and not isinstance(msg_id, str):
            raise ConfigurationError(f"msg_id must be a str, got {type(msg_id).__name__}")
        partition = self.partition_of(key)
        data = wire.encode([key, message, msg_id])
        if self._producing >= self.max_in_flight:
            await self._wait_for_room(timeout)
        self._producing += 1
        try:
            return await log.append(partition, data, msg_id=msg_id)
        finally:
            self._producing -= 1
            if self._producing == self.max_in_flight - 1:  # it was full: wake a waiter
                self._room.set()

    async def _wait_for_room(self, timeout: float | None) -> None:
        try:
            async with asyncio.timeout(timeout):
                while self._producing >= self.max_in_flight:
                    self._room.clear()
                    await self._room.wait()
        except TimeoutError:
            raise BackPressureError(
                f"inbox {self.name!r}: all {self.max_in_flight} in-flight puts of this node "
                f"stayed busy for {timeout}s; the cluster is not keeping up (add nodes or "
                "slow the producers)"
            ) from None

    def decode(self, record: LogRecord) -> InboxMessage:
        """Decode a record; :class:`WireFormatError` when malformed."""
        value = wire.decode(record.data)
        if not isinstance(value, list) or len(value) != 3:
            raise WireFormatError("inbox record: expected [key, message, msg_id]")
        key, message, msg_id = value
        if msg_id is not None and not isinstance(msg_id, str):
            raise WireFormatError("inbox record: msg_id should be a str or None")
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
        await dead.put(
            letter.id,
            wire.encode(
                {
                    "key": letter.key,
                    "message": letter.message,
                    "msg_id": letter.msg_id,
                    "reason": reason,
                    "attempts": attempts,
                    "at": letter.at,
                    "raw": raw,
                }
            ),
        )
        return letter

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
        await dead.put(letter.id, wire.encode(record))
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
                data = wire.decode_map(entry.value, "dead letter")
            except WireFormatError:
                continue
            letters.append(
                DeadLetter(
                    id=name,
                    key=data.get("key"),
                    message=data.get("message"),
                    msg_id=data.get("msg_id"),
                    reason=str(data.get("reason", "")),
                    attempts=int(data.get("attempts", 0)),
                    at=float(data.get("at", 0.0)),
                    raw=_bytes_or_none(data.get("raw")),
                    source=_str_or_none(data.get("source")),
                    meta=data["meta"] if isinstance(data.get("meta"), dict) else None,
                )
            )
        return sorted(letters, key=lambda letter: letter.at)

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


def _bytes_or_none(value: Any) -> bytes | None:
    return value if isinstance(value, bytes) else None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
