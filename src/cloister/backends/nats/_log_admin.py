"""The durable consumers of a log's stream: their names, and creating, reading, deleting them.

A claim of partition ``p`` by consumer ``c`` is the durable pull consumer ``p<p>-<c>`` (the
name escaped to what NATS allows), filtered on the partition's subject.
:class:`ConsumerAdmin` runs the JetStream API calls on them, each retried through a
stream or consumer leader election (:func:`~._streams.retry_while_unavailable`).
"""

from __future__ import annotations

import functools
import json
import re
import string
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.js import api

from cloister.backends.base import PartitionBusyError
from cloister.backends.nats._connection import NatsConnection
from cloister.backends.nats._errors import (
    FILTERED_CONSUMER_NOT_UNIQUE,
    NATS_ERRORS,
    NO_RESPONDERS,
    translate,
)
from cloister.backends.nats._streams import PATIENT_BACKOFF, retry_while_unavailable
from cloister.errors import BackendError

T = TypeVar("T")

CONSUMER = "cloister.consumer"
#: How long a delivered, unacknowledged record stays with its consumer. Records go to
#: another consumer when the claim ends, never by redelivery to the same one.
ACK_WAIT = 3600.0
#: Records delivered and not yet acknowledged, per consumer.
MAX_ACK_PENDING = 10_000
#: The longest consumer name we create (the server takes up to 255 characters).
MAX_NAME = 240
_PLAIN = frozenset(string.ascii_letters + string.digits + "_-")
_CONSUMER_NAME = re.compile(r"^p(\d+)-(.+)$")
_ESCAPED = re.compile(r"(?:=[0-9A-F]{2})+")


def consumer_name(partition: int, consumer: str) -> str:
    """The durable's name: ``p<partition>-<consumer>``, other characters as ``=XX``."""
    escaped = "".join(
        c if c in _PLAIN else "".join(f"={b:02X}" for b in c.encode()) for c in consumer
    )
    return f"p{partition}-{escaped}"


def parse_consumer_name(name: str) -> tuple[int, str] | None:
    """``(partition, consumer)`` of a durable named by :func:`consumer_name`, else None."""
    match = _CONSUMER_NAME.match(name)
    if match is None:
        return None
    try:
        consumer = _ESCAPED.sub(lambda m: bytes.fromhex(m[0].replace("=", "")).decode(), match[2])
    except UnicodeDecodeError:
        return None
    return int(match[1]), consumer


class ConsumerAdmin:
    """JetStream API calls on the durable consumers of one log's stream."""

    def __init__(self, conn: NatsConnection, name: str, stream: str) -> None:
        self.name = name
        self.stream = stream
        self.conn = conn

    @property
    def _op_timeout(self) -> float:
        return self.conn.options.op_timeout

    async def claimants(self, partition: int) -> list[str]:
        """The consumers holding ``partition`` now (from the durables' names)."""
        return (await self.claimed()).get(partition, [])

    async def claimed(self) -> dict[int, list[str]]:
        """Every claimed partition and its consumers, from one listing of the durables."""
        found: dict[int, list[str]] = {}
        for name in await self._consumer_names():
            parsed = parse_consumer_name(name)
            if parsed is not None:
                found.setdefault(parsed[0], []).append(parsed[1])
        return {partition: sorted(holders) for partition, holders in found.items()}

    def consumer_config(self, durable: str, subject: str, consumer: str) -> api.ConsumerConfig:
        return api.ConsumerConfig(
            name=durable,
            durable_name=durable,
            filter_subject=subject,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT,
            max_deliver=-1,
            max_ack_pending=MAX_ACK_PENDING,
            replay_policy=api.ReplayPolicy.INSTANT,
            metadata={CONSUMER: consumer},
        )

    async def create(self, durable: str, subject: str, consumer: str, partition: int) -> None:
        """Create the durable afresh: one left from an earlier claim is replaced."""
        what = f"claim partition {partition} of log {self.name!r} for {consumer!r}"
        js = self.conn.jetstream(what)
        config = self.consumer_config(durable, subject, consumer)
        for attempt in range(2):
            try:
                info = await self._call(lambda: js._jsm.add_consumer(self.stream, config))
            except nats.js.errors.APIError as exc:
                if exc.err_code == FILTERED_CONSUMER_NOT_UNIQUE:
                    holders = [c for c in await self.claimants(partition) if c != consumer]
                    held = f"held by {holders[0]!r}" if holders else "held by another consumer"
                    raise PartitionBusyError(
                        f"partition {partition} of log {self.name!r} is {held}"
                    ) from None
                if attempt == 0 and not isinstance(exc, nats.js.errors.ServiceUnavailableError):
                    # An old durable of that name we cannot update: replace it.
                    await self.delete(durable, what)
                    continue
                raise translate(exc, what, self.conn.url) from exc
            except NATS_ERRORS as exc:
                raise translate(exc, what, self.conn.url) from exc
            fresh = (
                (info.delivered is None or info.delivered.consumer_seq == 0)
                and not info.num_ack_pending
                and not info.num_waiting
            )
            if fresh or attempt == 1:
                return
            # A durable of that name from an earlier claim (our restart, or a re-claim):
            # records it delivered are still pending with it. Start from scratch.
            await self.delete(durable, what)
        raise BackendError(f"{what}: could not replace the consumer's earlier durable")

    async def delete(self, durable: str, what: str) -> None:
        js = self.conn.jetstream(what)
        try:
            await self._call(lambda: js._jsm.delete_consumer(self.stream, durable))
        except nats.js.errors.NotFoundError:
            return
        except NATS_ERRORS as exc:
            raise translate(exc, what, self.conn.url) from exc

    async def info(
        self, durable: str, what: str, *, patient: bool = True
    ) -> api.ConsumerInfo | None:
        """The durable's info, None when it does not exist; ``patient`` retries."""
        js = self.conn.jetstream(what)
        try:
            if not patient:
                info: api.ConsumerInfo = await js._jsm.consumer_info(self.stream, durable)
                return info
            return await self._call(lambda: js._jsm.consumer_info(self.stream, durable))
        except nats.js.errors.NotFoundError:
            return None
        except NATS_ERRORS as exc:
            raise translate(exc, what, self.conn.url) from exc

    async def _consumer_names(self) -> list[str]:
        """Every consumer of the stream (paged ``CONSUMER.NAMES``)."""
        what = f"list the consumers of log {self.name!r}"
        nc = self.conn.client(what)
        names: list[str] = []
        subject = f"$JS.API.CONSUMER.NAMES.{self.stream}"
        while True:
            request = json.dumps({"offset": len(names)}).encode()
            try:
                ask = functools.partial(nc.request, subject, request, timeout=self._op_timeout)
                reply = await self._call(ask)
                answer = json.loads(reply.data)
                if "error" in answer:
                    nats.js.errors.APIError.from_error(answer["error"])  # raises
            except nats.js.errors.NotFoundError:
                return names
            except (*NATS_ERRORS, ValueError) as exc:
                raise translate(exc, what, self.conn.url) from exc
            page = answer.get("consumers") or []
            names.extend(page)
            if not page or len(names) >= int(answer.get("total", 0)):
                return names

    async def _call(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run an idempotent JetStream API call, again on "no responders" or a timeout.

        Consumer operations on a replicated stream wait for the consumer's own leader,
        which may take longer than one ``op_timeout`` while a server is down; repeating
        them is safe (a create of an existing identical durable returns it). Gives up
        after ``2 * op_timeout``, or at once when the backend is closing.
        """
        return await retry_while_unavailable(
            attempt,
            2 * self._op_timeout,
            on=(*NO_RESPONDERS, nats.errors.TimeoutError),
            backoff=PATIENT_BACKOFF,
            stop=lambda: self.conn.closed,
        )
