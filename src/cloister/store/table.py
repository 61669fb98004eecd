"""Replicated tables: the cluster's mnesia, without the rebuild.

``table = await cluster.table("carts")`` opens the table ``carts`` of the cluster — the same
table from every node. It is one backend bucket, ``tbl-<name>``, used through the backend
protocol's :class:`~cloister.backends.KeyValue` only, so it behaves alike on every backend:

- **Keys** are pycloister keys (``str``, ``bytes``, ``int``, tuples of them), stored as
  dotted tokens, one per byte (:mod:`cloister.store.table_keys`): exact and reversible,
  so :meth:`Table.keys` gives back ``("tenant", 7)``, not a string, and a key prefix is
  a prefix of whole tokens — what NATS can filter subjects on.
- **Queries** — :meth:`Table.select`, :meth:`Table.count` and :meth:`Table.watch` take a
  ``prefix`` (a ``str`` for string keys, ``bytes`` for bytes keys, a ``tuple`` for the
  tuple keys that start with its elements) that the medium filters on: selecting the 100
  keys under a prefix of a 100,000-key table reads those 100 (on NATS, a direct get
  filtered on the subjects ``$KV.<bucket>.k.<prefix tokens>.>``), not the table. ``where``
  then filters the rest on the node, as a match spec of :func:`mnesia:select` would.
- **Values** are anything :mod:`cloister.wire` encodes (msgpack; never pickle).
- **Durability** is the medium's: a write returns once the backend acknowledged it (on
  NATS: stored by JetStream on ``replicas`` servers; on memory: in the shared world).
  Nodes keep no copy of their own, so a node crash loses nothing that was acknowledged,
  and a topology change needs no rebuild step — there is nothing to rebuild.
- **Reads** go to the medium. On NATS with replicas > 1 a read is answered by any
  replica, and one that lags behind the quorum answers with older data until it catches
  up (seen in the tests right after a server was killed): the write is not lost, only
  not visible there yet. :meth:`Table.update` is never fooled by a stale read, because
  its write is a compare-and-set on the revision it read.
- **update(key, fn)** reads, applies ``fn`` and compare-and-sets, again and again (with
  jittered exponential backoff) until its write wins, at most ``attempts`` times; then
  :class:`UpdateConflictError`. It retries only lost compare-and-sets: when the write
  itself fails (:class:`~cloister.errors.BackendError`, e.g. the medium is unreachable)
  the error is raised, since the write may or may not have landed and running ``fn``
  again could apply it twice.
- **watch()** delivers the changes made from then on, by any node. Like the bucket's own
  watch it can end or go silent while the medium is unreachable (on NATS it raises
  :class:`~cloister.errors.BackendUnavailableError` after a reconnect): watch again with
  ``initial=True`` to get the current contents first.

Records in the bucket that this module did not write (a key or value it cannot decode)
are skipped by listings and watches, logged and counted in :attr:`Table.bad_records`;
:meth:`Table.get` of such a key raises :class:`~cloister.errors.WireFormatError`.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import random
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Final, final

from cloister import schema
from cloister._quiet import Once
from cloister.backends._names import MAX_COMPONENT
from cloister.backends.base import Backend, Entry, KeyValue, KVEvent, KVOp
from cloister.errors import (
    ConfigurationError,
    KeyExistsError,
    RevisionMismatchError,
    WireFormatError,
)
from cloister.ring import Key
from cloister.schema import UNSIGNED, Keyring
from cloister.store.table_keys import (
    MAX_KEY_LENGTH,
    decode_table_key,
    encode_table_key,
    table_prefix,
)

log = logging.getLogger("cloister.store.table")

BUCKET_PREFIX: Final = "tbl-"
"""A table's bucket is ``tbl-<name>``: no other bucket of a cluster starts so (the others
are ``members``, ``control``, ``mgr-<manager>`` and ``dead-<inbox>``), and the backend
names the bucket after its cluster injectively (:mod:`cloister.backends._names`)."""

MAX_TABLE_NAME: Final = MAX_COMPONENT - len(BUCKET_PREFIX)
TABLE_NAME: Final = re.compile(rf"^[A-Za-z0-9_-]{{1,{MAX_TABLE_NAME}}}$")
"""What a table name may be (the bucket ``tbl-<name>`` must fit every backend)."""

_KEY_TYPES_HINT = "table keys must be str, bytes, int (not bool) or tuples of them"


class UpdateConflictError(RevisionMismatchError):
    """:meth:`Table.update` lost the compare-and-set on every one of its attempts."""


class TableOp(enum.StrEnum):
    """What happened to a key, as a table watcher sees it."""

    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class TableEvent:
    """One change of a table: ``value`` is None when ``op`` is :attr:`TableOp.DELETE`.

    ``revision`` grows with every change of the table (not only of this key).
    """

    key: Key
    value: Any
    op: TableOp
    revision: int


@final
class _Delete:
    """The type of :attr:`Table.DELETE`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Table.DELETE"


_DELETE: Final = _Delete()


def check_table_name(name: str) -> None:
    """Raise :class:`ConfigurationError` unless ``name`` is a valid table name."""
    if not isinstance(name, str) or not TABLE_NAME.match(name):
        raise ConfigurationError(
            f"invalid table name {name!r}: use 1-{MAX_TABLE_NAME} characters of [A-Za-z0-9_-]"
        )


def _check_key(key: Any, whole: Any) -> None:
    if isinstance(key, tuple):
        for part in key:
            _check_key(part, whole)
    elif not isinstance(key, str | bytes | int) or isinstance(key, bool):
        raise ConfigurationError(
            f"invalid table key {whole!r}: {type(key).__name__} is not allowed; {_KEY_TYPES_HINT}"
        )


class Table:
    """One replicated table of a cluster. Open it with ``await cluster.table(name)``.

    Every method talks to the backend; nothing is cached, so every node sees every
    acknowledged write. Errors of the medium surface as
    :class:`~cloister.errors.BackendError` (for example
    :class:`~cloister.errors.BackendUnavailableError` while it is unreachable).

    Args:
        kv: the bucket holding the table (``tbl-<name>``).
        name: the table's name.
        keyring: the cluster secret values are sealed with and checked against.
        attempts: how many times :meth:`update` tries before it gives up.
        backoff: (first, longest) pause in seconds between two tries of :meth:`update`;
            the pause doubles after each lost try, and a random part of it is taken.
    """

    DELETE: ClassVar[_Delete] = _DELETE
    """Return this from an :meth:`update` function to delete the key."""

    def __init__(
        self,
        kv: KeyValue,
        name: str,
        *,
        attempts: int = 100,
        backoff: tuple[float, float] = (0.002, 0.25),
        keyring: Keyring = UNSIGNED,
    ) -> None:
        check_table_name(name)
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ConfigurationError(f"attempts must be a whole number >= 1, got {attempts!r}")
        first, longest = backoff
        if not 0 < first <= longest:
            raise ConfigurationError(
                f"backoff must be (first, longest) with 0 < first <= longest, got {backoff!r}"
            )
        self.name = name
        self.kv = kv
        self.keyring = keyring
        self.attempts = attempts
        self.backoff = (float(first), float(longest))
        #: Records found in the bucket that could not be decoded (skipped, logged).
        self.bad_records = 0
        self._reported = Once()  # bad records met in listings, reported once each

    def __repr__(self) -> str:
        return f"<Table {self.name!r} on bucket {self.kv.name!r}>"

    # -- reads ----------------------------------------------------------------------------

    async def get(self, key: Key, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` when the table has no such key."""
        entry = await self.kv.get(self._bucket_key(key))
        return default if entry is None else self._value(key, entry)

    async def keys(self, *, prefix: Key | None = None) -> list[Key]:
        """Every key of the table (under ``prefix``, see :meth:`select`), in no particular
        order."""
        return [key for key, _entry in await self._listing(prefix)]

    async def items(self) -> dict[Key, Any]:
        """The whole table as a dict (one consistent listing of the bucket)."""
        found: dict[Key, Any] = {}
        for key, entry in await self._listing():
            try:
                found[key] = self._value(key, entry)
            except WireFormatError as exc:
                self._bad(exc, key=str(key), revision=entry.revision)
        return found

    async def size(self) -> int:
        """How many keys the table has."""
        return await self.count()

    async def count(self, *, prefix: Key | None = None) -> int:
        """How many keys the table has under ``prefix`` (see :meth:`select`); the medium
        reads only those."""
        return len(await self._listing(prefix))

    def select(
        self,
        prefix: Key | None = None,
        where: Callable[[Key, Any], bool] | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[tuple[Key, Any]]:
        """The ``(key, value)`` pairs under ``prefix`` that ``where`` accepts, at most ``limit``.

        ``async for key, value in table.select(prefix="user:", where=lambda k, v: v["vip"])``.

        ``prefix`` is filtered by the medium: ``None`` is the whole table; a ``str``
        selects the string keys that start with it, a ``bytes`` the bytes keys that start
        with it, a ``tuple`` the tuple keys whose first elements equal its elements
        (``("tenant", 7)`` selects ``("tenant", 7, "a")``, ``("tenant", 7)`` itself, not
        ``("tenant", 70)``). ``where(key, value)`` runs on this node over what the medium
        sent. Pairs come from one listing of the matching keys, in a fixed order (that of
        their stored spelling, not the keys' own order); ``limit`` stops after that many
        accepted pairs.
        """
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise ConfigurationError(f"limit must be a whole number or None, got {limit!r}")
        if limit is not None and limit < 0:
            raise ConfigurationError(f"limit must be >= 0, got {limit}")
        table_prefix(prefix)  # a bad prefix fails here, not at the first iteration
        return self._select(prefix, where, limit)

    async def _select(
        self,
        prefix: Key | None,
        where: Callable[[Key, Any], bool] | None,
        limit: int | None,
    ) -> AsyncIterator[tuple[Key, Any]]:
        if limit == 0:
            return
        listing = sorted(await self._listing(prefix), key=lambda found: found[1].key)
        given = 0
        for key, entry in listing:
            if limit is not None and given >= limit:
                return
            try:
                value = self._value(key, entry)
            except WireFormatError as exc:
                self._bad(exc)
                continue
            if where is None or where(key, value):
                given += 1
                yield key, value

    # -- writes ---------------------------------------------------------------------------

    async def put(self, key: Key, value: Any) -> None:
        """Store ``value`` under ``key`` (returns once the backend acknowledged it)."""
        await self.kv.put(self._bucket_key(key), self._encode(key, value))

    async def delete(self, key: Key) -> None:
        """Remove ``key``; nothing happens when it is absent."""
        await self.kv.delete(self._bucket_key(key))

    async def update(self, key: Key, fn: Callable[[Any], Any], default: Any = None) -> Any:
        """Replace the value of ``key`` by ``fn(old)``, atomically; return the new value.

        ``old`` is the current value, or ``default`` when the key is absent. ``fn`` may be
        a plain or an ``async`` function; it may run several times (once per try), so it
        should only compute. Returning :attr:`Table.DELETE` deletes the key (then
        ``default`` is returned). The write is a compare-and-set on the revision read:
        when another writer got in between, the whole read-compute-write is tried again
        after a jittered, growing pause, up to :attr:`attempts` times, and then
        :class:`UpdateConflictError` is raised. Errors of ``fn`` and of the backend are
        raised as they are, without another try.
        """
        stored_key = self._bucket_key(key)
        first, longest = self.backoff
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(random.uniform(0, min(longest, first * 2 ** (attempt - 1))))
            entry = await self.kv.get(stored_key)
            old = default if entry is None else self._value(key, entry)
            new = fn(old)
            if inspect.isawaitable(new):
                new = await new
            try:
                if new is _DELETE:
                    if entry is not None:
                        await self.kv.delete(stored_key, revision=entry.revision)
                    return default
                data = self._encode(key, new)
                if entry is None:
                    await self.kv.create(stored_key, data)
                else:
                    await self.kv.update(stored_key, data, revision=entry.revision)
                return new
            except (KeyExistsError, RevisionMismatchError):
                continue  # another writer won this round
        raise UpdateConflictError(
            f"update of key {key!r} in table {self.name!r} lost the compare-and-set "
            f"{self.attempts} times in a row: the key is written too often to update it "
            "now; try again later, spread the writes over more keys, or raise attempts"
        )

    # -- watch ----------------------------------------------------------------------------

    def watch(
        self, *, prefix: Key | None = None, initial: bool = False
    ) -> AbstractAsyncContextManager[AsyncIterator[TableEvent]]:
        """Live changes by any node: ``async with table.watch() as events: async for ...``.

        Changes made from the moment the context is entered are delivered in order. With
        ``initial=True`` the table's current contents come first, as ``put`` events, and
        then every later change, with none missed or repeated in between (a key deleted
        while the contents were read may show up as a ``delete`` only). ``prefix`` (as
        for :meth:`select`) limits both to the keys under it, filtered by the medium.
        """
        return self._watch(self._medium_prefix(prefix), initial)

    @asynccontextmanager
    async def _watch(self, prefix: str, initial: bool) -> AsyncIterator[AsyncIterator[TableEvent]]:
        async with self.kv.watch(prefix=prefix) as events:
            yield self._events(events, prefix, initial)

    async def _events(
        self, events: AsyncIterator[KVEvent], prefix: str, initial: bool
    ) -> AsyncIterator[TableEvent]:
        # Watch first, then list: a change made while listing may show up in both. The
        # listing's revisions tell which watch events it already covers; once an event is
        # newer than the whole listing, every later one is too.
        listed: dict[str, int] | None = None
        horizon = 0
        if initial:
            snapshot = await self.kv.entries(prefix=prefix)
            listed = {name: entry.revision for name, entry in snapshot.items()}
            horizon = max(listed.values(), default=0)
            for entry in sorted(snapshot.values(), key=lambda e: e.revision):
                event = self._event(KVEvent(KVOp.PUT, entry.key, entry.value, entry.revision))
                if event is not None:
                    yield event
        async for raw in events:
            if listed is not None:
                if raw.revision <= listed.get(raw.key, 0):
                    continue
                if raw.revision > horizon:
                    listed = None
            event = self._event(raw)
            if event is not None:
                yield event

    # -- internals ------------------------------------------------------------------------

    def _bucket_key(self, key: Key) -> str:
        _check_key(key, key)
        stored = encode_table_key(key)
        if len(stored) > MAX_KEY_LENGTH:
            raise ConfigurationError(
                f"table key {key!r} is too long for table {self.name!r}: its encoding has "
                f"{len(stored)} characters, at most {MAX_KEY_LENGTH}; use a shorter key"
            )
        return stored

    def _encode(self, key: Key, value: Any) -> bytes:
        try:
            return schema.encode(schema.TABLE, value, self.keyring)
        except WireFormatError as exc:
            raise WireFormatError(
                f"table {self.name!r}: cannot store the value of key {key!r}: {exc}"
            ) from exc

    def _value(self, key: Key, entry: Entry) -> Any:
        try:
            return schema.decode(schema.TABLE, entry.value, self.keyring)
        except WireFormatError as exc:
            raise type(exc)(
                f"table {self.name!r}: the stored value of key {key!r} is refused ({exc}); "
                "it was not written by a cloister table of this cluster"
            ) from exc

    def _decode_key(self, stored: str) -> Key:
        key = decode_table_key(stored)
        _check_key(key, key)
        return key  # type: ignore[no-any-return]

    @staticmethod
    def _medium_prefix(prefix: Key | None) -> str:
        # No prefix lists the whole bucket, so that foreign records are still seen (and
        # counted in bad_records) rather than silently filtered away.
        return "" if prefix is None else table_prefix(prefix)

    async def _listing(self, prefix: Key | None = None) -> list[tuple[Key, Entry]]:
        found: list[tuple[Key, Entry]] = []
        for stored, entry in (await self.kv.entries(prefix=self._medium_prefix(prefix))).items():
            try:
                found.append((self._decode_key(stored), entry))
            except (WireFormatError, ConfigurationError) as exc:
                self._bad(exc, key=stored, revision=entry.revision)
        return found

    def _event(self, raw: KVEvent) -> TableEvent | None:
        try:
            key = self._decode_key(raw.key)
            if raw.op is KVOp.PUT and raw.value is not None:
                value = schema.decode(schema.TABLE, raw.value, self.keyring)
                return TableEvent(key, value, TableOp.PUT, raw.revision)
            return TableEvent(key, None, TableOp.DELETE, raw.revision)
        except (WireFormatError, ConfigurationError) as exc:
            self._bad(exc)
            return None

    def _bad(self, exc: Exception, *, key: str | None = None, revision: int = 0) -> None:
        """Count and log a record that cannot be decoded; one met in a listing (``key``
        and ``revision``) only the first time, not on every listing."""
        if key is not None and not self._reported.first(key, revision):
            return
        self.bad_records += 1
        log.warning("table %s: skipping a record it cannot decode: %s", self.name, exc)


async def open_table(backend: Backend, name: str, *, replicas: int | None = None) -> Table:
    """Open (creating if needed) the table ``name`` on ``backend``: bucket ``tbl-<name>``.

    ``replicas`` asks for that many copies of the table where the backend supports it per
    bucket; ``None`` takes the backend's default.
    """
    check_table_name(name)
    if replicas is not None and (
        isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1
    ):
        raise ConfigurationError(f"replicas must be a whole number >= 1, got {replicas!r}")
    bucket = BUCKET_PREFIX + name
    if replicas is None:
        return Table(await backend.kv(bucket), name, keyring=backend.keyring)
    if "replicas" in inspect.signature(backend.kv).parameters:
        open_kv: Callable[..., Any] = backend.kv
        return Table(await open_kv(bucket, replicas=replicas), name, keyring=backend.keyring)
    log.warning(
        "backend %s does not take replicas per bucket: replicas=%d of table %r is ignored "
        "(where the backend has a replicas option of its own, that one applies)",
        backend.url,
        replicas,
        name,
    )
    return Table(await backend.kv(bucket), name, keyring=backend.keyring)
