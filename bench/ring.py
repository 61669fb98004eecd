"""Benchmark: cloister.HashRing side by side with uhashring (default settings), one run.

1,000,000 keys "foo_0".."foo_999999". Prints a table (both columns and the target) and
writes bench/results/ring.json. Usage: python bench/ring.py [--keys N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import uhashring

import cloister
from _common import median_seconds, print_table, write_json
from cloister import HashRing
from cloister.ring import NATIVE

Lookup = Callable[[str], str]


class Contender:
    """One ring library behind a common face: build, derive, look up."""

    name: str

    def build(self, nodes: dict[str, int]) -> Any:
        raise NotImplementedError

    def added(self, ring: Any, name: str) -> Any:
        """The ring with ``name`` added (a new ring or the same one changed)."""
        raise NotImplementedError

    def removed(self, ring: Any, name: str) -> Any:
        raise NotImplementedError

    def lookup(self, ring: Any) -> Lookup:
        raise NotImplementedError


class Cloister(Contender):
    name = f"pycloister {cloister.__version__} ({'C' if NATIVE else 'pure Python'})"

    def build(self, nodes: dict[str, int]) -> HashRing:
        return HashRing(nodes)

    def added(self, ring: HashRing, name: str) -> HashRing:
        return ring.add_node(name)

    def removed(self, ring: HashRing, name: str) -> HashRing:
        return ring.remove_node(name)

    def lookup(self, ring: HashRing) -> Lookup:
        return ring.key_to_node


class UHashRing(Contender):
    name = "uhashring " + getattr(uhashring, "__version__", "")

    def build(self, nodes: dict[str, int]) -> Any:
        if set(nodes.values()) == {1}:
            return uhashring.HashRing(nodes=list(nodes))
        return uhashring.HashRing(nodes=dict(nodes))

    def added(self, ring: Any, name: str) -> Any:
        ring.add_node(name)
        return ring

    def removed(self, ring: Any, name: str) -> Any:
        ring.remove_node(name)
        return ring

    def lookup(self, ring: Any) -> Lookup:
        get_node: Lookup = ring.get_node
        return get_node


def names(n: int) -> dict[str, int]:
    return {f"node{i}": 1 for i in range(n)}


def lookups_per_second(f: Lookup, keys: Sequence[str]) -> float:
    def loop() -> None:
        for k in keys:
            f(k)

    return len(keys) / median_seconds(loop, runs=3)


def owners(f: Lookup, keys: Sequence[str]) -> list[str]:
    return [f(k) for k in keys]


def derive_ms(c: Contender, nodes: dict[str, int], change: Callable[[Any], Any]) -> float:
    """Median ms of one derivation (build excluded), over 5 fresh rings."""
    times = []
    for _ in range(5):
        ring = c.build(nodes)
        start = time.perf_counter()
        change(ring)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(c: Contender, keys: Sequence[str]) -> dict[str, Any]:
    print(f"measuring {c.name} ...", flush=True)
    out: dict[str, Any] = {}
    for n in (10, 100):
        out[f"lookups_per_s_{n}"] = lookups_per_second(c.lookup(c.build(names(n))), keys)

    ten = c.build(names(10))
    before = owners(c.lookup(ten), keys)
    counts = Counter(before)
    out["max_over_mean_10"] = max(counts.values()) / (len(keys) / 10)

    eleven = c.added(c.build(names(10)), "node10")
    after = owners(c.lookup(eleven), keys)
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    out["moved_on_join_pct"] = 100 * len(moved) / len(keys)
    out["moved_among_old_on_join"] = sum(1 for _, a in moved if a != "node10")

    among_old_on_removal = 0
    for gone in names(10):
        shrunk = owners(c.lookup(c.removed(c.build(names(10)), gone)), keys)
        among_old_on_removal += sum(
            1 for b, a in zip(before, shrunk, strict=True) if b != a and b != gone
        )
    out["moved_among_old_on_removal"] = among_old_on_removal

    out["build_100_ms"] = median_seconds(lambda: c.build(names(100)), runs=5) * 1e3
    out["add_ms"] = derive_ms(c, names(100), lambda r: c.added(r, "newcomer"))
    out["remove_ms"] = derive_ms(c, names(100), lambda r: c.removed(r, "node42"))

    weighted = names(9) | {"heavy": 2}
    heavy = Counter(owners(c.lookup(c.build(weighted)), keys))["heavy"]
    out["weight2_share"] = heavy / len(keys)
    out["weight2_error_pct"] = 100 * abs(out["weight2_share"] / (2 / 11) - 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=1_000_000, help="number of keys")
    count = parser.parse_args().keys
    keys = [f"foo_{i}" for i in range(count)]
    ours, theirs = Cloister(), UHashRing()
    a, b = measure(ours, keys), measure(theirs, keys)

    ideal = 100 / 11

    def m(x: float) -> str:
        return f"{x / 1e6:.2f} M/s"

    rows: list[tuple[str, str, str, str, bool]] = []
    for n in (10, 100):
        mine, other = a[f"lookups_per_s_{n}"], b[f"lookups_per_s_{n}"]
        rows.append(
            (
                f"key_to_node lookups/s, {n} nodes",
                f"{m(mine)} ({mine / other:.1f}x)",
                m(other),
                ">= 8 M/s and >= 10x",
                mine >= 8e6 and mine >= 10 * other,
            )
        )
    rows += [
        (
            "busiest node / mean, 10 equal nodes",
            f"{a['max_over_mean_10']:.3f}",
            f"{b['max_over_mean_10']:.3f}",
            "<= 1.02",
            a["max_over_mean_10"] <= 1.02,
        ),
        (
            "keys moved when an 11th node joins 10",
            f"{a['moved_on_join_pct']:.2f}%",
            f"{b['moved_on_join_pct']:.2f}%",
            f"{ideal:.2f}% +- 0.5",
            abs(a["moved_on_join_pct"] - ideal) <= 0.5,
        ),
        (
            "keys moved among old nodes, on join",
            str(a["moved_among_old_on_join"]),
            str(b["moved_among_old_on_join"]),
            "0",
            a["moved_among_old_on_join"] == 0,
        ),
        (
            "... on removal of each of the 10 nodes",
            str(a["moved_among_old_on_removal"]),
            str(b["moved_among_old_on_removal"]),
            "0",
            a["moved_among_old_on_removal"] == 0,
        ),
        (
            "build a ring of 100 nodes",
            f"{a['build_100_ms']:.1f} ms",
            f"{b['build_100_ms']:.1f} ms",
            "<= 200 ms",
            a["build_100_ms"] <= 200,
        ),
        (
            "add one node to 100",
            f"{a['add_ms']:.1f} ms",
            f"{b['add_ms']:.1f} ms",
            "<= 50 ms",
            a["add_ms"] <= 50,
        ),
        (
            "remove one node of 100",
            f"{a['remove_ms']:.1f} ms",
            f"{b['remove_ms']:.1f} ms",
            "<= 50 ms",
            a["remove_ms"] <= 50,
        ),
        (
            "share of a weight-2 node among 9 of weight 1",
            f"{a['weight2_share']:.4f} ({a['weight2_error_pct']:.2f}% off)",
            f"{b['weight2_share']:.4f} ({b['weight2_error_pct']:.2f}% off)",
            f"{2 / 11:.4f} +- 2%",
            a["weight2_error_pct"] <= 2,
        ),
    ]
    print_table(
        f"hash ring, {count:,} keys",
        ["figure", ours.name, theirs.name, "target", "met"],
        [(*row[:4], "yes" if row[4] else "NO") for row in rows],
    )
    path = write_json(
        "ring",
        {
            "keys": count,
            "native": NATIVE,
            "contenders": {"ours": ours.name, "theirs": theirs.name},
            "rows": [
                dict(zip(("figure", "ours", "theirs", "target", "met"), row, strict=True))
                for row in rows
            ],
            "ours": a,
            "theirs": b,
        },
    )
    missed = [row[0] for row in rows if not row[4]]
    print(f"\nwrote {path}" + (f"; MISSED: {', '.join(missed)}" if missed else "; all targets met"))


if __name__ == "__main__":
    main()
