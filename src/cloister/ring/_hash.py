"""The ring's arithmetic in pure Python: key hash, slot scores and rankings.

This is the reference the C accelerator (``_native.c``) reproduces bit for bit; the tests
check that both agree. Everything here is a pure function of its arguments and of the
constants below, so changing any of them changes which node owns which key in every
deployed cluster: don't.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeAlias

Key: TypeAlias = "str | bytes | int | tuple[Key, ...]"
"""What a ring key may be: str, bytes, int (not bool) and tuples of them, nested at will."""

MASK64 = (1 << 64) - 1
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
GOLDEN = 0x9E3779B97F4A7C15
SLOT_BITS = 18
SLOTS = 1 << SLOT_BITS
SLOT_SHIFT = 64 - SLOT_BITS
MAX_NODES = 0xFFFF
_TWO_M53 = 2.0**-53

KEY_TYPES_HINT = "ring keys must be str, bytes, int (not bool) or tuples of them"


def key_type_error(key: object) -> TypeError:
    """The error for a key (or a part of a tuple key) of a type the ring cannot hash."""
    return TypeError(f"unsupported ring key type {type(key).__name__!r}: {KEY_TYPES_HINT}")


def mix64(z: int) -> int:
    """The splitmix64 finalizer: a bijection of 64-bit integers with full avalanche."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _fnv(h: int, data: bytes) -> int:
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) & MASK64
    return h


# FNV-1a states after each type tag byte.
_TAG_STR = _fnv(FNV_OFFSET, b"s")
_TAG_BYTES = _fnv(FNV_OFFSET, b"b")
_TAG_INT = _fnv(FNV_OFFSET, b"i")
_TAG_TUPLE = _fnv(FNV_OFFSET, b"t")


def key_hash(key: Key) -> int:
    """The 64-bit hash of a ring key, the same in every process, run, version and machine.

    64-bit FNV-1a over a one-byte type tag and the payload, then the splitmix64 finalizer:
    ``str`` -> ``b"s"`` + UTF-8 (lone surrogates encoded as-is), ``bytes`` -> ``b"b"`` + the
    bytes, ``int`` -> ``b"i"`` + its ASCII decimal, ``tuple`` -> ``b"t"`` + its length as
    8 little-endian bytes + each element's hash as 8 little-endian bytes.
    """
    if isinstance(key, str):
        return mix64(_fnv(_TAG_STR, str.encode(key, "utf-8", "surrogatepass")))
    if isinstance(key, bytes):
        data = key if type(key) is bytes else bytes(memoryview(key))
        return mix64(_fnv(_TAG_BYTES, data))
    if isinstance(key, int) and not isinstance(key, bool):
        return mix64(_fnv(_TAG_INT, int.__repr__(key).encode("ascii")))
    if isinstance(key, tuple):
        h = _fnv(_TAG_TUPLE, len(key).to_bytes(8, "little"))
        for item in key:
            h = _fnv(h, key_hash(item).to_bytes(8, "little"))
        return mix64(h)
    raise key_type_error(key)


def slot_of_hash(h: int) -> int:
    """The slot a 64-bit key hash falls into: its top ``SLOT_BITS`` bits."""
    return h >> SLOT_SHIFT


def slot_score(seed: int, slot: int) -> int:
    """The rendezvous draw ``u`` of the node with ``seed`` for ``slot`` (a 64-bit integer)."""
    return mix64((seed + slot * GOLDEN) & MASK64)


def weighted_score(u: int, weight: float) -> float:
    """Resch's weighted rendezvous score ``-w / ln(u01)`` of a draw ``u``; higher wins.

    ``u01 = ((u >> 11) + 0.5) * 2**-53`` lies in (0, 1]; the single draw that rounds to 1.0
    (``ln`` = 0) scores infinity, keeping the score non-decreasing in ``u``.
    """
    ln = math.log(((u >> 11) + 0.5) * _TWO_M53)
    return -weight / ln if ln < 0.0 else math.inf


def best_node(slot: int, seeds: Sequence[int], weights: Sequence[float] | None) -> int:
    """The index of the node that owns ``slot``: the first of :func:`ranking`.

    ``weights`` is ``None`` when all nodes weigh the same; the nodes are sorted by name,
    so on a tie the lower index (the smaller name) wins.
    """
    g = slot * GOLDEN
    best = 0
    if weights is None:
        best_u = -1
        for i, seed in enumerate(seeds):
            u = mix64((seed + g) & MASK64)
            if u > best_u:
                best, best_u = i, u
        return best
    best_key = (-1.0, -1)
    for i, seed in enumerate(seeds):
        u = mix64((seed + g) & MASK64)
        candidate = (weighted_score(u, weights[i]), u)
        if candidate > best_key:
            best, best_key = i, candidate
    return best


def ranking(slot: int, seeds: Sequence[int], weights: Sequence[float] | None) -> list[int]:
    """Every node index for ``slot``, most preferred first.

    Order: by weighted score (when ``weights`` is given), then by the raw draw ``u``, both
    descending, then by index (name) ascending. With equal weights the score is a
    non-decreasing function of ``u``, so ranking by ``u`` alone gives the same order.
    """
    draws = [slot_score(seed, slot) for seed in seeds]
    if weights is None:
        return sorted(range(len(seeds)), key=lambda i: (-draws[i], i))
    scores = [weighted_score(u, w) for u, w in zip(draws, weights, strict=True)]
    return sorted(range(len(seeds)), key=lambda i: (-scores[i], -draws[i], i))
