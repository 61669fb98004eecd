"""Pipelined JetStream publishes written as ready-made protocol frames, acked per batch.

``NatsLog.append_many`` sends a whole batch before it waits for any acknowledgement.
Through nats-py's ``publish_async`` each record costs, besides the bytes: a semaphore
acquire, a NUID and random reply token, a future with a done-callback, the header dict
serialized (a regex per key), the subject validated; and each acknowledgement a JSON
parse into a ``PubAck`` dataclass and a future resolved. Profiled on a 1,000-record
``cast_many``, that was nearly two thirds of the client's CPU, and on a machine whose cores the
server shares it is throughput lost.

:class:`FramedPublisher` writes the batch's ``HPUB`` frames itself — the ``Nats-Msg-Id``
header is a few bytes of an f-string — into nats-py's write buffer, in chunks, and takes
the acknowledgements on one wildcard subscription of its own (replies
``<inbox>.<batch>.<n>``): each ack is a sequence read out of the JSON and a slot of a
list filled; one future per batch is resolved when every record has an answer.

The contract is that of ``publish_async``: an answer per record (its sequence, or None
when the server refused it, said "no responders", or did not answer within the
timeout); the log appends the unanswered ones again, with their message ids.

It relies on two long-standing internals of nats-py's client, ``_send_command`` (queue
bytes for the flusher) and ``_flush_pending`` (wake the flusher); :func:`framed_ok` says
whether the client has them, else the log publishes through ``publish_async``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
from collections.abc import Sequence
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

log = logging.getLogger("cloister.backends.nats")

#: Bytes of frames handed to nats-py at once, so that no batch is one huge bytes object
#: (and nats-py's pending-buffer limit is checked as its publishes would have it). The
#: flusher writes them once the batch awaits its acks: yielding to it after each chunk
#: was measured no faster.
CHUNK = 64 * 1024
# "NATS/1.0\r\n" + "Nats-Msg-Id: " + value + "\r\n\r\n": the header block's size is this
# plus the value's bytes.
_HEADER_FIXED = 10 + 13 + 4
# nats-py trims header values and turns CR/LF into spaces (a value never ends the header
# line); the same here, so that a record sent again through ``js.publish`` carries the
# very id the server saw first, and deduplicates.
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
_SEQ = re.compile(rb'"seq":\s*(\d+)')


def framed_ok(nc: Any) -> bool:
    """True when nats-py's client has the internals :class:`FramedPublisher` writes with."""
    return (
        callable(getattr(nc, "_send_command", None))
        and callable(getattr(nc, "_flush_pending", None))
        and isinstance(getattr(nc, "_flush_queue", None), asyncio.Queue)
        and isinstance(getattr(nc, "stats", None), dict)
    )


async def _kick(nc: Any) -> None:
    """Wake nats-py's flusher, as its own publish does: only when no wake-up is queued
    (the flusher writes everything buffered at each one)."""
    if nc._flush_queue.empty():
        await nc._flush_pending()


def header_value(msg_id: str) -> str:
    """``msg_id`` as nats-py writes it into a header (trimmed, CR/LF made spaces)."""
    value = msg_id.strip()
    if "\r" in value or "\n" in value:
        value = value.translate(_NEWLINES)
    return value


def sequence_of(msg: Msg) -> int | None:
    """The stream sequence a publish acknowledgement gives, None for a refusal.

    A status reply (503 "no responders": no stream, or one between leaders) has
    headers and no body; a refusal is ``{"error": {...}}``; an acknowledgement is
    ``{"stream": ..., "seq": N[, "duplicate": true]}``.
    """
    data = msg.data
    if msg.headers or b'"error"' in data:
        return None
    found = _SEQ.search(data)
    return int(found.group(1)) if found else None


class _Batch:
    """The answers of one batch: a sequence (or None) per record, and when all came."""

    __slots__ = ("answered", "done", "left", "sequences")

    def __init__(self, size: int, done: asyncio.Future[None]) -> None:
        self.sequences: list[int | None] = [None] * size
        self.answered = bytearray(size)
        self.left = size
        self.done = done

    def settle(self, n: int, sequence: int | None) -> None:
        if not 0 <= n < len(self.answered) or self.answered[n]:
            return  # not one of ours, or a second answer (a server resending)
        self.answered[n] = 1
        self.sequences[n] = sequence
        self.left -= 1
        if not self.left and not self.done.done():
            self.done.set_result(None)


class FramedPublisher:
    """Pipelined publishes over one nats-py client (see the module docstring).

    One per log; its ack subscription is made on first use and lives as long as the
    client (nats-py renews it after a reconnect).
    """

    def __init__(self) -> None:
        self._nc: NATS | None = None
        self._inbox = ""
        self._cut = 0
        self._batches: dict[str, _Batch] = {}
        self._numbers = itertools.count(1)
        self._subscribing = asyncio.Lock()

    async def _ready(self, nc: NATS) -> str:
        """The reply inbox on ``nc``, subscribed once."""
        if self._nc is nc:
            return self._inbox
        async with self._subscribing:
            if self._nc is not nc:
                inbox = nc.new_inbox()
                await nc.subscribe(f"{inbox}.*.*", cb=self._on_ack)
                self._inbox, self._cut, self._nc = inbox, len(inbox) + 1, nc
        return self._inbox

    async def _on_ack(self, msg: Msg) -> None:
        batch_number, _, n = msg.subject[self._cut :].partition(".")
        batch = self._batches.get(batch_number)
        # No batch: it gave up waiting and its records went again (or a stray message
        # on our inbox, which a number check keeps from raising in nats-py's task).
        if batch is not None and n.isdecimal() and n.isascii():
            batch.settle(int(n), sequence_of(msg))

    async def publish(
        self, nc: NATS, records: Sequence[tuple[str, bytes, str | None]], timeout: float
    ) -> list[int | None]:
        """Publish every ``(subject, payload, msg_id)``; the sequence of each, or None
        for one the server refused, did not answer within ``timeout`` seconds, or that
        exceeds the server's ``max_payload`` (not sent: the caller's single append says
        what is wrong with it)."""
        inbox = await self._ready(nc)
        number = str(next(self._numbers))
        batch = _Batch(len(records), asyncio.get_running_loop().create_future())
        self._batches[number] = batch
        reply = f"{inbox}.{number}."
        limit = nc.max_payload
        try:
            parts: list[bytes] = []
            size = sent = sent_bytes = 0
            for n, (subject, data, msg_id) in enumerate(records):
                length = len(data)
                if msg_id is None:
                    head = f"PUB {subject} {reply}{n} {length}\r\n".encode()
                    total = length
                else:
                    value = header_value(msg_id)
                    header = _HEADER_FIXED + (
                        len(value) if value.isascii() else len(value.encode())
                    )
                    total = header + length
                    head = (
                        f"HPUB {subject} {reply}{n} {header} {total}\r\n"
                        f"NATS/1.0\r\nNats-Msg-Id: {value}\r\n\r\n"
                    ).encode()
                if total > limit:
                    batch.settle(n, None)
                    continue
                parts += (head, data, b"\r\n")
                size += len(head) + length + 2
                sent += 1
                sent_bytes += length
                if size >= CHUNK:
                    await nc._send_command(b"".join(parts))
                    await _kick(nc)
                    parts, size = [], 0
            if parts:
                await nc._send_command(b"".join(parts))
            await _kick(nc)
            nc.stats["out_msgs"] += sent
            nc.stats["out_bytes"] += sent_bytes
            if batch.left:
                try:
                    async with asyncio.timeout(timeout):
                        await batch.done
                except TimeoutError:
                    log.debug(
                        "%d of %d pipelined publishes unanswered after %gs",
                        batch.left,
                        len(records),
                        timeout,
                    )
        finally:
            del self._batches[number]
        return batch.sequences
