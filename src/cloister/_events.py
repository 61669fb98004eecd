"""The node's event lines: how ``cloister run``/``node`` log them, and reading them back.

An event (a state change, an adopted epoch, the manager up...) is a log record of the
logger :data:`EVENT_LOGGER` at INFO, whose message is ``<kind> <fields> t=<T>``: fields are
``key=value`` without spaces, ``-`` stands for "none", member lists are comma-separated,
and ``T`` is ``time.monotonic()`` of the emitting process (one clock for every process of
a machine, finer than the record's wall-clock timestamp, so that the events of several
nodes can be merged and compared with a test's own clock). It goes where every log record
of the process goes (stderr), in its format (see :mod:`cloister.cli.logs`)::

    2026-12-01T16:20:31.512+00:00 INFO cloister.events: epoch 3 members=a,b ... t=719.340112
    {"ts": "...", "logger": "cloister.events", "message": "epoch 3 ...", "event": "epoch", ...}

:func:`parse_event` reads either line back into a :class:`NodeEvent`. This module is the
one place that knows the grammar, both ways; it imports only the standard library, so that
the CLI (which writes events), ``cloister dev`` and :mod:`cloister.testing` (which read
them) can all use it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["EVENT_FIELDS", "EVENT_LOGGER", "NodeEvent", "event_text", "log_event", "parse_event"]

EVENT_LOGGER = "cloister.events"
"""The logger every event record goes to (INFO)."""

EVENT_FIELDS = "event_fields"
"""The record attribute holding an event's fields (what the JSON format spreads out)."""

_KINDS = "node|state|sentry|epoch|lease|suspended|paused|resumed|manager|metrics|health"
_EVENT = re.compile(rf"^({_KINDS}) (.*) t=(\d+(?:\.\d+)?)$")
# The text format of cloister.cli.logs: "<ISO time> LEVEL logger: message".
_TEXT_RECORD = re.compile(rf"^\d{{4}}-\d\d-\d\dT\S+ INFO {re.escape(EVENT_LOGGER)}: (.*)$")

_log = logging.getLogger(EVENT_LOGGER)


def _scalar(text: str) -> Any:
    """An event field's value for JSON: a whole number as a number, ``-`` as null."""
    if text == "-":
        return None
    return int(text) if text.isdigit() else text


def log_event(text: str) -> None:
    """Log the event ``text`` (``<kind> <fields>``) now: ``t=<monotonic>`` is appended,
    and the kind (``event``) and fields (:data:`EVENT_FIELDS`) ride along for JSON."""
    now = time.monotonic()
    kind, _, rest = text.partition(" ")
    fields = {k: _scalar(v) for k, v in (p.split("=", 1) for p in rest.split() if "=" in p)}
    fields["t"] = round(now, 6)
    _log.info("%s t=%.6f", text, now, extra={"event": kind, EVENT_FIELDS: fields})


@dataclass(frozen=True, slots=True)
class NodeEvent:
    """One event of ``cloister node``/``run``, parsed.

    ``words`` are the space-separated parts without ``=`` (``("ready", "->", "rehashing")``
    for a state line), ``fields`` the ``key=value`` parts, ``t`` the monotonic time.
    """

    kind: str
    words: tuple[str, ...]
    fields: dict[str, str]
    t: float

    @property
    def epoch(self) -> int | None:
        """The epoch the line names (``epoch=`` field, or the number of an epoch line)."""
        if self.kind == "epoch":
            return int(self.words[0])
        value = self.fields.get("epoch")
        return None if value is None else int(value)

    @property
    def members(self) -> tuple[str, ...]:
        """The ``members=`` list (empty for ``-`` or when absent)."""
        value = self.fields.get("members", "-")
        return () if value == "-" else tuple(value.split(","))

    @property
    def change(self) -> tuple[str, str]:
        """``(from, to)`` of a state or sentry line."""
        return self.words[0], self.words[2]


def event_text(line: str) -> str | None:
    """The event of one output line (``<kind> <fields> t=<T>``): the message of an event
    record in the text or the JSON format; None for any other line."""
    line = line.strip()
    if line.startswith("{"):
        try:
            entry = json.loads(line)
        except ValueError:
            return None
        if not isinstance(entry, dict) or entry.get("logger") != EVENT_LOGGER:
            return None
        message = entry.get("message")
        text = message if isinstance(message, str) else None
    else:
        found = _TEXT_RECORD.match(line)
        text = None if found is None else found.group(1)
    return text if text is not None and _EVENT.match(text) else None


def parse_event(line: str) -> NodeEvent | None:
    """Parse one output line of a node (an event record, text or JSON); None for
    anything else (other log records, the application's own prints...)."""
    text = event_text(line)
    found = None if text is None else _EVENT.match(text)
    if found is None:
        return None
    kind, body, t = found.groups()
    parts = body.split()
    return NodeEvent(
        kind=kind,
        words=tuple(p for p in parts if "=" not in p),
        fields=dict(p.split("=", 1) for p in parts if "=" in p),
        t=float(t),
    )
