"""A cloister bucket on JetStream: a KV-shaped stream with per-message TTL.

Layout (compatible with the ``nats kv`` tools): bucket ``cloister_<cluster>_<name>`` is
the stream ``KV_cloister_<cluster>_<name>`` on subjects ``$KV.<bucket>.<key>``, with one
message kept per subject (``history=1``), direct gets allowed and per-message TTL on.
Every bucket also gets a *limit marker TTL*: when a key's TTL runs
out the server writes a marker message (header ``Nats-Marker-Reason: MaxAge``) that
watchers see, and removes the marker itself after ``marker_ttl`` seconds. Markers must
live long (60 s by default): a watcher that was silent for a while still sees them.

Mapping of the contract:

- revision = the stream sequence of the key's message (strictly increasing per bucket);
- ``create`` = publish with ``Nats-Expected-Last-Subject-Sequence: 0``; over a delete
  tombstone or an expiry marker, with the marker's sequence instead;
- ``update`` = publish expecting the given revision (``Nats-TTL`` restarts the TTL);
- ``delete`` = a ``KV-Operation: DEL`` tombstone;
- ``put_many`` = atomic batches (ADR-50, nats-server 2.12+, the stream has
  ``allow_atomic``): the first message is a request the server answers when the batch
  starts, the rest are plain publishes, the last one commits and gets the pub ack. All
  keys of a batch are stored or none; one round trip per batch instead of one per key.
  Older servers get pipelined single puts;
- ``entries`` = a batched direct get of every message of the stream (history 1 means
  the stream holds exactly the last message of each key), markers and tombstones
  dropped; with ``consistent=True`` an ephemeral ``LAST_PER_SUBJECT`` pull consumer
  instead (a consumer works on the stream leader's store, a direct get may be answered
  by a lagging follower), and ``get(consistent=True)`` uses the message-get API;
- ``watch`` = an ordered push consumer delivering only new messages.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import nats.errors
import nats.js.errors
from nats.js import api

from cloister.backends.base import Entry, KeyValue, KVEvent, KVOp
from cloister.backends.nats._errors import (
    ATOMIC_PUBLISH_DISABLED,
    ATOMIC_PUBLISH_NOT_NOW,
    ATOMIC_PUBLISH_SINCE,
    NO_RESPONDERS,
    STREAM_NAME_IN_USE,
    WRONG_LAST_SEQUENCE,
    WrongLastSequence,
    translate,
)
from cloister.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
    KeyExistsError,
    RevisionMismatchError,
)

if TYPE_CHECKING:
    from cloister.backends.nats._backend import NatsBackend

log = logging.getLogger("cloister.backends.nats")
T = TypeVar("T")

EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
MSG_TTL = "Nats-TTL"
KV_OPERATION = "KV-Operation"
MARKER_REASON = "Nats-Marker-Reason"
BATCH_ID = "Nats-Batch-Id"
BATCH_SEQUENCE = "Nats-Batch-Sequence"
BATCH_COMMIT = "Nats-Batch-Commit"
#: The server takes at most this many messages in one atomic batch.
ATOMIC_BATCH_LIMIT = 1000
_BATCH = 1000
#: How many consumers a consistent listing creates to get one on the stream leader.
_PLACEMENT_TRIES = 12
#: How long an operation keeps retrying "no responders" (a stream between leaders) before
#: it gives up with BackendUnavailableError and leaves the retrying to the caller.
NO_RESPONDERS_RETRY = 0.5

# Keys become subject tokens: dots separate non-empty tokens.
_KEY = re.compile(r"^[A-Za-z0-9_=-]+(?:\.[A-Za-z0-9_=-]+)*$")
_NATS_ERRORS = (nats.errors.Error, OSError, asyncio.TimeoutError)


async def retrying(attempt: Callable[[], Awaitable[T]], budget: float) -> T:
    """Run ``attempt``, again while JetStream has no responders, for up to ``budget`` s.

    "No responders" means nobody received the request, so repeating it is always safe
    (nats-py never retries it); it is what a stream shows for a moment between leaders.
    """
    deadline = time.monotonic() + budget
    pause = 0.02
    while True:
        try:
            return await attempt()
        except NO_RESPONDERS:
            if time.monotonic() + pause > deadline:
                raise
            await asyncio.sleep(pause)
            pause = min(2 * pause, 0.2)


def check_key(key: str) -> None:
    """Raise :class:`ConfigurationError` for a key NATS cannot carry as a subject."""
    if not isinstance(key, str) or not _KEY.match(key):
        raise ConfigurationError(
            f"invalid key {key!r}: use a non-empty string of [A-Za-z0-9_=.-] that neither "
            "starts nor ends with '.' and has no '..'"
        )


def ttl_seconds(ttl: float) -> int:
    """NATS takes whole seconds (at least 1): round a TTL up, never down."""
    if not ttl > 0:
        raise ConfigurationError(f"ttl must be > 0 seconds, got {ttl!r}")
    return max(1, math.ceil(ttl))


def classify(headers: Mapping[str, str] | None) -> KVOp:
    """What a stored message means: a value (PUT), a tombstone (DELETE) or an expiry."""
    if headers:
        if headers.get(KV_OPERATION) in ("DEL", "PURGE"):
            return KVOp.DELETE
        reason = headers.get(MARKER_REASON)
        if reason == "MaxAge":
            return KVOp.EXPIRE
        if reason is not None:  # "Purge", "Remove": somebody removed it on purpose
            return KVOp.DELETE
    return KVOp.PUT


def stream_config(
    bucket: str, *, replicas: int, marker_ttl: float, atomic: bool = False
) -> api.StreamConfig:
    """The stream behind a bucket (what ``nats kv add --history 1 --ttl-markers`` makes),
    with atomic batch publishing allowed when ``atomic`` (nats-server 2.12+)."""
    return api.StreamConfig(
        name=f"KV_{bucket}",
        subjects=[f"$KV.{bucket}.>"],
        retention=api.RetentionPolicy.LIMITS,
        max_consumers=-1,
        max_msgs=-1,
        max_bytes=-1,
        max_age=0,
        max_msgs_per_subject=1,
        max_msg_size=-1,
        discard=api.DiscardPolicy.NEW,
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=120,
        allow_direct=True,
        allow_rollup_hdrs=True,
        deny_delete=True,
        allow_msg_ttl=True,
        subject_delete_marker_ttl=marker_ttl,
        allow_atomic=True if atomic else None,
    )


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

    def __init__(self, backend: NatsBackend, name: str, bucket: str) -> None:
        self.name = name
        self.bucket = bucket
        self.stream = f"KV_{bucket}"
        self._prefix = f"$KV.{bucket}."
        self._backend = backend
        self._atomic = True  # until the stream says it is not (see put_many)

    def __repr__(self) -> str:
        return f"<NatsKV {self.bucket} of {self._backend.url}>"

    @property
    def _retry_budget(self) -> float:
        return min(NO_RESPONDERS_RETRY, self._backend.options.op_timeout)

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
        js = self._backend._jetstream(f"get {key!r}")
        try:
            msg = await retrying(
                lambda: js.get_msg(self.stream, subject=self._prefix + key, direct=not consistent),
                self._retry_budget,
            )
        except nats.js.errors.NotFoundError:
            return None
        except _NATS_ERRORS as exc:
            what = f"get {key!r} from bucket {self.name!r}"
            raise translate(exc, what, self._backend.url) from exc
        return int(msg.seq or 0), bytes(msg.data or b""), msg.headers

    async def entries(self, *, consistent: bool = False) -> dict[str, Entry]:
        """Every live key: batched direct gets (a few ms for ~100 keys), or with
        ``consistent`` a consumer on the stream leader (see :meth:`_consistent_entries`)."""
        if consistent:
            return await self._consistent_entries()
        found: dict[str, Entry] = {}
        start = 1
        while True:
            messages, pending = await self._batch(start)
            for msg in messages:
                headers = msg.headers or {}
                subject = headers.get("Nats-Subject", "")
                seq = int(headers.get("Nats-Sequence", "0"))
                start = max(start, seq + 1)
                self._apply(found, subject, bytes(msg.data), seq, headers)
            if not messages or pending == 0:
                return found

    def _apply(
        self,
        found: dict[str, Entry],
        subject: str,
        data: bytes,
        seq: int,
        headers: Mapping[str, str] | None,
    ) -> None:
        """Fold one stored message into a listing: a value sets its key, anything else
        (tombstone, purge, expiry marker) removes it."""
        if not subject.startswith(self._prefix):
            return
        key = subject[len(self._prefix) :]
        if classify(headers) is KVOp.PUT:
            found[key] = Entry(key, data, seq)
        else:
            found.pop(key, None)

    async def _consistent_entries(self) -> dict[str, Entry]:
        """Every live key as the stream leader stores it.

        An ephemeral pull consumer delivering the last message of every key
        (``LAST_PER_SUBJECT``), read in batches of ``_BATCH`` until nothing is pending.
        A consumer reads the store of the server it runs on, and the server places an R1
        consumer on any replica of the stream (measured: a third of them on the leader),
        so a consumer that did not land on the leader is replaced; after
        ``_PLACEMENT_TRIES`` misses the leader is walked key by key instead (correct,
        but one round trip per key). Writes made while we read arrive after the snapshot,
        in stream order, and are folded in like the rest.
        """
        what = f"list bucket {self.name!r} (consistent)"
        js = self._backend._jetstream(what)
        nc = self._backend._client(what)
        op_timeout = self._backend.options.op_timeout
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=api.AckPolicy.NONE,
            filter_subject=f"{self._prefix}>",
            mem_storage=True,
            num_replicas=1,
            max_ack_pending=-1,
            # Removed by us when done; the server drops it by itself should we vanish.
            inactive_threshold=max(5.0, 2 * op_timeout),
        )
        try:
            # Only the stream leader answers stream info (a follower never does).
            stream = await retrying(lambda: js.stream_info(self.stream), self._retry_budget)
            leader = stream.cluster.leader if stream.cluster is not None else None
            for _ in range(_PLACEMENT_TRIES):
                info = await retrying(
                    lambda: js.add_consumer(self.stream, config=config, timeout=op_timeout),
                    self._retry_budget,
                )
                placed = info.cluster.leader if info.cluster is not None else None
                if leader is None or placed == leader:
                    break
                await self._drop_consumer(nc, str(info.name))
            else:
                return await self._walk_leader(js, what)
        except _NATS_ERRORS as exc:
            raise translate(exc, what, self._backend.url) from exc
        consumer = str(info.name)
        found: dict[str, Entry] = {}
        try:
            pending = int(info.num_pending or 0)
            while pending > 0:
                try:
                    messages = await retrying(
                        lambda: self._pull_once(nc, consumer), self._retry_budget
                    )
                except _NATS_ERRORS as exc:
                    raise translate(exc, what, self._backend.url) from exc
                if not messages:
                    break  # the leader has nothing more to deliver
                for msg in messages:
                    meta = msg.metadata
                    self._apply(
                        found, msg.subject, bytes(msg.data), int(meta.sequence.stream), msg.headers
                    )
                pending = int(messages[-1].metadata.num_pending)
        finally:
            await self._drop_consumer(nc, consumer)
        return found

    async def _drop_consumer(self, nc: Any, consumer: str) -> None:
        """Ask for ``consumer``'s removal without waiting (inactive_threshold backs it up)."""
        with suppress(*_NATS_ERRORS):
            await nc.publish(f"$JS.API.CONSUMER.DELETE.{self.stream}.{consumer}", b"")

    async def _walk_leader(self, js: Any, what: str) -> dict[str, Entry]:
        """Every live key, one leader-answered message get per stored message."""
        found: dict[str, Entry] = {}
        start = 1
        while True:
            try:
                msg = await retrying(
                    lambda start=start: js.get_msg(  # type: ignore[misc]
                        self.stream, seq=start, subject=f"{self._prefix}>", next=True
                    ),
                    self._retry_budget,
                )
            except nats.js.errors.NotFoundError:
                return found
            seq = int(msg.seq or 0)
            self._apply(found, str(msg.subject), bytes(msg.data or b""), seq, msg.headers)
            start = seq + 1

    async def _pull_once(self, nc: Any, consumer: str) -> list[Any]:
        """One pull of up to ``_BATCH`` messages from ``consumer`` (no waiting for more)."""
        request = {"batch": _BATCH, "no_wait": True}
        messages: list[Any] = []
        sub = await nc.subscribe(nc.new_inbox())
        try:
            await nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{consumer}",
                json.dumps(request).encode(),
                reply=sub.subject,
            )
            while len(messages) < _BATCH:
                msg = await sub.next_msg(timeout=self._backend.options.op_timeout)
                headers = msg.headers or {}
                status = headers.get("Status")
                if status is None and msg.reply:
                    messages.append(msg)
                elif status in ("404", "408") and messages:
                    break  # end of what is there now
                elif status in ("404", "408"):
                    return messages  # nothing at all to deliver
                elif status == "503":
                    raise nats.errors.NoRespondersError
                elif status == "100":
                    continue  # idle heartbeat or flow control
                elif status == "409":  # e.g. leadership change, consumer deleted
                    raise BackendUnavailableError(
                        f"list bucket {self.name!r}: pull from the leader interrupted: "
                        f"{headers.get('Description', '')}; try again"
                    )
                else:
                    description = headers.get("Description", "")
                    raise BackendError(
                        f"list bucket {self.name!r}: pull from the leader failed: "
                        f"{status} {description}"
                    )
            return messages
        finally:
            with suppress(*_NATS_ERRORS):
                await sub.unsubscribe()

    async def _batch(self, start: int) -> tuple[list[Any], int]:
        """One direct-get batch from sequence ``start``: (messages, how many remain)."""
        what = f"list bucket {self.name!r}"
        nc = self._backend._client(what)
        try:
            return await retrying(lambda: self._batch_once(nc, start), self._retry_budget)
        except _NATS_ERRORS as exc:
            raise translate(exc, what, self._backend.url) from exc

    async def _batch_once(self, nc: Any, start: int) -> tuple[list[Any], int]:
        request = {"seq": start, "batch": _BATCH, "next_by_subj": f"{self._prefix}>"}
        messages: list[Any] = []
        sub = await nc.subscribe(nc.new_inbox())
        try:
            await nc.publish(
                f"$JS.API.DIRECT.GET.{self.stream}", json.dumps(request).encode(), reply=sub.subject
            )
            while True:
                msg = await sub.next_msg(timeout=self._backend.options.op_timeout)
                headers = msg.headers or {}
                status = headers.get("Status")
                if status is None:
                    messages.append(msg)
                elif status == "204":  # end of batch
                    return messages, int(headers.get("Nats-Num-Pending", "0"))
                elif status == "404":  # nothing (more) to read
                    return messages, 0
                elif status == "503":  # no replica answers direct gets right now
                    raise nats.errors.NoRespondersError
                else:
                    description = headers.get("Description", "")
                    raise BackendError(
                        f"list bucket {self.name!r}: direct get failed: {status} {description}"
                    )
        finally:
            with suppress(*_NATS_ERRORS):
                await sub.unsubscribe()

    # -- writes -----------------------------------------------------------------------

    async def put(self, key: str, value: bytes) -> int:
        check_key(key)
        return await self._publish(key, value, {}, f"put {key!r}")

    async def put_many(self, items: Mapping[str, bytes]) -> None:
        for key in items:
            check_key(key)
        pairs = [(key, bytes(value)) for key, value in items.items()]
        for start in range(0, len(pairs), ATOMIC_BATCH_LIMIT):
            chunk = pairs[start : start + ATOMIC_BATCH_LIMIT]
            if (
                len(chunk) > 1
                and self._atomic
                and self._backend._server_at_least(ATOMIC_PUBLISH_SINCE)
            ):
                what = f"put {len(chunk)} keys in bucket {self.name!r}"
                try:
                    await retrying(
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
                except _NATS_ERRORS as exc:
                    raise translate(exc, what, self._backend.url) from exc
            await super().put_many(dict(chunk))

    async def _publish_batch(self, chunk: list[tuple[str, bytes]]) -> None:
        """Store ``chunk`` as one atomic batch (a fresh batch id on every attempt)."""
        what = f"put {len(chunk)} keys in bucket {self.name!r}"
        nc = self._backend._client(what)
        timeout = self._backend.options.op_timeout
        batch = uuid.uuid4().hex
        last = len(chunk)
        for number, (key, value) in enumerate(chunk, 1):
            headers = {BATCH_ID: batch, BATCH_SEQUENCE: str(number)}
            if number == last:
                headers[BATCH_COMMIT] = "1"
            if 1 < number < last:
                await nc.publish(self._prefix + key, value, headers=headers)
                continue
            # The first message starts the batch (an empty reply, or an error); the last
            # commits it and is answered with the pub ack of the whole batch.
            reply = await nc.request(self._prefix + key, value, timeout=timeout, headers=headers)
            if not reply.data:
                continue
            answer = json.loads(reply.data)
            error = answer.get("error") if isinstance(answer, dict) else None
            if error:
                code = error.get("err_code")
                if code == ATOMIC_PUBLISH_DISABLED or code in ATOMIC_PUBLISH_NOT_NOW:
                    raise AtomicBatchRefused(
                        str(error.get("description", code)),
                        disabled=code == ATOMIC_PUBLISH_DISABLED,
                    )
                raise BackendError(
                    f"{what}: the server refused the batch ({error.get('description', error)}); "
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
        js = self._backend._jetstream(what)
        try:
            ack = await retrying(
                lambda: js.publish(
                    self._prefix + key,
                    bytes(value),
                    timeout=self._backend.options.op_timeout,
                    headers=dict(headers) or None,  # nats-py adds to the dict it gets
                ),
                self._retry_budget,
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code in WRONG_LAST_SEQUENCE:
                raise WrongLastSequence(exc.description or "wrong last sequence") from None
            raise translate(exc, what, self._backend.url) from exc
        except _NATS_ERRORS as exc:
            raise translate(exc, what, self._backend.url) from exc
        return int(ack.seq)

    # -- watch ------------------------------------------------------------------------

    def watch(self) -> AbstractAsyncContextManager[AsyncIterator[KVEvent]]:
        """Changes from now on. Ends with :class:`BackendUnavailableError` after a reconnect.

        When the connection to NATS comes back, every watch of the backend raises
        :class:`BackendUnavailableError` (after the events already received): watch again
        and re-list with :meth:`entries`, as after any outage.
        """
        return self._watch()

    @asynccontextmanager
    async def _watch(self) -> AsyncIterator[AsyncIterator[KVEvent]]:
        what = f"watch bucket {self.name!r}"
        js = self._backend._jetstream(what)
        try:
            # Everything up to here is for entries() to report; a NEW consumer only
            # delivers later messages, and a consumer that nats-py re-creates after a gap
            # may replay older ones: the revision filter drops those.
            info = await retrying(lambda: js.stream_info(self.stream), self._retry_budget)
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

            psub = await retrying(
                lambda: js.subscribe(
                    f"{self._prefix}>",
                    stream=self.stream,
                    cb=on_message,
                    ordered_consumer=True,
                    deliver_policy=api.DeliverPolicy.NEW,
                    idle_heartbeat=self._backend.options.watch_heartbeat,
                ),
                self._retry_budget,
            )
        except _NATS_ERRORS as exc:
            raise translate(exc, what, self._backend.url) from exc
        self._backend._watches.add(feed)
        try:
            yield _events(feed)
        finally:
            self._backend._watches.discard(feed)
            with suppress(*_NATS_ERRORS):
                await psub.unsubscribe()


async def stream_info(
    backend: NatsBackend, name: str, what: str, *, subjects_filter: str | None = None
) -> api.StreamInfo | None:
    """``name``'s stream info (None when there is no such stream), retried while unanswered.

    A stream that is being created, or is between leaders, may leave an info request
    unanswered or without responders for a moment: ask again, with short timeouts, for up
    to ``2 * op_timeout``.
    """
    nc = backend._client(what)
    op_timeout = backend.options.op_timeout
    deadline = time.monotonic() + 2 * op_timeout
    attempt = min(0.5, op_timeout)
    while True:
        js = nc.jetstream(timeout=attempt)
        try:
            return await js.stream_info(name, subjects_filter=subjects_filter)
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.TimeoutError, *NO_RESPONDERS) as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0.05:
                raise translate(exc, what, backend.url) from exc
            if isinstance(exc, NO_RESPONDERS):
                await asyncio.sleep(min(0.1, remaining / 2))
            attempt = max(0.05, min(2 * attempt, op_timeout, deadline - time.monotonic()))
        except _NATS_ERRORS as exc:
            raise translate(exc, what, backend.url) from exc


async def wait_for_leader(backend: NatsBackend, info: api.StreamInfo, what: str) -> None:
    """Return once a replicated stream has a leader (bounded by ``op_timeout``).

    A stream another node has just created exists before its first leader is elected;
    until then every read and write of it meets "no responders". After the bound we
    return anyway and leave the retrying to the operations.
    """
    name = info.config.name
    deadline = time.monotonic() + backend.options.op_timeout
    pause = 0.02
    while info.cluster is not None and not info.cluster.leader:
        if time.monotonic() + pause > deadline:
            log.debug("stream %s still has no leader; going on", name)
            return
        await asyncio.sleep(pause)
        pause = min(2 * pause, 0.2)
        found = await stream_info(backend, str(name), what)
        if found is None:
            return
        info = found


async def open_stream(
    backend: NatsBackend, wanted: api.StreamConfig, what: str
) -> tuple[api.StreamInfo, bool]:
    """The info of stream ``wanted.name``, creating it if absent; True when we created it.

    Several nodes may open the same stream at once, and a replicated stream can take
    longer than ``op_timeout`` to create on a busy cluster: a create that met "name in
    use" or went unanswered is followed by a (retried) look at what is there now.
    """
    name = str(wanted.name)
    js = backend._jetstream(what)
    info = await stream_info(backend, name, what)
    if info is not None:
        return info, False
    try:
        info = await js.add_stream(wanted)
        log.debug("created stream %s (replicas %s)", name, wanted.num_replicas)
        return info, True
    except nats.js.errors.APIError as exc:
        if exc.err_code != STREAM_NAME_IN_USE:
            raise translate(exc, what, backend.url) from exc
    except nats.errors.TimeoutError:
        log.debug("creating stream %s went unanswered; looking again", name)
    except _NATS_ERRORS as exc:
        raise translate(exc, what, backend.url) from exc
    info = await stream_info(backend, name, what)
    if info is None:
        raise BackendUnavailableError(f"{what}: stream {name} could not be created; try again")
    return info, False


async def ensure_stream(backend: NatsBackend, bucket: str) -> bool:
    """Create the bucket's stream, or bring an existing one up to what we need.

    Returns True when the stream had to be created. Either way the stream answers reads
    on return (or ``op_timeout`` passed waiting for it).
    """
    what = f"open bucket {bucket!r}"
    replicas, marker_ttl = backend.options.replicas, backend.options.marker_ttl
    atomic = backend._server_at_least(ATOMIC_PUBLISH_SINCE)
    wanted = stream_config(bucket, replicas=replicas, marker_ttl=marker_ttl, atomic=atomic)
    info, created = await open_stream(backend, wanted, what)
    try:
        if not created:
            await _adjust(backend._jetstream(what), info.config, replicas, marker_ttl, atomic)
        await wait_for_leader(backend, info, what)
        await _wait_for_reads(backend, f"KV_{bucket}", f"$KV.{bucket}.", what)
    except _NATS_ERRORS as exc:
        raise translate(exc, what, backend.url) from exc
    return created


async def _wait_for_reads(backend: NatsBackend, stream: str, prefix: str, what: str) -> None:
    """Wait (up to ``op_timeout``) until a direct get of the stream is answered.

    A new leader takes a moment more to serve direct gets; a first ``get`` then met "no
    responders".
    """
    js = backend._jetstream(what)
    deadline = time.monotonic() + backend.options.op_timeout
    pause = 0.02
    while True:
        try:
            await js.get_msg(stream, subject=f"{prefix}_cloister_probe", direct=True)
            return
        except nats.js.errors.NotFoundError:
            return
        except NO_RESPONDERS:
            if time.monotonic() + pause > deadline:
                log.debug("stream %s does not answer direct gets yet; going on", stream)
                return
            await asyncio.sleep(pause)
            pause = min(2 * pause, 0.2)


async def _adjust(
    js: Any, config: api.StreamConfig, replicas: int, marker_ttl: float, atomic: bool
) -> None:
    """Bring an existing bucket stream up to what we need (or refuse it clearly)."""
    name = config.name
    if config.max_msgs_per_subject != 1:
        raise BackendError(
            f"stream {name} exists with history {config.max_msgs_per_subject}; pycloister "
            "needs history 1. Remove it (nats stream rm) or use another cluster name."
        )
    changes: dict[str, Any] = {}
    if not config.allow_msg_ttl:
        changes["allow_msg_ttl"] = True
    if not config.allow_direct:
        changes["allow_direct"] = True
    if not config.subject_delete_marker_ttl:
        changes["subject_delete_marker_ttl"] = marker_ttl
    if atomic and not config.allow_atomic:
        changes["allow_atomic"] = True
    if changes:
        log.info("updating stream %s: %s", name, changes)
        await js.update_stream(config.evolve(**changes))
    if config.num_replicas != replicas:
        log.info(
            "stream %s has %s replica(s), not the %d asked for; keeping it",
            name,
            config.num_replicas,
            replicas,
        )
