"""Cluster behaviour on the memory backend: membership, quorum, failures, sentry, RPC."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest

from cloister import Cluster
from cloister.cluster import State
from cloister.errors import (
    ConfigurationError,
    NodeNameTakenError,
    NoSuchNodeError,
    RemoteError,
    RequestTimeoutError,
    UnknownHandlerError,
)

from .support import FAILURE_TIMEOUT, HEARTBEAT, Harness, Recorder, eventually


def states_of(events: list[tuple[Any, ...]], node: str) -> list[tuple[State, State]]:
    return [(e[2], e[3]) for e in events if e[0] == "state" and e[1] == node]


async def test_single_node_becomes_ready_and_owns_everything(harness: Harness) -> None:
    a = await harness.start("a")
    await a.wait_ready(2)
    assert a.state is State.READY
    assert a.mine("foo_1") and a.whois(("tenant", 7)) == "a"
    assert a.siblings() == ("a",)
    assert a.is_sentry and a.sentry == "a"
    assert a.epoch >= 1
    await eventually(lambda: len(states_of(harness.events, "a")) == 3)
    assert states_of(harness.events, "a") == [
        (State.DOWN, State.ASSEMBLING),
        (State.ASSEMBLING, State.REHASHING),
        (State.REHASHING, State.READY),
    ]


async def test_consensus_three_no_ready_before_the_third(harness: Harness) -> None:
    a = await harness.start("a", consensus=3)
    b = await harness.start("b", consensus=3)
    await asyncio.sleep(5 * HEARTBEAT)
    assert a.state is State.ASSEMBLING and b.state is State.ASSEMBLING
    assert not a.mine("x") or a.state is not State.READY
    c = await harness.start("c", consensus=3)
    await eventually(lambda: harness.agreed({"a", "b", "c"}), what="all three ready")
    await eventually(lambda: all(len(states_of(harness.events, n)) >= 3 for n in "abc"))
    for node in (a, b, c):
        assert states_of(harness.events, node.node)[:3] == [
            (State.DOWN, State.ASSEMBLING),
            (State.ASSEMBLING, State.REHASHING),
            (State.REHASHING, State.READY),
        ]
    # keys are split, each key has exactly one owner
    keys = [f"foo_{i}" for i in range(3000)]
    owners = [[n.node for n in (a, b, c) if n.mine(k)] for k in keys]
    assert all(len(o) == 1 for o in owners)
    assert {o[0] for o in owners} == {"a", "b", "c"}


async def test_convergence_within_three_heartbeats_on_join(harness: Harness) -> None:
    for name in "abc":
        await harness.start(name)
    await eventually(lambda: harness.agreed({"a", "b", "c"}))
    started = time.monotonic()
    await harness.start("d")
    took = await eventually(lambda: harness.agreed({"a", "b", "c", "d"}))
    assert time.monotonic() - started <= 3 * HEARTBEAT + 0.1, took


async def test_crash_while_ready_rehashes_without_it(harness: Harness) -> None:
    nodes = [await harness.start(n) for n in "abc"]
    await eventually(lambda: harness.agreed({"a", "b", "c"}))
    epoch = nodes[0].epoch
    harness.world.crash("b")
    took = await eventually(lambda: harness.agreed({"a", "c"}), what="survivors agree")
    assert took <= FAILURE_TIMEOUT + 3 * HEARTBEAT + 0.1
    assert nodes[0].epoch > epoch
    # Seen by the sentry's probes (no responders), not told by a goodbye.
    assert sum(n.counters.crashes_seen for n in nodes if n.node != "b") == 1
    await eventually(lambda: states_of(harness.events, "c")[-1] == (State.REHASHING, State.READY))
    for survivor in (nodes[0], nodes[2]):
        transitions = states_of(harness.events, survivor.node)
        assert (State.READY, State.REHASHING) in transitions[3:]
        assert transitions[-1] == (State.REHASHING, State.READY)
    assert nodes[0].ring == nodes[2].ring


async def test_quorum_loss_sends_everyone_to_rehashing(harness: Harness) -> None:
    nodes = [await harness.start(n, consensus=3) for n in "abc"]
    await eventually(lambda: harness.agreed({"a", "b", "c"}))
    harness.world.crash("c")
    await eventually(
        lambda: (
            all(n.state is State.REHASHING for n in nodes[:2])
            and nodes[0].epoch == nodes[1].epoch
            and set(nodes[0].siblings()) == {"a", "b"}
        )
    )
    await asyncio.sleep(5 * HEARTBEAT)
    assert all(n.state is State.REHASHING for n in nodes[:2])  # nobody processes while short
    await harness.start("c2", consensus=3)
    await eventually(lambda: harness.agreed({"a", "b", "c2"}))


async def test_graceful_leave_is_seen_at_once(harness: Harness) -> None:
    nodes = [await harness.start(n, failure_timeout=2.0) for n in "abc"]
    await eventually(lambda: harness.agreed({"a", "b", "c"}))
    started = time.monotonic()
    await nodes[1].stop()
    took = await eventually(lambda: harness.agreed({"a", "c"}))
    assert time.monotonic() - started < 0.5 < 2.0, took  # well under the failure timeout
    assert states_of(harness.events, "b")[-2:] == [
        (State.READY, State.STOPPING),
        (State.STOPPING, State.STOPPED),
    ]


async def test_crashed_node_restarts_under_the_same_name(harness: Harness) -> None:
    for name in "ab":
        await harness.start(name, failure_timeout=5.0)
    await eventually(lambda: harness.agreed({"a", "b"}))
    harness.world.crash("b")
    # its record is still there (failure timeout 5 s) but nobody answers for it: take over
    restarted = await harness.start("b", failure_timeout=5.0)
    await eventually(lambda: harness.agreed({"a", "b"}))
    assert restarted.state is State.READY


async def test_duplicate_live_name_is_refused(harness: Harness) -> None:
    await harness.start("a")
    with pytest.raises(NodeNameTakenError, match="already used by a live member"):
        await harness.start("a")


async def test_listener_order_and_failures_never_kill_the_node(harness: Harness) -> None:

    failing = Recorder("a", harness.events, fail=True)
    a = await harness.start("a", listener=failing)
    await a.wait_ready(2)
    await harness.start("b")
    await eventually(lambda: harness.agreed({"a", "b"}))
    await a.stop()
    transitions = states_of(harness.events, "a")
    assert transitions == [
        (State.DOWN, State.ASSEMBLING),
        (State.ASSEMBLING, State.REHASHING),
        (State.REHASHING, State.READY),
        (State.READY, State.REHASHING),
        (State.REHASHING, State.READY),
        (State.READY, State.STOPPING),
        (State.STOPPING, State.STOPPED),
    ]
    assert a.listener_errors == len(transitions)
    # sync listeners work too, and every transition is delivered in order on every node
    assert all(a_ == b_ for (_, b_), (a_, _) in itertools.pairwise(transitions))


async def test_sentry_unique_under_joins_leaves_and_crashes(harness: Harness) -> None:
    nodes = {n: await harness.start(n) for n in "abcd"}
    await eventually(lambda: harness.agreed(set("abcd")))
    first = nodes["a"].sentry
    assert first is not None
    assert sum(n.is_sentry for n in nodes.values()) == 1
    harness.world.crash(first)
    rest = set("abcd") - {first}
    await eventually(lambda: harness.agreed(rest))
    second = nodes[sorted(rest)[0]].sentry
    assert second in rest
    await nodes[second].stop()  # graceful: handed over at once
    rest.discard(second)
    await eventually(lambda: harness.agreed(rest))
    await harness.start("e")
    await eventually(lambda: harness.agreed(rest | {"e"}))
    assert sum(n.is_sentry for n in harness.live()) == 1
    # never two sentries at the same epoch, on any node
    by_epoch: dict[int, set[str]] = {}
    for event in harness.events:
        if event[0] == "sentry":
            by_epoch.setdefault(event[4], set()).add(event[3])
    assert by_epoch and all(len(s) == 1 for s in by_epoch.values()), by_epoch
    for node in harness.live():
        assert node.sentry == node.topology.sentry  # type: ignore[union-attr]


async def test_multicall_with_a_slow_node_and_a_dead_node(harness: Harness) -> None:
    nodes = [await harness.start(n) for n in "abc"]
    await eventually(lambda: harness.agreed({"a", "b", "c"}))
    for node in nodes:

        async def echo(payload: Any, me: str = node.node) -> Any:
            if me == "b":
                await asyncio.sleep(1)
            return {"from": me, "got": payload}

        node.handle("echo")(echo)
    harness.world.crash("c")
    results = await nodes[0].multicall("echo", [1, 2], timeout=0.2)
    assert results["a"].value == {"from": "a", "got": [1, 2]}
    assert isinstance(results["b"].error, RequestTimeoutError)
    assert isinstance(results["c"].error, NoSuchNodeError)
    missing = await nodes[0].multicall("nope", None, nodes=["a", "b"], timeout=0.5)
    assert all(isinstance(r.error, UnknownHandlerError) for r in missing.values())
    assert "cluster.handle('nope')" in str(missing["b"].error)
    with pytest.raises(RequestTimeoutError):
        results["b"].unwrap()


async def test_handler_errors_and_multicast(harness: Harness) -> None:
    nodes = [await harness.start(n) for n in "ab"]
    await eventually(lambda: harness.agreed({"a", "b"}))
    seen: list[tuple[str, Any]] = []
    for node in nodes:
        node.handle("boom")(lambda _p: 1 / 0)
        node.handle("note")(lambda p, me=node.node: seen.append((me, p)))
    results = await nodes[0].multicall("boom")
    assert all(
        isinstance(r.error, RemoteError) and "ZeroDivisionError" in str(r.error)
        for r in results.values()
    )
    await nodes[0].multicast("note", {"x": 1})
    await nodes[0].multicast("note", {"x": 2}, nodes=["b"])
    await eventually(lambda: len(seen) == 3)
    assert sorted(seen, key=str) == sorted(
        [("a", {"x": 1}), ("b", {"x": 1}), ("b", {"x": 2})], key=str
    )
    with pytest.raises(ConfigurationError, match="reserved"):
        nodes[0].handle("cloister.mine")(lambda p: p)


async def test_states_reports_every_node(harness: Harness) -> None:
    nodes = [await harness.start(n) for n in "abc"]
    await eventually(lambda: harness.agreed({"a", "b", "c"}))
    states = await nodes[1].states()
    assert set(states) == {"a", "b", "c"}
    for name, info in states.items():
        assert not isinstance(info, Exception)
        assert info.node == name and info.state is State.READY
        assert info.epoch == nodes[0].epoch and info.fingerprint == nodes[0].ring.fingerprint
    assert sum(info.is_sentry for info in states.values() if not isinstance(info, Exception)) == 1


async def test_partition_minority_below_consensus_stops_being_ready(harness: Harness) -> None:
    nodes = {n: await harness.start(n, consensus=3) for n in "abcde"}
    await eventually(lambda: harness.agreed(set("abcde")))
    old_epoch, seen = nodes["a"].epoch, len(harness.events)
    harness.world.partition(["d", "e"])
    # the minority cannot renew its lease: it fences itself before it expires elsewhere
    await eventually(
        lambda: nodes["d"].state is not State.READY and nodes["e"].state is not State.READY
    )
    await eventually(
        lambda: all(
            nodes[n].state is State.READY and set(nodes[n].siblings()) == set("abc") for n in "abc"
        )
    )
    # From the listeners' stamps: when the last minority node left READY, and when the
    # first majority node heard of an epoch after the partition (one without d and e).
    events = harness.events[seen:]
    minority_fenced_at = max(
        e[5] for e in events if e[0] == "state" and e[1] in "de" and e[2] is State.READY
    )
    majority_moved_at = min(e[5] for e in events if e[1] in "abc" and e[4] > old_epoch)
    assert minority_fenced_at < majority_moved_at, (minority_fenced_at, majority_moved_at)
    assert nodes["d"].state is State.REHASHING
    harness.world.heal()
    await eventually(lambda: harness.agreed(set("abcde")), timeout=5)


async def test_groups_have_their_own_rings(harness: Harness) -> None:
    a = await harness.start("a", groups=["gpu"])
    b = await harness.start("b")
    c = await harness.start("c", groups=["gpu"])
    await eventually(lambda: harness.agreed({"a", "b", "c"}))
    assert b.siblings("gpu") == ("a", "c")
    assert {b.whois(f"job{i}", group="gpu") for i in range(200)} == {"a", "c"}
    assert {b.whois(f"job{i}") for i in range(200)} == {"a", "b", "c"}
    assert a.whois("x", group="gpu") == c.whois("x", group="gpu")


async def test_expected_nodes_must_be_present(harness: Harness) -> None:
    a = await harness.start("a", expected=["a", "z"])
    await asyncio.sleep(5 * HEARTBEAT)
    assert a.state is State.ASSEMBLING
    await harness.start("z", expected=["a", "z"])
    await eventually(lambda: harness.agreed({"a", "z"}))


async def test_different_worlds_and_cluster_names_are_isolated(harness: Harness) -> None:
    a = await harness.start("a")
    other = Cluster(
        "other", "b", backend=harness.url, heartbeat=HEARTBEAT, failure_timeout=FAILURE_TIMEOUT
    )
    async with other:
        await other.wait_ready(2)
        await a.wait_ready(2)
        assert a.siblings() == ("a",) and other.siblings() == ("b",)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"consensus": 0}, "consensus must be a whole number >= 1"),
        ({"consensus": "3"}, "consensus must be a whole number >= 1"),
        ({"backend": "redis2://x"}, "unknown backend URL"),
        ({"heartbeat": 1.0, "failure_timeout": 1.0}, "at least 2 heartbeats"),
        ({"weight": -1}, "weight must be a positive number"),
        ({"node": "bad name!"}, "invalid node name"),
        ({"groups": ["ok", ""]}, "invalid group"),
    ],
)
async def test_bad_configuration_is_a_clear_error(kwargs: dict[str, Any], message: str) -> None:
    backend = kwargs.pop("backend", "memory://bad-config")
    with pytest.raises(ConfigurationError, match=message):
        cluster = Cluster("test", kwargs.pop("node", "n"), backend=backend, **kwargs)
        await cluster.start()


async def test_mine_is_a_synchronous_placement_lookup(harness: Harness) -> None:
    a = await harness.start("a")
    b = await harness.start("b")
    assert not asyncio.iscoroutinefunction(a.mine)
    await eventually(lambda: harness.agreed({"a", "b"}))
    keys = [f"k{i}" for i in range(500)]
    assert [a.mine(k) for k in keys] == [a.whois(k) == "a" for k in keys]
    assert [a.mine(k) for k in keys] == [not b.mine(k) for k in keys]
    assert {a.whois(k) for k in keys} == {"a", "b"}


async def test_a_crashed_process_is_removed_long_before_its_ttl(harness: Harness) -> None:
    # A TTL of 60 s: the survivors can only agree within the wait below if the crash was
    # seen at once (requests to the dead node find no responders), not by its expiry.
    nodes = [await harness.start(n, failure_timeout=60.0) for n in "abc"]
    await eventually(lambda: harness.agreed({"a", "b", "c"}))
    victim = next(n for n in nodes if not n.is_sentry)
    harness.world.crash(victim.node)
    await eventually(lambda: harness.agreed({n.node for n in nodes} - {victim.node}), timeout=10)
    assert sum(n.counters.crashes_seen for n in nodes) == 1


async def test_a_live_node_is_never_removed_by_the_probes(harness: Harness) -> None:
    nodes = [await harness.start(n) for n in "ab"]
    await eventually(lambda: harness.agreed({"a", "b"}))
    epoch = nodes[0].epoch
    await asyncio.sleep(10 * HEARTBEAT)  # many rounds of probes of a live member
    assert all(n.counters.crashes_seen == 0 for n in nodes)
    assert nodes[0].epoch == nodes[1].epoch == epoch


async def test_a_crashed_sentry_is_replaced_long_before_its_ttl(harness: Harness) -> None:
    nodes = [await harness.start(n, failure_timeout=60.0) for n in "abc"]
    await eventually(lambda: harness.agreed({"a", "b", "c"}))
    victim = next(n for n in nodes if n.is_sentry)
    harness.world.crash(victim.node)
    survivors = [n for n in nodes if n is not victim]
    await eventually(lambda: harness.agreed({n.node for n in survivors}), timeout=10)
    assert sum(n.is_sentry for n in survivors) == 1
    assert sum(n.counters.crashes_seen for n in survivors) == 1
