"""The manager's replicated state table: runtime specs and replaced payloads.

Ids from ``children_specs()`` are known on every node without storage. What changes at
runtime — ``put``/``delete`` and payloads that workers ``Replace`` — is written to a
backend bucket so that it survives the owner: the new owner of a moved worker continues
from its last payload, not from its spec. A node re-lists the bucket into its mirror each
time it settles on a topology, so starting moved workers needs no round trip each.

Replaced payloads are written behind (batched every ``flush_interval``). For workers fed
by the inbox, the payload and the *watermark* (the log sequence of the last message it
includes) are written before that message is acknowledged: after a crash the new owner
resumes from a payload that matches the log, and skips redelivered messages it already
contains — effectively once. A graceful handoff ships both directly.

Writes that depend on owning a worker are *fenced at the medium*: with a :class:`Fencing`
(the shard region), each write carries the guard of its worker's partition claim (see
:mod:`cloister.manager.claims`), a flush is one guarded ``put_many`` per partition (all
one ``put_many`` whatever the partitions), and a write the medium refuses is dropped —
never queued again — and reported to the fencing, which gives the partition up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cloister import schema
from cloister._quiet import Once
from cloister.backends import Guard, KeyValue
from cloister.errors import (
    FencedError,
    FencedWriteError,
    InvalidIdError,
    MessageTooLargeError,
    WireFormatError,
)
from cloister.manager.claims import PartitionsFencedError, is_claim_key
from cloister.schema import UNSIGNED, Keyring
from cloister.store.inbox import check_worker_id
from cloister.store.keys import encode_key

log = logging.getLogger("cloister.manager.state")


_LOAD_YIELD_EVERY = 2_000  # records decoded between yields to the event loop


def storage_key(worker_id: Any) -> str:
    """A bucket key for any worker id (exact and reversible, no hashing collisions)."""
    return encode_key(worker_id, "w")


@dataclass(frozen=True, slots=True)
class Stored:
    """One stored worker: its id, runtime spec (None: from children_specs), payload."""

    id: Any
    spec: dict[str, Any] | None
    payload: Any
    has_payload: bool
    deleted: bool = False
    watermark: int = 0  # log sequence of the last inbox message the payload includes

    def encode(self, keyring: Keyring = UNSIGNED) -> bytes:
        """The record as stored (sealed when ``keyring`` has a secret)."""
        return schema.encode(
            schema.STATE,
            {
                "id": self.id,
                "spec": self.spec,
                "payload": self.payload,
                "has_payload": self.has_payload,
                "deleted": self.deleted,
                "w": self.watermark,
            },
            keyring,
        )

    @classmethod
    def decode(cls, data: bytes, keyring: Keyring = UNSIGNED) -> Stored:
        """The record in ``data``; :class:`WireFormatError` if malformed or forged."""
        record = schema.decode(schema.STATE, data, keyring)
        return cls(
            id=record.id,
            spec=record.spec,
            payload=record.payload,
            has_payload=record.has_payload,
            deleted=record.deleted,
            watermark=record.w or 0,
        )


class Fencing(Protocol):
    """Where the state table gets its guards, and tells of writes the medium refused."""

    def guard_of(self, worker_id: Any) -> tuple[int, Guard | None]:
        """The partition of ``worker_id`` and its guard (None: no claim held on it)."""
        ...

    def refused(self, partition: int, guard: Guard, records: int) -> None:
        """The medium refused ``records`` writes guarded by ``guard`` (called at once,
        before the writer goes on: nothing else may be acked or written for it)."""
        ...


class UnclaimedError(FencedError):
    """A write of a worker whose partition this node holds no claim on (it moved, or the
    node was fenced): refused here, before it reaches the medium."""


@dataclass(frozen=True, slots=True)
class Unstorable:
    """A worker's payload that could not be stored (not encodable, or larger than the
    medium stores): the inbox records of sequences ``after < seq <= upto`` it included
    are that worker's problem — parked as dead letters, not acked as if stored."""

    after: int
    upto: int
    reason: str


class StateTable:
    """Mirror of the bucket plus a write-behind queue of replaced payloads.

    A record that cannot be stored (``max_value``, not encodable) is never written nor
    retried: it is dropped from the queue, the stored record stays as it was, and the
    worker is reported (``unstorable``, ``on_unstorable``) — one worker's oversized state
    never holds up the others' writes or acks.
    """

    def __init__(
        self,
        kv: KeyValue,
        fencing: Fencing | None = None,
        *,
        max_value: int | None = None,
        keyring: Keyring = UNSIGNED,
    ) -> None:
        self.kv = kv
        self.keyring = keyring
        self.fencing = fencing
        self.max_value = max_value
        self.mirror: dict[Any, Stored] = {}
        self.dirty: dict[Any, Stored] = {}
        self.bad_records = 0
        # Every settle reloads the bucket: one bad record is reported once, not per settle.
        self._reported = Once()
        self.unstorable: dict[Any, Unstorable] = {}
        self.unstorable_records = 0
        self.on_unstorable: Callable[[Any, Stored | None], None] | None = None
        # One write at a time: two flushes in flight could land an older payload of a key
        # after a newer one, and the older one would win.
        self._writing = asyncio.Lock()
        self.loaded_from = ""
        """Where the last :meth:`load` read (``replica`` or ``leader``), for its trace."""

    async def load(self, *, seen: int | None = None) -> set[Any]:
        """Re-list the bucket into the mirror; return the ids the medium lost.

        Without ``seen``, from the stream leader (``consistent``: on NATS a consumer
        placed on it, which on a replicated medium under load costs up to a second).
        With ``seen`` (the revision of a write of ours, such as our latest partition
        claim) from any replica that holds that revision: a replica that applied it
        applied every write acknowledged before it (revisions grow with the bucket), so
        it holds every payload a previous holder stored before our claim ended its right
        to write. A replica further behind is not used: the leader is asked instead.
        ``seen=0``: any replica will do.

        Records are never deleted here (a deleted worker leaves a tombstone), so a record
        the mirror held that the listing no longer has was lost by the medium (a server
        restarted with an empty store): the caller reports it, never silently resets it.

        Every settle reloads, and a manager has many thousands of records: the loop yields
        now and then, so a node's heartbeat never waits for a reload. Records are decoded
        afresh each time: a worker may have changed a payload object in place, and a
        takeover must start from what is stored, never from what is in memory.
        """
        mirror: dict[Any, Stored] = {}
        entries = await self.kv.entries(consistent=seen is None)
        self.loaded_from = "leader" if seen is None else "replica"
        if seen and max((e.revision for e in entries.values()), default=0) < seen:
            entries = await self.kv.entries(consistent=True)  # that replica lags behind
            self.loaded_from = "leader, a replica lagged"
        for count, entry in enumerate(entries.values(), 1):
            if is_claim_key(entry.key):
                continue  # a partition claim (same bucket, for the medium's guard check)
            stored = self._decode(entry.key, entry.revision, entry.value)
            if stored is not None:
                mirror[stored.id] = stored
            if not count % _LOAD_YIELD_EVERY:
                await asyncio.sleep(0)
        lost = self.mirror.keys() - mirror.keys()
        self.mirror = mirror
        return lost

    def _decode(self, key: str, revision: int, data: bytes) -> Stored | None:
        try:
            stored = Stored.decode(data, self.keyring)
            check_worker_id(stored.id)  # 8.0 is not worker 8, a list is no id at all
            return stored
        except (WireFormatError, InvalidIdError) as exc:
            if not self._reported.first(key, revision):
                return None
            self.bad_records += 1
            log.warning("ignoring a malformed stored worker (key %s): %s", key[:100], exc)
            return None

    async def write(self, stored: Stored, *, guarded: bool = True) -> None:
        """Write one record now (runtime put/delete, halt, re-key).

        ``guarded`` (with a fencing): only as the claimant of its partition, else
        :class:`FencedError`. Unguarded writes are for records any node may write (the
        spec record of a ``put``/``delete``, written by its caller).
        """
        async with self._writing:
            self.dirty.pop(stored.id, None)
            partition, guard = -1, None
            if guarded and self.fencing is not None:
                partition, guard = self.fencing.guard_of(stored.id)
                if guard is None:
                    raise UnclaimedError(
                        f"worker {stored.id!r}: this node holds no claim on partition "
                        f"{partition}; its record was not written (the owner writes it)"
                    )
            data = stored.encode(self.keyring)
            if self.max_value is not None and len(data) > self.max_value:
                raise MessageTooLargeError(
                    f"worker {stored.id!r:.80}: its record is {len(data)} bytes encoded, more "
                    f"than the {self.max_value} the medium stores in one message"
                )
            try:
                await self.kv.put(storage_key(stored.id), data, guard=guard)
            except FencedWriteError:
                assert guard is not None and self.fencing is not None
                self.fencing.refused(partition, guard, 1)
                raise
            self.mirror[stored.id] = stored

    def _encoded(self, stored: Stored) -> bytes | None:
        """The record's bytes, or None (reported) when it cannot be stored."""
        try:
            data = stored.encode(self.keyring)
        except WireFormatError as exc:
            why = f"its payload cannot be encoded ({exc})"
        else:
            if self.max_value is None or len(data) <= self.max_value:
                return data
            why = (
                f"its record is {len(data)} bytes encoded, more than the {self.max_value} "
                "the medium stores in one message"
            )
        previous = self.mirror.get(stored.id)
        after = 0 if previous is None else previous.watermark
        reason = f"state of worker {stored.id!r:.80} not stored: {why}; kept the previous one"
        known = self.unstorable.get(stored.id)
        if known is not None:
            after = min(after, known.after)
        self.unstorable[stored.id] = Unstorable(after, max(stored.watermark, after), reason)
        self.unstorable_records += 1
        log.warning("%s", reason)
        if self.on_unstorable is not None:
            self.on_unstorable(stored.id, previous)
        return None

    def take_unstorable(self, worker_id: Any) -> Unstorable | None:
        """The unstorable report of ``worker_id``, forgotten once taken."""
        return self.unstorable.pop(worker_id, None)

    def mark(self, stored: Stored) -> None:
        """Queue a replaced payload for the next flush.

        A record that names no spec keeps the runtime spec the worker's record had (a
        ``put`` or a permanent ``Timeout``): the payload is replaced, not the spec.
        """
        if stored.spec is None and not stored.deleted:
            previous = self.dirty.get(stored.id) or self.mirror.get(stored.id)
            if previous is not None and previous.spec is not None and not previous.deleted:
                stored = dataclasses.replace(stored, spec=previous.spec)
        self.dirty[stored.id] = stored

    async def flush(self, ids: Any = None) -> None:
        """Write queued payloads (only those of ``ids`` when given)."""
        async with self._writing:
            await self._flush(ids)

    async def _flush(self, ids: Any) -> None:
        if ids is None:
            batch, self.dirty = self.dirty, {}
        else:
            batch = {i: self.dirty.pop(i) for i in ids if i in self.dirty}
        if not batch:
            return
        if self.fencing is None:
            await self._put_batch(batch)
            return
        await self._flush_fenced(batch, self.fencing)

    async def _flush_fenced(self, batch: dict[Any, Stored], fencing: Fencing) -> None:
        """Write ``batch`` in one ``put_many``, each record guarded by its partition's
        claim: the cost of a flush stays one round trip, however many partitions it spans.
        A refusal names the guards that failed: their records are dropped (reported to
        the fencing) and the rest, whose claims hold, are written again."""
        items: dict[str, bytes] = {}
        guards: dict[str, Guard] = {}
        pending: dict[str, Stored] = {}  # storage key -> record
        covered: dict[str, tuple[int, Guard, list[str]]] = {}  # guard key -> its records
        unclaimed: set[int] = set()
        for worker_id, stored in batch.items():
            partition, guard = fencing.guard_of(worker_id)
            if guard is None:
                unclaimed.add(partition)  # not ours (any more): dropped, never written
                continue
            data = self._encoded(stored)
            if data is None:
                continue
            key = storage_key(worker_id)
            items[key], guards[key], pending[key] = data, guard, stored
            covered.setdefault(guard.key, (partition, guard, []))[2].append(key)
        fenced: set[int] = set()
        cause: FencedError | None = None
        unavailable: Exception | None = None
        while items:
            try:
                await self.kv.put_many(items, guards=guards)
            except FencedWriteError as exc:
                cause = exc
                named = [covered.pop(k) for k in exc.failed if k in covered]
                if not named:  # names none of our guards (no backend does): drop, never loop
                    raise
                for partition, guard, keys in named:
                    for key in keys:
                        del items[key], guards[key], pending[key]
                    fenced.add(partition)
                    fencing.refused(partition, guard, len(keys))
                continue  # the others' claims held: they are written, not lost with them
            except BaseException as exc:
                for stored in pending.values():  # keep what was not written
                    self.dirty.setdefault(stored.id, stored)
                if not isinstance(exc, Exception):
                    raise
                unavailable = exc
                break
            self.mirror.update({stored.id: stored for stored in pending.values()})
            break
        if unclaimed:
            log.debug("records of unclaimed partition(s) %s dropped", sorted(unclaimed))
            cause = cause or UnclaimedError(
                f"partition(s) {sorted(unclaimed)}: no claim held, records not written"
            )
        if cause is not None:
            raise PartitionsFencedError(fenced | unclaimed, cause, unavailable)
        if unavailable is not None:
            raise unavailable

    async def _put_batch(self, batch: dict[Any, Stored]) -> None:
        items = {}
        for worker_id, stored in list(batch.items()):
            data = self._encoded(stored)
            if data is None:
                del batch[worker_id]
            else:
                items[storage_key(stored.id)] = data
        if not items:
            return
        try:
            # One batch (atomic where the backend can): a round trip, not one per worker.
            await self.kv.put_many(items)
            self.mirror.update(batch)
        except BaseException:
            for worker_id, stored in batch.items():  # keep what was not written
                self.dirty.setdefault(worker_id, stored)
            raise
