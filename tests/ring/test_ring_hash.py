"""The key hash: golden values, the spec, native/pure agreement, accepted key types."""

from __future__ import annotations

import enum
from typing import Any

import pytest
from hypothesis import given
from ring_impls import NativeRing, keys

from cloister.ring import SLOTS, _hash, key_hash

MASK = (1 << 64) - 1


def spec_hash(key: Any) -> int:
    """The key hash written straight from its specification, independently of _hash."""
    if isinstance(key, str):
        data = b"s" + key.encode("utf-8", "surrogatepass")
    elif isinstance(key, bytes):
        data = b"b" + key
    elif isinstance(key, int):
        data = b"i" + str(int(key)).encode()
    else:
        parts = b"".join(spec_hash(item).to_bytes(8, "little") for item in key)
        data = b"t" + len(key).to_bytes(8, "little") + parts
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & MASK
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & MASK
    return h ^ (h >> 31)


# Changing any of these changes which node owns which key in every deployed cluster.
GOLDEN = [
    ("", 0xBDF18D3990FB6460),
    ("foo_0", 0x960DC9E4DC0894B8),
    ("héllo", 0xAAEF18BCA8B94B38),
    (b"", 0x3E35B21BFB9B6405),
    (b"\x00\xff", 0xE3C39A4B36C99FC5),
    (0, 0x374E1DAA609ACA5C),
    (-1, 0x37DE850FEE0FE011),
    (2**64, 0x9C41C42C5E69CC53),
    (-(2**80), 0x0B4C4A8F5779586E),
    ((), 0x61FDA07BF502EBAD),
    (("a", 1, b"b"), 0x8E7128AC30D5C04B),
    ((("x",),), 0xDD689D9414D32E45),
]

HASHES = [pytest.param(_hash.key_hash, id="pure")]
if NativeRing is not None:
    from cloister.ring import _native

    HASHES.append(pytest.param(_native.key_hash, id="native"))


@pytest.mark.parametrize("fn", HASHES)
@pytest.mark.parametrize(("key", "expected"), GOLDEN, ids=[repr(k) for k, _ in GOLDEN])
def test_golden_hash_values(fn: Any, key: Any, expected: int) -> None:
    assert fn(key) == expected
    assert spec_hash(key) == expected


@given(keys)
def test_pure_hash_follows_the_spec(key: Any) -> None:
    assert _hash.key_hash(key) == spec_hash(key)


@pytest.mark.skipif(NativeRing is None, reason="C accelerator not built")
@given(keys)
def test_native_and_pure_hashes_agree(key: Any) -> None:
    assert _native.key_hash(key) == _hash.key_hash(key)
    assert NativeRing(["a"]).slot_of(key) == _hash.key_hash(key) >> (64 - 18)


def test_int_boundaries_and_surrogates_agree() -> None:
    samples: list[Any] = [
        2**63 - 1,
        2**63,
        -(2**63),
        -(2**63) - 1,
        2**64 - 1,
        10**40,
        -(10**40),
        "\ud800",
        "a\udfffb",
        "日本語",
        "\U0001f600",
    ]
    for key in samples:
        assert key_hash(key) == _hash.key_hash(key) == spec_hash(key)


class Color(enum.IntEnum):
    RED = 7


class Name(str):
    __slots__ = ()

    def encode(self, *args: Any, **kwargs: Any) -> bytes:  # a subclass cannot fool the hash
        return b"nonsense"


class Blob(bytes):
    def __bytes__(self) -> bytes:
        return b"nonsense"


def test_subclasses_hash_like_their_base_type() -> None:
    assert key_hash(Color.RED) == key_hash(7) == _hash.key_hash(Color.RED)
    assert key_hash(Name("abc")) == key_hash("abc") == _hash.key_hash(Name("abc"))
    assert key_hash(Blob(b"xy")) == key_hash(b"xy") == _hash.key_hash(Blob(b"xy"))


def test_types_are_tagged() -> None:
    assert len({key_hash("1"), key_hash(b"1"), key_hash(1), key_hash(("1",))}) == 4
    assert key_hash(("ab", "c")) != key_hash(("a", "bc"))
    assert key_hash(()) != key_hash(((),))


BAD_KEYS = [1.5, None, True, False, ["a"], {"a": 1}, {1}, bytearray(b"x"), object(), ("a", 2.0)]


@pytest.mark.parametrize("bad", BAD_KEYS, ids=lambda k: type(k).__name__)
def test_unsupported_keys_raise_a_clear_type_error(ring_cls: Any, bad: Any) -> None:
    ring = ring_cls(["a", "b"])
    culprit = bad[1] if isinstance(bad, tuple) else bad
    calls = [
        lambda: ring.key_to_node(bad),
        lambda: ring.key_to_node(bad, exclude={"a"}),
        lambda: ring.key_to_nodes(bad, 2),
        lambda: ring.slot_of(bad),
        lambda: key_hash(bad),
        lambda: _hash.key_hash(bad),
    ]
    for call in calls:
        with pytest.raises(TypeError) as info:
            call()
        message = str(info.value)
        assert repr(type(culprit).__name__) in message
        assert "str, bytes, int" in message


def test_deeply_nested_keys_fail_cleanly(ring_cls: Any) -> None:
    key: Any = "leaf"
    for _ in range(100_000):
        key = (key,)
    with pytest.raises(RecursionError):
        ring_cls(["a"]).key_to_node(key)


def test_slot_of_is_the_top_bits(ring_cls: Any) -> None:
    ring = ring_cls(["a"])
    assert ring.slots == SLOTS == 2**18
    for i in range(200):
        assert ring.slot_of(f"foo_{i}") == key_hash(f"foo_{i}") >> 46
    assert ring_cls([]).slot_of("x") == ring.slot_of("x")


@pytest.mark.skipif(NativeRing is None, reason="C accelerator not built")
def test_native_constants_match() -> None:
    assert _native.SLOTS == _hash.SLOTS
    assert _native.SLOT_BITS == _hash.SLOT_BITS
    assert _native.MAX_NODES == _hash.MAX_NODES
