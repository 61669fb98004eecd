"""The node's events as log records: written in either log format, read back the same."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from cloister._events import EVENT_LOGGER, log_event, parse_event
from cloister.cli.logs import JsonFormatter, TextFormatter


@pytest.fixture
def captured() -> Iterator[tuple[io.StringIO, logging.Handler]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger(EVENT_LOGGER)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream, handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_an_event_logged_in_either_format_parses_back(
    formatter: logging.Formatter, captured: tuple[io.StringIO, logging.Handler]
) -> None:
    stream, handler = captured
    handler.setFormatter(formatter)
    log_event("state rehashing -> ready epoch=3 members=a,b sentry=a fingerprint=-")
    log_event("manager up workers=12 epoch=3")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    state, manager = (parse_event(line) for line in lines)
    assert state is not None and manager is not None
    assert state.kind == "state" and state.change == ("rehashing", "ready")
    assert state.epoch == 3 and state.members == ("a", "b") and state.fields["fingerprint"] == "-"
    assert manager.kind == "manager" and manager.fields == {"workers": "12", "epoch": "3"}
    assert 0 < state.t <= manager.t


def test_other_lines_are_no_events() -> None:
    for line in (
        "state rehashing -> ready epoch=3 t=1.0",  # an application's print, not a record
        "2026-12-01T00:00:00.000+00:00 INFO cloister.cluster: state a -> b t=1.0",
        "2026-12-01T00:00:00.000+00:00 INFO cloister.events: something else t=1.0",
        '{"logger": "cloister.cluster", "message": "epoch 3 members=a t=1.0"}',
        '{"logger": "cloister.events", "message": 3}',
        "{not json",
        "",
    ):
        assert parse_event(line) is None, line
