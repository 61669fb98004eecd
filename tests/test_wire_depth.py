"""Deeply nested input never kills the process: each tuple level is a nested C unpack, and
400 levels (a 1.9 KB message) used to overflow the C stack (SIGSEGV). Such input is
refused with a clear WireFormatError, both ways; ordinary nesting still round-trips."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloister import wire
from cloister.errors import WireFormatError


def nested(depth: int) -> object:
    value: object = None
    for _ in range(depth):
        value = (value,)
    return value


def hostile(depth: int) -> bytes:
    """What an attacker writes to a stream: tuples nested ``depth`` deep, by hand."""
    data = msgpack.packb(None)
    for _ in range(depth):
        data = msgpack.packb(msgpack.ExtType(1, b"\x91" + data))
    return data


def test_deep_tuples_are_refused_in_a_separate_process() -> None:
    # In a child: were the limit missing, the crash would take the test runner with it.
    code = (
        "from tests.test_wire_depth import hostile\n"
        "from cloister import wire\n"
        "from cloister.errors import WireFormatError\n"
        "for depth in (400, 5000):\n"
        "    try:\n"
        "        wire.decode(hostile(depth))\n"
        "    except WireFormatError as exc:\n"
        "        print('refused', depth, exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("refused") == 2, done.stdout


def test_encoding_deep_tuples_is_a_clear_error() -> None:
    with pytest.raises(WireFormatError, match="nested more than 32 deep") as caught:
        wire.encode(nested(2000))
    assert len(str(caught.value)) < 300  # said once, not once per level


def test_the_limit_itself_round_trips() -> None:
    value = nested(wire.MAX_TUPLE_DEPTH)
    assert wire.decode(wire.encode(value)) == value
    with pytest.raises(WireFormatError):
        wire.decode(hostile(wire.MAX_TUPLE_DEPTH + 1))


@given(st.binary(max_size=512))
def test_no_bytes_raise_anything_but_wire_format_errors(data: bytes) -> None:
    with contextlib.suppress(WireFormatError):  # anything else fails the test
        wire.decode(data)
