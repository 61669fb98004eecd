"""Bucket keys: exact, reversible, canonical, and within every backend's alphabet."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloister import wire
from cloister.errors import WireFormatError
from cloister.manager.state import storage_key
from cloister.store.keys import decode_key, encode_key

# What both backends accept as a key (NATS: subject tokens; memory: the protocol's set).
BACKEND_KEY = re.compile(r"^[A-Za-z0-9_=-]+$")

keys = st.recursive(
    st.text() | st.binary() | st.integers(min_value=-(2**63), max_value=2**64 - 1),
    lambda inner: st.lists(inner, max_size=4).map(tuple),
    max_leaves=10,
)


@given(keys)
def test_round_trip_keeps_value_and_type(key: Any) -> None:
    stored = encode_key(key, "k")
    assert BACKEND_KEY.match(stored)
    back = decode_key(stored, "k")
    assert back == key and repr(back) == repr(key)


@given(keys, keys)
def test_distinct_keys_get_distinct_bucket_keys(a: Any, b: Any) -> None:
    if repr(a) != repr(b):
        assert encode_key(a, "k") != encode_key(b, "k")


@given(keys)
def test_manager_storage_key_is_unchanged(key: Any) -> None:
    # the formula state.py used before the helper moved here: stored buckets stay readable
    old = "w" + base64.urlsafe_b64encode(wire.encode(key)).decode().rstrip("=")
    assert storage_key(key) == old


@pytest.mark.parametrize(
    "stored",
    [
        "x" + encode_key("a", ""),
        "k",
        "k!!!",
        encode_key("a", "k") + "A",
        encode_key("a", "k") + "=",
    ],
)
def test_malformed_bucket_keys_are_refused(stored: str) -> None:
    with pytest.raises(WireFormatError):
        decode_key(stored, "k")
