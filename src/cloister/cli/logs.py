"""Logging for the command line: one stream (stderr), one format, wall-clock time.

``--log-format text`` (the default) writes one line per record::

    2026-12-01T16:20:31.512+00:00 INFO cloister.cluster: node a adopted epoch 3

``--log-format json`` writes one JSON object per line, for log collectors::

    {"ts": "2026-12-01T16:20:31.512+00:00", "level": "info", "logger": "cloister.cluster",
     "message": "node a adopted epoch 3", "cluster": "shop", "node": "a", "epoch": 3}

``cluster``, ``node`` and ``epoch`` are there once the process runs a node (``run``,
``node``): :data:`CONTEXT` reads them from the live node at each record. The node's events
(``ready``, epoch changes, the manager up...: see :mod:`cloister.cli.node`) are records
like any other, of the logger ``cloister.events`` at INFO (:mod:`cloister._events`); in
JSON they add ``event`` (the kind) and their ``key=value`` fields. Timestamps are UTC,
ISO-8601 with milliseconds; a traceback goes in ``exc_info`` (json) or below the line
(text). Nothing of the node goes to stdout: it is left to the application's own prints.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cloister._events import EVENT_FIELDS

if TYPE_CHECKING:
    from cloister.cluster import Cluster

_STANDARD = frozenset(vars(logging.makeLogRecord({})))


class LogContext:
    """What every record of this process is about: the node it runs (once it runs one)."""

    def __init__(self) -> None:
        self.cluster: Cluster | None = None

    def fields(self) -> dict[str, Any]:
        """``cluster``, ``node`` and ``epoch`` of the running node (empty before)."""
        cluster = self.cluster
        if cluster is None:
            return {}
        return {"cluster": cluster.name, "node": cluster.node, "epoch": cluster.epoch}


CONTEXT = LogContext()
"""The process's one context; ``cloister run``/``node`` set ``CONTEXT.cluster``."""


def _timestamp(record: logging.LogRecord) -> str:
    when = datetime.fromtimestamp(record.created, tz=UTC)
    return when.isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module's docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(CONTEXT.fields())
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry and key != EVENT_FIELDS:
                entry[key] = value  # extra=...: event
        for key, value in getattr(record, EVENT_FIELDS, {}).items():
            entry.setdefault(key, value)  # the event's own fields, after the context's
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``<ISO time> LEVEL logger: message`` (see the module doc)."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str, log_format: str = "text") -> None:
    """Send records of ``level`` and above to stderr in ``log_format`` (text or json).

    Replaces the root logger's handlers: one stream, one format for the whole process.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.WARNING))
