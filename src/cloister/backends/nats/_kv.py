"""A cloister bucket on JetStream: a KV-shaped stream with per-message TTL.

The stream's layout, and opening it, are in :mod:`._bucket`; listing in :mod:`._kv_listing`.

Mapping of the contract:

- revision = the stream sequence of the key's message (strictly increasing per bucket);
- ``create`` = publish with ``Nats-Expected-Last-Subject-Sequence: 0``; over a delete
  tombstone or an expiry marker, with the marker's sequence instead;
- ``update`` = publish expecting the given revision (``Nats-TTL`` restarts the TTL);
- ``delete`` = a ``KV-Operation: DEL`` tombstone;
- ``put_many`` = atomic batches (ADR-50, nats-server 2.12+, the stream has
  ``allow_atomic``): every message but the last is a plain publish; the last one
  commits and gets the pub ack of the batch, or the error that refused it (a guard that
  failed on any message, atomic publish disabled: measured on nats-server 2.12+, the
  commit's reply says so). All keys of a batch are stored or none; one round trip per
  batch instead of one per key.
  Older servers get pipelined single puts;
- a :class:`~cloister.backends.Guard` = headers ``Nats-Expected-Last-Subject-Sequence:
  <revision>`` and ``Nats-Expected-Last-Subject-Sequence-Subject: $KV.<bucket>.<guard
  key>`` on every message written (each message of a batch its own key's guard: the
  server refuses the whole batch when one fails, error 10071), so the server checks the
  guard key's last sequence atomically with the write. A refusal is
  :class:`~cloister.errors.FencedWriteError`, never retried;
- ``entries`` = a batched direct get of every message of the stream (history 1 means
  the stream holds exactly the last message of each key), markers and tombstones
  dropped; with ``consistent=True`` an ephemeral ``LAST_PER_SUBJECT`` pull consumer
  instead (a consumer works on the stream leader's store, a direct get may be answered
  by a lagging follower), and ``get(consistent=True)`` uses the message-get API; a
  ``prefix`` becomes the subject filter ``$KV.<bucket>.<prefix>>`` of either, so the
  server sends only the keys under it;
- ``watch`` = an ordered push consumer delivering only new messages (of the subjects
  under ``prefix``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import nats.js.errors
from nats.js import api

from cloister.backends.base import Entry, Guard, KeyValue, KVEvent, KVOp, check_prefix
from cloister.backends.nats._bucket import (
    EXPECTED_LAST_SUBJECT_SEQUENCE,
    EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT,
    KV_OPERATION,
    MSG_TTL,
    check_key,
    classify,
    ttl_seconds,
)
from cloister.backends.nats._connection import NatsConnection
from cloister.backends.nats._errors import (
    ATOMIC_PUBLISH_DISABLED,
    ATOMIC_PUBLISH_NOT_NOW,
    ATOMIC_PUBLISH_SINCE,
    NATS_ERRORS,
    WRONG_LAST_SEQUENCE,
    WrongLastSequence,
    translate,
)
from cloister.backends.nats._kv_listing import BucketLister
from cloister.backends.nats._streams import NO_RESPONDERS_RETRY, retry_while_unavailable
from cloister.errors import (
    BackendError,
    FencedWriteError,
    KeyExistsError,
    RevisionMismatchError,
)

log = logging.getLogger("cloister.backends.nats")

BATCH_ID = "Nats-Batch-Id"
BATCH_SEQUENCE = "Nats-Batch-Sequence"
BATCH_COMMIT = "Nats-Batch-Commit"
#: The server takes at most this many messages in one atomic batch.
ATOMIC_BATCH_LIMIT = 1000


class AtomicBatchRefused(Exception):
    """Internal: the server stored nothing of an atomic batch and will not take it as one:
    never (``disabled``: the stream lacks allow_atomic) or not now (limits)."""

    def __init__(self, reason: str, *, disabled: bool) -> None:
        super().__init__(reason)
        self.disabled = disabled


@dataclass(eq=False, slots=True)
class WatchFeed:
    """One live watch: where its events go, and the newest revision it delivered."""

    last: int
    queue: asyncio.Queue[KVEvent | BackendError] = field(default_factory=asyncio.Queue)

    def interrupt(self, error: BackendError) -> None:
        """End the watch: its iterator raises ``error`` after the events already queued."""
        self.queue.put_nowait(error)


async def _events(feed: WatchFeed) -> AsyncIterator[KVEvent]:
    while True:
        item = await feed.queue.get()
        if isinstance(item, BackendError):
            raise item
        yield item


class NatsKV(KeyValue):
    """A bucket of one cluster on JetStream (see the module docstring for the layout)."""

    def __init__(
        self, conn: NatsConnection, name: str, bucket: str, watches: set[WatchFeed]
    ) -> None:
        self.name = name
        self.bucket = bucket
        self.stream = f"KV_{bucket}"
        self._prefix = f"$KV.{bucket}."
        self._conn = conn
        self._watches = watches  # the backend's: it ends them all on reconnect and close
        self._lister = BucketLister(conn, name, self.stream, self._prefix)
        self._atomic = True  # until the stream says it is not (see put_many)

    def __repr__(self) -> str:
        return f"<NatsKV {self.bucket} of {self._conn.url}>"

    @property
    def _retry_budget(self) -> float:
        return min(NO_RESPONDERS_RETRY, self._conn.options.op_timeout)

    # -- reads ------------------------------------------------------------------------

    async def get(self, key: str, *, consistent: bool = False) -> Entry | None:
        check_key(key)
        found = await self._last(key, consistent=consistent)
        if found is None or classify(found[2]) is not KVOp.PUT:
            return None
        return Entry(key, found[1], found[0])

    async def _last(
        self, key: str, *, consistent: bool = False
    ) -> tuple[int, bytes, Mapping[str, str] | None] | None:
        """The last message stored for ``key`` (value, tombstone or marker), or None.

        A direct get may be answered by any replica (a follower can lag); ``consistent``
        asks the stream leader with the message-get API instead.
        """
        js = self._conn.jetstream(f"get {key!r}")
        try:
            msg = await retry_while_unavailable(
                lambda: js.get_msg(self.stream, subject=self._prefix + key, direct=not consistent),
                self._retry_budget,
            )
        except nats.js.errors.NotFoundError:
            return None
        except NATS_ERRORS as exc:
            what = f"get {key!r} from bucket {self.name!r}"
            raise translate(exc, what, self._conn.url) from exc
        return int(msg.seq or 0), bytes(msg.data or b""), msg.headers

    async def entries(self, *, consistent: bool = False, prefix: str = "") -> dict[str, Entry]:
        """Every live key: batched direct gets (a few ms for ~100 keys), or with
        ``consistent`` a consumer on the stream leader (see :mod:`._kv_listing`); with
        ``prefix`` both filter on the subject ``$KV.<bucket>.<prefix>>``, so the server
        sends only the matching keys."""
        check_prefix(prefix)
        if consistent:
            found = await self._lister.consistent_entries(prefix)
        else:
            found = await self._lister.entries(prefix)
        self.entries_read = self._lister.messages_read
        return found

    # -- writes -----------------------------------------------------------------------

    def _guard_headers(self, guard: Guard | None) -> dict[str, str]:
        if guard is None:
            return {}
        check_key(guard.key)
        return {
            EXPECTED_LAST_SUBJECT_SEQUENCE: str(guard.revision),
            EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT: self._prefix + guard.key,
        }

    async def _fenced(self, used: set[Guard], description: str, what: str) -> FencedWriteError:
        """The error for a write refused by one of ``used``: the server names no subject,
        only a sequence ("wrong last sequence: 7"), so with several guards their keys are
        read to tell which failed (a refused writer's path: rare, never hot)."""
        if len(used) == 1:
            (guard,) = used
            tail = description.rsplit(":", 1)[-1].strip()
            actual = int(tail) if tail.isdigit() else None
            return FencedWriteError(self.name, {guard.key: (guard.revision, actual)}, what)
        guards = sorted(used, key=lambda g: g.key)
        lasts = await asyncio.gather(
            *(self._last(g.key, consistent=True) for g in guards), return_exceptions=True
        )
        failed: dict[str, tuple[int, int | None]] = {}
        for guard, last in zip(guards, lasts, strict=True):
            actual = None if isinstance(last, BaseException) else 0 if last is None else last[0]
            if actual != guard.revision:  # unreadable counts as failed: nothing is assumed
                failed[guard.key] = (guard.revision, actual)
        if not failed:  # revisions only grow: a guard that failed cannot hold again
            raise BackendError(f"{what}: refused ({description}), yet every guard holds now")
        return FencedWriteError(self.name, failed, what)

    async def put(self, key: str, value: bytes, *, guard: Guard | None = None) -> int:
        check_key(key)
        what = f"put {key!r}"
        try:
            return await self._publish(key, value, self._guard_headers(guard), what)
        except WrongLastSequence as exc:
            assert guard is not None  # only a guard sets an expected sequence here
            raise await self._fenced({guard}, str(exc), f"{what} in bucket {self.name!r}") from None

    async def put_many(
        self,
        items: Mapping[str, bytes],
        *,
        guard: Guard | None = None,
        guards: Mapping[str, Guard] | None = None,
    ) -> None:
        for key in items:
            check_key(key)
        chosen = guards or {}
        headers: dict[Guard | None, dict[str, str]] = {}  # built once per distinct guard
        pairs = []
        for key, value in items.items():
            used = chosen.get(key, guard)
            found = headers.get(used)
            if found is None:
                found = headers[used] = self._guard_headers(used)
            pairs.append((key, bytes(value), found, used))
        for start in range(0, len(pairs), ATOMIC_BATCH_LIMIT):
            chunk = pairs[start : start + ATOMIC_BATCH_LIMIT]
            if len(chunk) > 1 and self._atomic and self._conn.server_at_least(ATOMIC_PUBLISH_SINCE):
                what = f"put {len(chunk)} keys in bucket {self.name!r}"
                try:
                    await retry_while_unavailable(
                        functools.partial(self._publish_batch, chunk), self._retry_budget
                    )
                    continue
                except AtomicBatchRefused as refused:
                    if refused.disabled:
                        log.info(
                            "stream %s refuses atomic batches; putting keys one by one",
                            self.stream,
                        )
                        self._atomic = False
                    else:  # this batch one by one; the next ones atomic again
                        log.debug("stream %s: %s; putting keys one by one", self.stream, refused)
                except WrongLastSequence as exc:  # only guards set an expected sequence
                    used_guards = {g for *_, g in chunk if g is not None}
                    raise await self._fenced(used_guards, str(exc), what) from None
                except NATS_ERRORS as exc:
                    raise translate(exc, what, self._conn.url) from exc
            # Key by key, each put carrying its guard.
            await super().put_many(
                {key: value for key, value, *_ in chunk}, guard=guard, guards=guards
            )

    async def _publish_batch(
        self, chunk: Sequence[tuple[str, bytes, Mapping[str, str], Guard | None]]
    ) -> None:
        """Store ``chunk`` as one atomic batch (a fresh batch id on every attempt), each
        message carrying its guard's headers: one failed check refuses the whole batch."""
        what = f"put {len(chunk)} keys in bucket {self.name!r}"
        nc = self._conn.client(what)
        timeout = self._conn.options.op_timeout
        batch = uuid.uuid4().hex
        last = len(chunk)
        for number, (key, value, guarding, _) in enumerate(chunk, 1):
            headers = {**guarding, BATCH_ID: batch, BATCH_SEQUENCE: str(number)}
            if number < last:
                await nc.publish(self._prefix + key, value, headers=headers)
                continue
            # The last commits the batch and is answered for all of it: the pub ack, or
            # the error that refused it (whichever message it was found on).
            headers[BATCH_COMMIT] = "1"
            reply = await nc.request(self._prefix + key, value, timeout=timeout, headers=headers)
            if not reply.data:
                raise BackendError(f"{what}: the server answered the commit with nothing")
            answer = json.loads(reply.data)
            error = answer.get("error") if isinstance(answer, dict) else None
            if error:
                code = error.get("err_code")
                if code in WRONG_LAST_SEQUENCE:  # a guard failed: nothing was stored
                    raise WrongLastSequence(str(error.get("description", code)))
                if code == ATOMIC_PUBLISH_DISABLED or code in ATOMIC_PUBLISH_NOT_NOW:
                    raise AtomicBatchRefused(
                        str(error.get("description", code)),
                        disabled=code == ATOMIC_PUBLISH_DISABLED,
                    )
                raise BackendError(
                    f"{what}: the server refused the batch ({error.get('description', error)}, "
                    f"code {code}); "
                    "nothing of it was stored, writing it again may help"
                )

    async def create(self, key: str, value: bytes, *, ttl: float | None = None) -> int:
        check_key(key)
        headers = {} if ttl is None else {MSG_TTL: str(ttl_seconds(ttl))}
        expected = 0
        for _ in range(3):
            try:
                return await self._publish(
                    key, value, {**headers, EXPECTED_LAST_SUBJECT_SEQUENCE: str(expected)}, "create"
                )
            except WrongLastSequence:
                # Maybe a tombstone or an expiry marker is in the way: then the key is
                # absent, and we may write over exactly that marker.
                last = await self._last(key, consistent=True)
                if last is not None and classify(last[2]) is KVOp.PUT:
                    break
                expected = 0 if last is None else last[0]
        raise KeyExistsError(f"key {key!r} already exists in bucket {self.name!r}")

    async def update(
        self, key: str, value: bytes, *, revision: int, ttl: float | None = None
    ) -> int:
        check_key(key)
        headers = {EXPECTED_LAST_SUBJECT_SEQUENCE: str(int(revision))}
        if ttl is not None:
            headers[MSG_TTL] = str(ttl_seconds(ttl))
        try:
            return await self._publish(key, value, headers, "update")
        except WrongLastSequence as exc:
            raise RevisionMismatchError(
                f"key {key!r} in bucket {self.name!r} is no longer at revision {revision} ({exc})"
            ) from None

    async def delete(self, key: str, *, revision: int | None = None) -> None:
        check_key(key)
        headers = {KV_OPERATION: "DEL"}
        if revision is None:
            if await self.get(key, consistent=True) is None:
                return  # already absent: no tombstone, no event (as in memory)
        else:
            headers[EXPECTED_LAST_SUBJECT_SEQUENCE] = str(int(revision))
        try:
            await self._publish(key, b"", headers, "delete")
        except WrongLastSequence as exc:
            raise RevisionMismatchError(
                f"key {key!r} in bucket {self.name!r} is no longer at revision {revision} ({exc})"
            ) from None

    async def _publish(self, key: str, value: bytes, headers: dict[str, str], what: str) -> int:
        what = f"{what} {key!r} in bucket {self.name!r}"
        js = self._conn.jetstream(what)
        try:
            ack = await retry_while_unavailable(
                lambda: js.publish(
                    self._prefix + key,
                    bytes(value),
                    timeout=self._conn.options.op_timeout,
                    headers=dict(headers) or None,  # nats-py adds to the dict it gets
                ),
                self._retry_budget,
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code in WRONG_LAST_SEQUENCE:
                raise WrongLastSequence(exc.description or "wrong last sequence") from None
            raise translate(exc, what, self._conn.url) from exc
        except NATS_ERRORS as exc:
            raise translate(exc, what, self._conn.url) from exc
        return int(ack.seq)

    # -- watch ------------------------------------------------------------------------

    def watch(self, *, prefix: str = "") -> AbstractAsyncContextManager[AsyncIterator[KVEvent]]:
        """Changes from now on. Ends with :class:`BackendUnavailableError` after a reconnect.

        When the connection to NATS comes back, every watch of the backend raises
        :class:`BackendUnavailableError` (after the events already received): watch again
        and re-list with :meth:`entries`, as after any outage.
        """
        check_prefix(prefix)
        return self._watch(prefix)

    @asynccontextmanager
    async def _watch(self, prefix: str) -> AsyncIterator[AsyncIterator[KVEvent]]:
        what = f"watch bucket {self.name!r}"
        js = self._conn.jetstream(what)
        try:
            # Everything up to here is for entries() to report; a NEW consumer only
            # delivers later messages, and a consumer that nats-py re-creates after a gap
            # may replay older ones: the revision filter drops those.
            info = await retry_while_unavailable(
                lambda: js.stream_info(self.stream), self._retry_budget
            )
            feed = WatchFeed(last=int(info.state.last_seq or 0))

            async def on_message(msg: Any) -> None:
                revision = int(msg.metadata.sequence.stream)
                if revision <= feed.last:
                    return
                feed.last = revision
                op = classify(msg.headers)
                key = msg.subject[len(self._prefix) :]
                value = bytes(msg.data) if op is KVOp.PUT else None
                feed.queue.put_nowait(KVEvent(op, key, value, revision))

            psub = await retry_while_unavailable(
                lambda: js.subscribe(
                    f"{self._prefix}{prefix}>",
                    stream=self.stream,
                    cb=on_message,
                    ordered_consumer=True,
                    deliver_policy=api.DeliverPolicy.NEW,
                    idle_heartbeat=self._conn.options.watch_heartbeat,
                ),
                self._retry_budget,
            )
        except NATS_ERRORS as exc:
            raise translate(exc, what, self._conn.url) from exc
        self._watches.add(feed)
        try:
            yield _events(feed)
        finally:
            self._watches.discard(feed)
            with suppress(*NATS_ERRORS):
                await psub.unsubscribe()
