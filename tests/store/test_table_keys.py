"""Table keys as dotted tokens: exact, reversible, canonical, and prefix-preserving."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloister.errors import ConfigurationError, WireFormatError
from cloister.store.table_keys import (
    MAX_KEY_LENGTH,
    decode_table_key,
    encode_table_key,
    table_prefix,
)

# What both backends accept as a key: NATS subject tokens joined by dots.
BACKEND_KEY = re.compile(r"^[A-Za-z0-9_=-]+(?:\.[A-Za-z0-9_=-]+)*$")

keys = st.recursive(
    st.text() | st.binary() | st.integers(),
    lambda inner: st.lists(inner, max_size=4).map(tuple),
    max_leaves=10,
)


def under(stored: str, prefix: str) -> bool:
    return stored.startswith(prefix)


@given(keys)
def test_round_trip_keeps_value_and_type(key: Any) -> None:
    stored = encode_table_key(key)
    assert BACKEND_KEY.match(stored)
    if len(stored) <= MAX_KEY_LENGTH:
        back = decode_table_key(stored)
        assert back == key and repr(back) == repr(key)


@given(keys, keys)
def test_distinct_keys_get_distinct_bucket_keys(a: Any, b: Any) -> None:
    if repr(a) != repr(b):
        assert encode_table_key(a) != encode_table_key(b)


@given(st.text(), st.text())
def test_a_string_prefix_matches_exactly_the_strings_starting_with_it(a: str, b: str) -> None:
    assert under(encode_table_key(a + b), table_prefix(a))
    assert under(encode_table_key(a), table_prefix(a))
    assert under(encode_table_key(b), table_prefix(a)) == b.startswith(a)
    assert not under(encode_table_key(a.encode()), table_prefix(a))  # bytes are not str


@given(st.binary(), st.binary())
def test_a_bytes_prefix_matches_exactly_the_bytes_starting_with_it(a: bytes, b: bytes) -> None:
    assert under(encode_table_key(a + b), table_prefix(a))
    assert under(encode_table_key(b), table_prefix(a)) == b.startswith(a)


@given(st.lists(keys, max_size=3).map(tuple), st.lists(keys, max_size=3).map(tuple))
def test_a_tuple_prefix_matches_the_tuples_starting_with_its_elements(
    head: tuple[Any, ...], tail: tuple[Any, ...]
) -> None:
    assert under(encode_table_key(head + tail), table_prefix(head))
    starts = len(tail) >= len(head) and repr(tail[: len(head)]) == repr(head)
    assert under(encode_table_key(tail), table_prefix(head)) == starts


def test_prefixes_read_as_documented() -> None:
    assert encode_table_key("user:42") == "k.s.u.s.e.r.=3A.4.2.="
    assert table_prefix("us") == "k.s.u.s."
    assert table_prefix(None) == "k."
    assert not under(encode_table_key(("tenant", 70)), table_prefix(("tenant", 7)))
    assert under(encode_table_key(("tenant", 7, "a")), table_prefix(("tenant", 7)))
    with pytest.raises(ConfigurationError, match="table prefix"):
        table_prefix(7)
    with pytest.raises(ConfigurationError, match="float is not allowed"):
        encode_table_key(("a", 1.5))


@pytest.mark.parametrize(
    "stored",
    [
        "x.s.a.=",
        "k",
        "k.s.a",  # no end token
        "k.s.a.=.=",  # trailing tokens
        "k.s.=3a.=",  # lower-case hex is not canonical
        "k.s.=41.=",  # an escaped safe byte is not canonical
        "k.i.007",
        "k.i.+7",
        "k.f.1",
        "k.s.=FF.=",  # not UTF-8
        "k." + "t." * 600 + "=" * 0,  # deeper than any key a table writes
    ],
)
def test_malformed_bucket_keys_are_refused(stored: str) -> None:
    with pytest.raises(WireFormatError):
        decode_table_key(stored)
