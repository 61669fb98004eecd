"""HashRing as a value: construction, errors, immutability, equality, fingerprint."""

from __future__ import annotations

import copy
import math
import pickle
from fractions import Fraction
from typing import Any

import pytest
from ring_impls import NativeRing, PureRing, table

import cloister
from cloister import HashRing
from cloister.errors import CloisterError, ConfigurationError, EmptyRingError
from cloister.ring import NATIVE, UnknownNodeError, _pure, _select
from cloister.ring._ring import RingMethods

try:
    from cloister.ring import _native
except ImportError:  # pragma: no cover
    _native = None  # type: ignore[assignment]


def test_public_names() -> None:
    assert cloister.HashRing is HashRing
    assert issubclass(HashRing, RingMethods)
    core = _select.Core
    assert core is (_native.RingCore if NATIVE else _pure.RingCore)
    assert issubclass(HashRing, core)
    assert (NativeRing is not None and not _select.pure_forced()) == NATIVE
    # the lookup is the core's own method: no Python frame in between
    assert HashRing.key_to_node is core.key_to_node


def test_construction(ring_cls: Any) -> None:
    ring = ring_cls(["c", "a", "b"])
    assert ring.nodes == ("a", "b", "c")
    assert len(ring) == 3
    assert list(ring) == ["a", "b", "c"]
    assert "a" in ring and "d" not in ring and 3 not in ring
    assert ring.weight("b") == 1.0
    weighted = ring_cls({"x": 2, "y": 0.5, "z": Fraction(3, 2)})
    assert weighted.nodes == ("x", "y", "z")
    assert [weighted.weight(n) for n in weighted.nodes] == [2.0, 0.5, 1.5]
    assert ring_cls(iter(["b", "a"])) == ring_cls(("a", "b"))
    assert ring_cls(ring) == ring
    assert len(ring_cls()) == 0 and ring_cls().nodes == ()


@pytest.mark.parametrize(
    "nodes",
    [
        [""],
        [None],
        [3],
        [("a", 2)],
        ["a", "a"],
        {"a": 0},
        {"a": -1},
        {"a": math.nan},
        {"a": math.inf},
        {"a": "2"},
        {"a": True},
        {"a": None},
        {"a": 10**400},
    ],
    ids=repr,
)
def test_bad_members_raise_value_error(ring_cls: Any, nodes: Any) -> None:
    with pytest.raises(ValueError) as info:
        ring_cls(nodes)
    assert isinstance(info.value, CloisterError)
    assert "node" in str(info.value)


def test_bad_nodes_argument_types(ring_cls: Any) -> None:
    with pytest.raises(TypeError, match="iterable of node names"):
        ring_cls("abc")
    with pytest.raises(TypeError, match="iterable of node names"):
        ring_cls(42)


def test_add_and_remove_errors(ring_cls: Any) -> None:
    ring = ring_cls(["a", "b"])
    with pytest.raises(ConfigurationError, match="already in the ring"):
        ring.add_node("a")
    for bad_name in ["", None, 1]:
        with pytest.raises(ValueError, match="non-empty str"):
            ring.add_node(bad_name)
    for bad_weight in [0, -2, math.nan, math.inf, "1", None, False]:
        with pytest.raises(ValueError, match="finite number > 0"):
            ring.add_node("c", bad_weight)
    for unknown in ["zz", 5, None]:
        with pytest.raises(UnknownNodeError, match="not in the ring") as info:
            ring.remove_node(unknown)
        assert isinstance(info.value, ValueError)
        assert isinstance(info.value, KeyError)
        assert str(info.value).startswith("node ")  # not KeyError's quoted repr
    with pytest.raises(KeyError):
        ring.weight("zz")
    with pytest.raises(UnknownNodeError):
        ring_cls([]).remove_node("a")


def test_empty_ring_lookups(ring_cls: Any) -> None:
    empty = ring_cls([])
    for call in [
        lambda: empty.key_to_node("k"),
        lambda: empty.key_to_node("k", exclude={"a"}),
        lambda: empty.key_to_nodes("k", 1),
        lambda: empty.owner_of_slot(0),
    ]:
        with pytest.raises(EmptyRingError, match="ring has no nodes; add a node first"):
            call()
    assert empty.shares() == {}
    assert empty.add_node("a").key_to_node("k") == "a"
    assert ring_cls(["a"]).remove_node("a") == empty


def test_argument_errors(ring_cls: Any) -> None:
    ring = ring_cls(["a", "b", "c"])
    with pytest.raises(ValueError, match=">= 0"):
        ring.key_to_nodes("k", -1)
    for bad_n in [1.0, "2", None, True]:
        with pytest.raises(TypeError, match="n must be an int"):
            ring.key_to_nodes("k", bad_n)
    for bad_slot, error in [(-1, ValueError), (2**18, ValueError), (1.0, TypeError)]:
        with pytest.raises(error, match="slot"):
            ring.owner_of_slot(bad_slot)
    for bad_exclude in ["a", b"a"]:
        with pytest.raises(TypeError, match="collection of node names"):
            ring.key_to_node("k", exclude=bad_exclude)
        with pytest.raises(TypeError, match="collection of node names"):
            ring.key_to_nodes("k", 2, exclude=bad_exclude)
    with pytest.raises(TypeError):
        ring.key_to_node("k", exclude=5)
    with pytest.raises(TypeError):
        ring.key_to_node()
    with pytest.raises(TypeError):
        ring.key_to_node("k", (), 3)
    with pytest.raises(TypeError):
        ring.key_to_node("k", bogus=1)
    with pytest.raises(TypeError):
        ring.key_to_node("k", (), exclude=())
    with pytest.raises(EmptyRingError, match="all 3 nodes of the ring are excluded"):
        ring.key_to_node("k", exclude=["a", "b", "c"])
    assert ring.key_to_nodes("k", 3, exclude={"a", "b", "c"}) == []
    assert ring.key_to_nodes(key="k", n=0) == []
    assert ring.key_to_node(key="k", exclude=None) == ring.key_to_node("k")


def test_too_many_nodes_is_a_clear_error(ring_cls: Any) -> None:
    with pytest.raises(ConfigurationError, match="at most 65535 nodes"):
        ring_cls([f"n{i}" for i in range(65536)])


def test_immutability(ring_cls: Any) -> None:
    ring = ring_cls({"a": 1, "b": 2})
    before = (ring.nodes, ring.fingerprint, [ring.key_to_node(i) for i in range(300)])
    for attr in ["_names", "_weights", "_table", "nodes", "slots", "fingerprint", "extra"]:
        with pytest.raises(AttributeError):
            setattr(ring, attr, ("x",))
    with pytest.raises(AttributeError):
        del ring._names
    bigger = ring.add_node("c", 3)
    smaller = ring.remove_node("a")
    assert (ring.nodes, ring.fingerprint, [ring.key_to_node(i) for i in range(300)]) == before
    assert bigger.nodes == ("a", "b", "c") and smaller.nodes == ("b",)
    assert type(bigger) is ring_cls and type(smaller) is ring_cls
    assert copy.copy(ring) is ring and copy.deepcopy(ring) is ring


def test_native_table_unchanged_by_derivation(native_cls: Any) -> None:
    ring = native_cls(["a", "b", "c"])
    before = table(ring)
    ring.add_node("d")
    ring.remove_node("b")
    assert table(ring) == before


def test_equality_hash_and_fingerprint(ring_cls: Any) -> None:
    one = ring_cls({"a": 1, "b": 2})
    same = ring_cls({"b": 2.0, "a": 1.0})
    derived = ring_cls(["a"]).add_node("b", 2)
    assert one == same == derived
    assert hash(one) == hash(same) == hash(derived)
    assert one.fingerprint == same.fingerprint == derived.fingerprint
    assert len(one.fingerprint) == 16 and int(one.fingerprint, 16) >= 0
    others = [ring_cls({"a": 1, "b": 3}), ring_cls(["a", "b"]), ring_cls(["a"]), ring_cls([])]
    assert len({one.fingerprint, *(o.fingerprint for o in others)}) == 5
    assert all(one != o for o in others)
    assert one != {"a": 1, "b": 2}
    assert PureRing({"a": 1, "b": 2}) == one  # the implementation is not part of the value
    assert PureRing({"a": 1, "b": 2}).fingerprint == one.fingerprint


def test_fingerprint_golden_values(ring_cls: Any) -> None:
    # Stable across processes, versions and implementations: nodes compare it.
    assert ring_cls(["a", "b", "c", "d", "e"]).fingerprint == "00b29a00238cd38f"
    assert ring_cls({"a": 1, "b": 2, "c": 0.5}).fingerprint == "a8cbc58d81ba3dc4"


def test_golden_owners(ring_cls: Any) -> None:
    # Changing these moves keys in every deployed cluster.
    keys = [f"foo_{i}" for i in range(12)]
    equal = ring_cls(["a", "b", "c", "d", "e"])
    assert [equal.key_to_node(k) for k in keys] == list("bbdababccedb")
    weighted = ring_cls({"a": 1, "b": 2, "c": 0.5})
    assert [weighted.key_to_node(k) for k in keys] == list("bbbababccbab")
    assert equal.key_to_nodes("foo_0", 5) == ["b", "c", "e", "d", "a"]
    assert weighted.key_to_nodes("foo_0", 3) == ["b", "c", "a"]


def test_repr_round_trips(ring_cls: Any) -> None:
    name = ring_cls.__name__
    for ring in [ring_cls(["b", "a"]), ring_cls({"a": 1, "b": 2.5}), ring_cls([])]:
        text = repr(ring)
        assert text.startswith(f"{name}(")
        assert eval(text, {name: ring_cls}) == ring
    assert repr(ring_cls({"a": 1, "b": 2})) == f"{name}({{'a': 1, 'b': 2}})"


def test_pickle_round_trip() -> None:
    ring = HashRing({"a": 1, "b": 2.5})
    clone = pickle.loads(pickle.dumps(ring))
    assert type(clone) is HashRing and clone == ring
    assert [clone.key_to_node(i) for i in range(100)] == [ring.key_to_node(i) for i in range(100)]


def test_direct_core_construction_is_refused() -> None:
    if NativeRing is None:
        pytest.skip("C accelerator not built")
    with pytest.raises(TypeError, match=r"use cloister\.HashRing"):
        _native.RingCore()
    with pytest.raises(TypeError):
        object.__new__(NativeRing)
    with pytest.raises(ValueError, match="sorted"):
        NativeRing._build(("b", "a"), (1.0, 1.0))
    with pytest.raises(ValueError, match="finite"):
        NativeRing._build(("a",), (0.0,))
