"""The engine's seams: the callbacks it runs, its options, and the ports it calls out
through (each optional: a standalone engine has no inbox and no state table)."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from cloister.backends import LogConsumer, LogRecord
from cloister.manager.state import Stored
from cloister.manager.types import Executor, Key, OnError, OnHandlerTimeout
from cloister.store.inbox import InboxMessage

Callback = Callable[..., Any]
Ack = Callable[[LogConsumer, LogRecord, Any], None]
"""Acknowledge an inbox record of a key (None: no state to persist first)."""
Park = Callable[[LogConsumer, InboxMessage, str, int], Coroutine[Any, Any, None]]
"""Park an inbox message as a dead letter (reason, attempts), then ack it."""
Mark = Callable[[Stored], None]
"""A payload was replaced: queue it for the state table."""
Write = Callable[[Stored], Awaitable[None]]
"""Write one state-table record now (a halted or re-keyed worker's deletion)."""
Put = Callable[[Key, dict[str, Any]], Awaitable[None]]
"""Start a worker under a new id (a re-key), wherever that id lives."""
Forget = Callable[[int], None]
"""That many delivered inbox records will not be acked here (redelivered elsewhere)."""


class Permit(Protocol):
    """The node's right to work: valid until ``lease_until`` (``time.monotonic()``).

    A cluster node's member lease is one (:attr:`cloister.cluster.Cluster.lease`): a
    callback starts only while it is valid, and a result that comes back after it ran out
    is discarded — a process paused past its lease wakes up to find its work refused.
    """

    @property
    def lease_until(self) -> float: ...


class Unbounded:
    """The permit of a standalone engine: nobody else can take its workers."""

    lease_until = math.inf


UNBOUNDED = Unbounded()


@dataclass(frozen=True, slots=True)
class Callbacks:
    """The user callbacks the engine runs (``init``/``terminate`` None: not overridden)."""

    perform: Callback
    handle_call: Callback
    handle_cast: Callback
    handle_timeout: Callback
    init: Callback | None = None
    terminate: Callback | None = None


@dataclass(frozen=True, slots=True)
class Options:
    """The engine's share of a manager's options."""

    name: str = "manager"
    concurrency: int = 10_000
    on_error: OnError = "continue"
    restart_backoff: tuple[float, float] = (0.05, 5.0)
    max_attempts: int = 5
    retry_backoff: tuple[float, float] = (0.05, 2.0)
    executor: Executor = "thread"
    pool_size: int = 8
    handler_timeout: float | None = None
    on_handler_timeout: OnHandlerTimeout = "report"


@dataclass(slots=True)
class Ports:
    """What the engine asks of the world around it; each None when there is no such thing
    (standalone: no inbox, no state table, re-keys start the new id here)."""

    ack: Ack | None = None
    park: Park | None = None
    mark: Mark | None = None
    write: Write | None = None
    put: Put | None = None
    forget: Forget | None = None
