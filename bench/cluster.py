"""Cluster core on the embedded backend: assembly time of a 50-node cluster, cost of mine().

Run: ``python bench/cluster.py`` (or ``cloister bench cluster``). Targets (issue 3): 50 nodes
assemble to ``ready`` on every node in under 2 s; ``mine(key)`` costs no more than one ring
lookup (measured side by side with ``ring.key_to_node(key) == node`` in the same run).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from _common import print_table, write_json
from cloister import Cluster, State


async def assemble(nodes: int, run: int) -> tuple[float, int]:
    """Start ``nodes`` nodes at once; seconds until every one is ready on one epoch."""
    url = f"memory://bench-cluster-{run}"
    clusters = [Cluster("bench", f"n{i:03d}", backend=url, consensus=nodes) for i in range(nodes)]
    started = time.perf_counter()
    await asyncio.gather(*(c.start() for c in clusters))
    await asyncio.gather(*(c.wait_ready(30) for c in clusters))
    while len({c.epoch for c in clusters}) != 1 or any(
        c.state is not State.READY for c in clusters
    ):
        await asyncio.sleep(0.001)
    took = time.perf_counter() - started
    epochs = clusters[0].epoch
    await asyncio.gather(*(c.stop() for c in clusters))
    return took, epochs


async def mine_cost(keys: list[str]) -> tuple[float, float]:
    """ns per call of cluster.mine(key) and of the bare ring lookup, same keys, same run."""
    cluster = Cluster("bench", "a", backend="memory://bench-mine")
    others = Cluster("bench", "b", backend="memory://bench-mine")
    async with cluster, others:
        await cluster.wait_ready(5)
        while len(cluster.siblings()) != 2:
            await asyncio.sleep(0.01)
        mine, ring, me = cluster.mine, cluster.ring, cluster.node
        lookup = ring.key_to_node

        def via_mine() -> None:
            for key in keys:
                mine(key)

        def via_ring() -> None:
            for key in keys:
                lookup(key) == me  # noqa: B015 - the comparison is the work measured

        results: dict[str, list[float]] = {"mine": [], "ring": []}
        for _ in range(5):
            for name, fn in (("mine", via_mine), ("ring", via_ring)):
                start = time.perf_counter()
                fn()
                results[name].append((time.perf_counter() - start) / len(keys) * 1e9)
        return statistics.median(results["mine"]), statistics.median(results["ring"])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    runs = [await assemble(args.nodes, run) for run in range(args.runs)]
    assembly = statistics.median(t for t, _ in runs)
    keys = [f"foo_{i}" for i in range(1_000_000)]
    mine_ns, ring_ns = await mine_cost(keys)
    rows = [
        [
            f"{args.nodes} nodes assemble to ready (median of {args.runs})",
            f"{assembly:.3f} s",
            "< 2 s",
            assembly < 2,
        ],
        ["epochs published while assembling", runs[0][1], "-", "-"],
        ["cluster.mine(key)", f"{mine_ns:.0f} ns", "<= ring lookup", "-"],
        ["ring.key_to_node(key) == node", f"{ring_ns:.0f} ns", "-", "-"],
        ["mine / ring lookup", f"{mine_ns / ring_ns:.2f}x", "~1x", mine_ns / ring_ns < 1.5],
    ]
    print_table("cluster core, memory backend", ["figure", "measured", "target", "met"], rows)
    path = write_json(
        "cluster",
        {
            "nodes": args.nodes,
            "assembly_seconds": runs,
            "assembly_median_seconds": assembly,
            "mine_ns": mine_ns,
            "ring_lookup_ns": ring_ns,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    asyncio.run(main())
