"""Fuzzing the trust boundary: whatever bytes a record holds, decoding it yields a typed
value or a WireFormatError — never another exception, never a crash of the interpreter.

Inputs: random bytes, every truncation of valid (plain and sealed) records, valid records
with one field replaced by a random value, random msgpack values of every shape, lengths
that claim gigabytes, nesting far past any limit (in a child process: a crash there
cannot take the test runner with it), and forged, truncated or re-keyed tags.
"""

from __future__ import annotations

import base64
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloister import schema, wire
from cloister.backends import LogRecord
from cloister.cluster.control import decode_sentry, encode_sentry
from cloister.cluster.membership import MemberRecord
from cloister.cluster.rpc import decode_reply, decode_request, encode_reply, encode_request
from cloister.cluster.topology import EpochRecord, MemberSpec
from cloister.errors import WireFormatError
from cloister.manager.claims import Claim
from cloister.manager.state import Stored
from cloister.schema import Keyring, UnauthenticatedRecordError
from cloister.store.inbox import Inbox
from cloister.store.keys import decode_key

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEYRING = Keyring(["fuzz-secret"])
KEYRINGS = (schema.UNSIGNED, KEYRING)


class _Backend:
    """What :meth:`Inbox.decode` needs of a backend: the keyring."""

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring


def _inbox(keyring: Keyring) -> Inbox:
    return Inbox(_Backend(keyring), "fuzz", partitions=4)  # type: ignore[arg-type]


def _record(data: bytes) -> LogRecord:
    return LogRecord(partition=0, sequence=1, data=data)


# Every decoder the project reads records with, by the record kind it reads.
DECODERS: dict[str, Callable[[bytes, Keyring], Any]] = {
    "member": lambda data, k: MemberRecord.decode(data, "node-1", keyring=k),
    "epoch": EpochRecord.decode,
    "sentry": decode_sentry,
    "claim": Claim.decode,
    "state": Stored.decode,
    "inbox": lambda data, k: _inbox(k).decode(_record(data)),
    "dead_letter": lambda data, k: schema.decode(schema.DEAD_LETTER, data, k),
    "table": lambda data, k: schema.decode(schema.TABLE, data, k),
    "request": decode_request,
    "multicast": lambda data, k: schema.decode(schema.MULTICAST, data, k),
    "handoff": lambda data, k: schema.HANDOFF.convert(decode_request(data, k).p),
    "bucket key": lambda data, _k: decode_key("w" + base64.urlsafe_b64encode(data).decode(), "w"),
}

# One valid record of each kind, as its writer encodes it (a function of the keyring).
VALID: dict[str, Callable[[Keyring], bytes]] = {
    "member": MemberRecord("node-1", 2, 1.5, ("eu",), 1.7e9, 3, "ready", 3.0).encode,
    "epoch": EpochRecord(4, "node-1", {"node-1": MemberSpec(1.0, ("eu",), 2)}).encode,
    "sentry": lambda k: encode_sentry("node-1", keyring=k),
    "claim": Claim("node-1", 4).encode,
    "state": Stored(("t", 7), {"payload": 1}, {"n": [1, 2]}, True, watermark=9).encode,
    "inbox": lambda k: schema.encode(schema.INBOX, [("t", 7), {"qty": 1}, "m-1"], k),
    "dead_letter": lambda k: schema.encode(
        schema.DEAD_LETTER, {"key": "k", "reason": "x", "attempts": 1, "at": 1.0}, k
    ),
    "table": lambda k: schema.encode(schema.TABLE, {"a": (1, "b")}, k),
    "request": lambda k: encode_request("cloister.ping", [1, (2,)], "node-1", keyring=k),
    "multicast": lambda k: schema.encode(schema.MULTICAST, {"h": "x", "to": ["a"]}, k),
    "handoff": lambda k: encode_request(
        "cloister.manager.m.handoff",
        {"epoch": 3, "workers": [[("t", 1), {"n": 1}, [], 5]]},
        "a",
        keyring=k,
    ),
}

# Values of every shape the wire carries, tuples and odd map keys included.
VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=8) | st.integers(-(2**63), 2**63 - 1), inner, max_size=4)
    ),
    max_leaves=12,
)


def _decodes_or_refuses(decode: Callable[[bytes, Keyring], Any], data: bytes, k: Keyring) -> bool:
    """True if ``data`` decoded, False if refused with a WireFormatError; any other
    exception propagates and fails the test."""
    try:
        decode(data, k)
    except WireFormatError:
        return False
    return True


@FUZZ
@given(data=st.binary(max_size=300), kind=st.sampled_from(sorted(DECODERS)), signed=st.booleans())
def test_random_bytes_are_decoded_or_refused(data: bytes, kind: str, signed: bool) -> None:
    _decodes_or_refuses(DECODERS[kind], data, KEYRINGS[signed])


@FUZZ
@given(kind=st.sampled_from(sorted(VALID)), signed=st.booleans(), cut=st.integers(0, 10_000))
def test_truncated_records_are_refused(kind: str, signed: bool, cut: int) -> None:
    keyring = KEYRINGS[signed]
    data = VALID[kind](keyring)
    assert _decodes_or_refuses(DECODERS[kind], data, keyring), "the valid record itself"
    if cut % len(data):  # a proper prefix: never decodes as the record
        assert not _decodes_or_refuses(DECODERS[kind], data[: cut % len(data)], keyring)


@FUZZ
@given(
    kind=st.sampled_from(["member", "epoch", "sentry", "claim", "state", "dead_letter"]),
    value=VALUES,
    pick=st.integers(0, 100),
)
def test_one_field_replaced_by_anything(kind: str, value: Any, pick: int) -> None:
    fields = wire.decode(VALID[kind](schema.UNSIGNED))
    name = sorted(fields)[pick % len(fields)]
    fields[name] = value
    _decodes_or_refuses(DECODERS[kind], wire.encode(fields), schema.UNSIGNED)


@FUZZ
@given(value=VALUES, kind=st.sampled_from(sorted(DECODERS)))
def test_values_of_any_shape(value: Any, kind: str) -> None:
    _decodes_or_refuses(DECODERS[kind], wire.encode(value), schema.UNSIGNED)


@FUZZ
@given(value=VALUES)
def test_replies_of_any_shape_become_results(value: Any) -> None:
    result = decode_reply("node-1", wire.encode(value))  # never raises: a result or error
    assert result.error is None or isinstance(result.error, Exception)
    echoed = decode_reply("node-1", encode_reply({"r": value})).value
    assert wire.encode(echoed) == wire.encode(value)  # the same value (NaN included)


def _huge_headers() -> list[bytes]:
    """Containers and strings whose headers claim up to 4 GiB that is not there."""
    big = struct.pack(">I", 2**32 - 1)
    return [
        b"\xdd" + big,  # array32
        b"\xdf" + big,  # map32
        b"\xdb" + big + b"abc",  # str32
        b"\xc6" + big + b"abc",  # bin32
        b"\xc9" + big + b"\x01",  # ext32 (a tuple)
        b"\x93\xdd" + big,  # an inbox record whose key claims 4G items
        b"\x81\xa4node\xdb" + big,  # a member record whose name claims 4 GiB
    ]


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_huge_lengths_are_refused_without_allocating(kind: str) -> None:
    for data in _huge_headers():
        assert not _decodes_or_refuses(DECODERS[kind], data, schema.UNSIGNED)


def test_records_larger_than_the_limit_are_refused_unread() -> None:
    data = b"\xc4" + b"\x00" * (schema.MAX_RECORD_BYTES + 1)
    with pytest.raises(WireFormatError, match="exceeds"):
        schema.decode(schema.TABLE, data)


@FUZZ
@given(kind=st.sampled_from(sorted(VALID)), flip=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_any_flipped_bit_of_a_sealed_record_is_refused(kind: str, flip: int, bit: int) -> None:
    data = bytearray(VALID[kind](KEYRING))
    data[flip % len(data)] ^= 1 << bit
    assert not _decodes_or_refuses(DECODERS[kind], bytes(data), KEYRING)


@pytest.mark.parametrize("kind", sorted(VALID))
def test_records_of_other_secrets_and_kinds_are_refused(kind: str) -> None:
    data = VALID[kind](KEYRING)
    with pytest.raises(UnauthenticatedRecordError):  # another cluster's secret
        DECODERS[kind](data, Keyring(["another secret"]))
    with pytest.raises(UnauthenticatedRecordError):  # no tag at all
        DECODERS[kind](VALID[kind](schema.UNSIGNED), KEYRING)
    with pytest.raises(WireFormatError, match="secret this node does not have"):
        DECODERS[kind](data, schema.UNSIGNED)
    other = "table" if kind != "table" else "member"
    with pytest.raises(UnauthenticatedRecordError):  # a sealed value of another kind
        DECODERS[kind](VALID[other](KEYRING), KEYRING)


DEEP = """
from tests.hostile.test_fuzz_wire import DECODERS
from tests.test_wire_depth import hostile
from cloister import schema
from cloister.errors import WireFormatError
shapes = {
    "lists": lambda: b"\\x91" * 100_000 + b"\\xc0",
    "maps": lambda: b"\\x81\\xa1k" * 100_000 + b"\\xc0",
    "inbox": lambda: b"\\x93" + b"\\x91" * 100_000 + b"\\xc0\\xc0\\xc0",
    "tuples": lambda: hostile(2_000),
}
for name, make in shapes.items():
    data = make()
    for kind, decode in DECODERS.items():
        try:
            decode(data, schema.UNSIGNED)
        except WireFormatError:
            print("refused", name, kind)
"""


def test_nesting_past_any_limit_is_refused_in_a_child_process() -> None:
    done = subprocess.run([sys.executable, "-c", DEEP], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("refused") == 4 * len(DECODERS), done.stdout
