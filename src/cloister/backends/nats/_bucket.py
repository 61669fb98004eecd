"""The stream behind a cloister bucket: its layout, and opening it.

Layout (compatible with the ``nats kv`` tools): a cluster's bucket is the NATS bucket
:func:`~cloister.backends._names.bucket_name` (``cloister_<len>_<cluster>_2_kv_<len>_<name>``,
never shared by two clusters): the stream ``KV_<bucket>`` on subjects ``$KV.<bucket>.<key>``,
with one message kept per subject (``history=1``), direct gets allowed and per-message TTL on.
Every bucket also gets a *limit marker TTL*: when a key's TTL runs
out the server writes a marker message (header ``Nats-Marker-Reason: MaxAge``) that
watchers see, and removes the marker itself after ``marker_ttl`` seconds. Markers must
live long (60 s by default): a watcher that was silent for a while still sees them.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import Any

import nats.js.errors
from nats.js import api

from cloister.backends.base import KVOp
from cloister.backends.nats._connection import NatsConnection
from cloister.backends.nats._errors import (
    ATOMIC_PUBLISH_SINCE,
    NATS_ERRORS,
    NO_RESPONDERS,
    translate,
)
from cloister.backends.nats._streams import (
    QUICK_BACKOFF,
    open_stream,
    retry_while_unavailable,
    wait_for_leader,
)
from cloister.errors import BackendError, ConfigurationError

log = logging.getLogger("cloister.backends.nats")

EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
#: With it, the expected last sequence is checked on this subject instead of the one
#: published to (nats-server 2.11+): how a write is guarded by another key's revision.
EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
MSG_TTL = "Nats-TTL"
KV_OPERATION = "KV-Operation"
MARKER_REASON = "Nats-Marker-Reason"

# Keys become subject tokens: dots separate non-empty tokens.
_KEY = re.compile(r"^[A-Za-z0-9_=-]+(?:\.[A-Za-z0-9_=-]+)*$")


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


async def ensure_stream(conn: NatsConnection, bucket: str) -> bool:
    """Create the bucket's stream, or bring an existing one up to what we need.

    Returns True when the stream had to be created. Either way the stream answers reads
    on return (or ``op_timeout`` passed waiting for it).
    """
    what = f"open bucket {bucket!r}"
    replicas, marker_ttl = conn.options.replicas, conn.options.marker_ttl
    atomic = conn.server_at_least(ATOMIC_PUBLISH_SINCE)
    wanted = stream_config(bucket, replicas=replicas, marker_ttl=marker_ttl, atomic=atomic)
    info, created = await open_stream(conn, wanted, what)
    try:
        if not created:
            await _adjust(conn.jetstream(what), info.config, replicas, marker_ttl, atomic)
        await wait_for_leader(conn, info, what)
        await _wait_for_reads(conn, f"KV_{bucket}", f"$KV.{bucket}.", what)
    except NATS_ERRORS as exc:
        raise translate(exc, what, conn.url) from exc
    return created


async def _wait_for_reads(conn: NatsConnection, stream: str, prefix: str, what: str) -> None:
    """Wait (up to ``op_timeout``) until a direct get of the stream is answered.

    A new leader takes a moment more to serve direct gets; a first ``get`` then met "no
    responders".
    """
    js = conn.jetstream(what)

    async def probe() -> None:
        try:
            await js.get_msg(stream, subject=f"{prefix}_cloister_probe", direct=True)
        except nats.js.errors.NotFoundError:
            return  # answered: there is just no such key

    try:
        await retry_while_unavailable(probe, conn.options.op_timeout, backoff=QUICK_BACKOFF)
    except NO_RESPONDERS:
        log.debug("stream %s does not answer direct gets yet; going on", stream)


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
