"""Read the events of a ``cloister run``/``node`` process: the one place that knows where.

A node logs its events (state changes, adopted epochs, ``manager up``...) as log records
on stderr, in text or JSON (see :mod:`cloister.cli.node` and :mod:`cloister._events`);
stdout is left to the application's own prints. Tests and benchmarks wait for and read
events through these helpers only, never by scanning a stream themselves, so that where
and how the events are written can change in one place::

    node = nodes.spawn_python("-m", "cloister", "run", "app:Shop", ...)
    found = wait_for_event(node, r"^manager up workers=(\\d+) ", timeout=20)
    states = [e.change for e in node_events(node, "state")]

A pattern is searched (``re.search``) in the event's message ``<kind> <fields> t=<T>``,
whatever the log format, so ``^`` anchors at the kind.
"""

from __future__ import annotations

import re
import subprocess

from cloister._events import NodeEvent, event_text, parse_event
from cloister.local.processes import NodeProcess

__all__ = [
    "EVENT_STREAM",
    "NodeEvent",
    "events_in_output",
    "node_events",
    "parse_event",
    "wait_for_event",
    "wait_for_event_async",
]

EVENT_STREAM = "stderr"
"""The stream a node writes its events to (with the rest of its log)."""


def _stream(proc: NodeProcess) -> str | None:
    # A child spawned with merge_stderr reads both streams as one (labelled stdout).
    return None if proc.merge_stderr else EVENT_STREAM


def node_events(
    proc: NodeProcess, kind: str | None = None, *, since: int | None = None
) -> list[NodeEvent]:
    """Every event ``proc`` logged (over all its runs, or from line ``since`` =
    ``proc.mark()``), of ``kind`` if given, in order."""
    stream = _stream(proc)
    lines = proc.lines[since or 0 :]
    found = (parse_event(ln.text) for ln in lines if stream is None or ln.stream == stream)
    return [e for e in found if e is not None and (kind is None or e.kind == kind)]


def events_in_output(result: subprocess.CompletedProcess[str]) -> list[NodeEvent]:
    """Every event of a finished ``cloister`` command run with captured text output."""
    found = (parse_event(line) for line in (result.stderr or "").splitlines())
    return [e for e in found if e is not None]


def wait_for_event(
    proc: NodeProcess,
    pattern: str | re.Pattern[str],
    timeout: float = 10.0,
    *,
    since: int | None = None,
) -> re.Match[str]:
    """Wait until ``proc`` logs an event matching ``pattern`` (see the module doc); the
    match. ``since`` as in :meth:`NodeProcess.wait_for_line` (default: the current run).

    Raises:
        LineNotFoundError: no such event within ``timeout`` seconds, or the process
            exited first; the message shows its last lines.
    """
    return proc.wait_for_line(
        pattern, timeout, since=since, stream=_stream(proc), text_of=event_text
    )


async def wait_for_event_async(
    proc: NodeProcess,
    pattern: str | re.Pattern[str],
    timeout: float = 10.0,
    *,
    since: int | None = None,
) -> re.Match[str]:
    """Like :func:`wait_for_event`, but awaitable: the event loop keeps running meanwhile."""
    return await proc.wait_for_line_async(
        pattern, timeout, since=since, stream=_stream(proc), text_of=event_text
    )
