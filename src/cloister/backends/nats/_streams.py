"""JetStream streams: open one, read its info, wait for its leader — and retry meanwhile.

A stream between leaders (an election after a server died, or a stream another node has
just created) answers nothing for a few seconds: requests meet "no responders" or time
out. :func:`retry_while_unavailable` is the one loop that repeats an operation through
such a gap, for a bounded time and paced by a :class:`~cloister._backoff.Backoff`; every
bucket and log operation that retries goes through it, with the budget and pacing of
its kind (the ``*_BACKOFF`` constants below).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.js import api

from cloister._backoff import Backoff
from cloister.backends.nats._connection import NatsConnection
from cloister.backends.nats._errors import NATS_ERRORS, NO_RESPONDERS, STREAM_NAME_IN_USE, translate
from cloister.errors import BackendUnavailableError

log = logging.getLogger("cloister.backends.nats")
T = TypeVar("T")

# Only delays() of these shared values is used: it starts a fresh sequence each time.
#: Pacing of quick operations (KV reads and writes) through "no responders".
QUICK_BACKOFF = Backoff(0.02, 0.2)
#: Pacing of operations that may wait for a consumer's own leader (log appends, claims).
PATIENT_BACKOFF = Backoff(0.05, 0.5)
#: Pacing of stream info requests that met "no responders" (a timeout is retried at once).
INFO_BACKOFF = Backoff(0.1, 0.1)

#: How long a KV operation keeps retrying "no responders" (a stream between leaders) before
#: it gives up with BackendUnavailableError and leaves the retrying to the caller.
NO_RESPONDERS_RETRY = 0.5


async def retry_while_unavailable(
    op: Callable[[], Awaitable[T]],
    budget: float,
    *,
    on: tuple[type[BaseException], ...] = NO_RESPONDERS,
    backoff: Backoff = QUICK_BACKOFF,
    at_once: tuple[type[BaseException], ...] = (),
    stop: Callable[[], bool] | None = None,
) -> T:
    """Run ``op``, again while it fails with one of ``on``, for up to ``budget`` seconds.

    Each retry waits the next delay of ``backoff`` (none after an exception of
    ``at_once``: a timeout already spent its time waiting); when that wait would end past
    the budget, or ``stop()`` is true (the backend is closing), the last exception is
    raised as it is and the caller translates it. The default, "no responders", means
    nobody received the request, so repeating it is always safe (nats-py never retries
    it); ``op`` must be safe to repeat for whatever else ``on`` names.
    """
    deadline = time.monotonic() + budget
    delays = backoff.delays()
    while True:
        try:
            return await op()
        except on as exc:
            pause = 0.0 if isinstance(exc, at_once) else next(delays)
            if (stop is not None and stop()) or time.monotonic() + pause > deadline:
                raise
            if pause:
                await asyncio.sleep(pause)


async def stream_info(
    conn: NatsConnection, name: str, what: str, *, subjects_filter: str | None = None
) -> api.StreamInfo | None:
    """``name``'s stream info (None when there is no such stream), retried while unanswered.

    A stream that is being created, or is between leaders, may leave an info request
    unanswered or without responders for a moment: ask again, with short timeouts (from
    0.5 s, doubling up to ``op_timeout``), for up to ``2 * op_timeout``.
    """
    nc = conn.client(what)
    op_timeout = conn.options.op_timeout
    budget = 2 * op_timeout
    deadline = time.monotonic() + budget
    timeouts = Backoff(min(0.5, op_timeout), op_timeout).delays()

    async def ask() -> api.StreamInfo | None:
        remaining = deadline - time.monotonic()
        js = nc.jetstream(timeout=max(0.05, min(next(timeouts), remaining)))
        try:
            info: api.StreamInfo = await js.stream_info(name, subjects_filter=subjects_filter)
        except nats.js.errors.NotFoundError:
            return None
        return info

    try:
        return await retry_while_unavailable(
            ask,
            budget,
            on=(nats.errors.TimeoutError, *NO_RESPONDERS),
            backoff=INFO_BACKOFF,
            at_once=(nats.errors.TimeoutError,),
        )
    except NATS_ERRORS as exc:
        raise translate(exc, what, conn.url) from exc


async def wait_for_leader(conn: NatsConnection, info: api.StreamInfo, what: str) -> None:
    """Return once a replicated stream has a leader (bounded by ``op_timeout``).

    A stream another node has just created exists before its first leader is elected;
    until then every read and write of it meets "no responders". After the bound we
    return anyway and leave the retrying to the operations.
    """
    # A poll of a condition, not a retry of a failing call: paced by the same backoff
    # as the quick retries, but outside retry_while_unavailable.
    name = info.config.name
    deadline = time.monotonic() + conn.options.op_timeout
    delays = QUICK_BACKOFF.delays()
    while info.cluster is not None and not info.cluster.leader:
        pause = next(delays)
        if time.monotonic() + pause > deadline:
            log.debug("stream %s still has no leader; going on", name)
            return
        await asyncio.sleep(pause)
        found = await stream_info(conn, str(name), what)
        if found is None:
            return
        info = found


async def open_stream(
    conn: NatsConnection, wanted: api.StreamConfig, what: str
) -> tuple[api.StreamInfo, bool]:
    """The info of stream ``wanted.name``, creating it if absent; True when we created it.

    Several nodes may open the same stream at once, and a replicated stream can take
    longer than ``op_timeout`` to create on a busy cluster: a create that met "name in
    use" or went unanswered is followed by a (retried) look at what is there now.
    """
    name = str(wanted.name)
    js = conn.jetstream(what)
    info = await stream_info(conn, name, what)
    if info is not None:
        return info, False
    try:
        info = await js.add_stream(wanted)
        log.debug("created stream %s (replicas %s)", name, wanted.num_replicas)
        return info, True
    except nats.js.errors.APIError as exc:
        if exc.err_code != STREAM_NAME_IN_USE:
            raise translate(exc, what, conn.url) from exc
    except nats.errors.TimeoutError:
        log.debug("creating stream %s went unanswered; looking again", name)
    except NATS_ERRORS as exc:
        raise translate(exc, what, conn.url) from exc
    info = await stream_info(conn, name, what)
    if info is None:
        raise BackendUnavailableError(f"{what}: stream {name} could not be created; try again")
    return info, False
