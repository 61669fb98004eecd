"""The control plane's rules, without a backend: ``decide(facts, now)`` is pure."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloister.cluster import State, SuspendReason, Topology
from cloister.cluster.control import (
    ClusterCounters,
    Decision,
    Facts,
    acknowledged,
    control_loss,
    decide,
    epoch_event_loss,
    member_loss,
    next_epoch,
    quorum,
    waits_out_the_lapse,
)
from cloister.cluster.membership import MemberRecord
from cloister.cluster.topology import EpochRecord

NOW = 1000.0
SETTLE = 0.05
HEARTBEAT = 1.0


def record(node: str, acked: int = 0, incarnation: int = 1) -> MemberRecord:
    return MemberRecord(node, incarnation, 1.0, (), 0.0, acked=acked)


def epoch(number: int, sentry: str, view: dict[str, MemberRecord]) -> EpochRecord:
    return EpochRecord(number, sentry, {name: r.spec for name, r in view.items()})


def topology(number: int, sentry: str, view: dict[str, MemberRecord]) -> Topology:
    return Topology.from_record(epoch(number, sentry, view))


def facts(**changes: Any) -> Facts:
    """A node ``a`` alone, lease valid, no sentry, nothing published, assembling."""
    base = Facts(
        node="a",
        view={"a": record("a")},
        view_changed_at=0.0,
        epoch_record=None,
        epoch_revision=None,
        sentry_holder=None,
        holds_sentry=False,
        lease_ok=True,
        sentry_ok=False,
        acked=0,
        topology=None,
        state=State.ASSEMBLING,
        suspended=True,
        consensus=1,
        expected=frozenset(),
        heartbeat=HEARTBEAT,
        settle=SETTLE,
    )
    return dataclasses.replace(base, **changes)


def sentry(**changes: Any) -> Facts:
    """``a`` holding a valid sentry lease, its view quiet."""
    return facts(**{"sentry_holder": "a", "holds_sentry": True, "sentry_ok": True, **changes})


# -- quorum -----------------------------------------------------------------------------------


def test_quorum_needs_consensus_members() -> None:
    view = {n: record(n) for n in "ab"}
    t = topology(1, "a", view)
    assert quorum(t, "a", 2, frozenset())
    assert not quorum(t, "a", 3, frozenset())


def test_quorum_needs_every_expected_node() -> None:
    t = topology(1, "a", {n: record(n) for n in "ab"})
    assert quorum(t, "a", 1, frozenset({"a", "b"}))
    assert not quorum(t, "a", 1, frozenset({"c"}))


def test_no_quorum_without_a_topology_or_outside_it() -> None:
    t = topology(1, "b", {"b": record("b")})
    assert not quorum(None, "a", 1, frozenset())
    assert not quorum(t, "a", 1, frozenset())


# -- the sentry lease and publishing ---------------------------------------------------------


def test_a_free_sentry_lease_is_claimed_with_a_valid_member_lease_only() -> None:
    assert decide(facts(), NOW).claim_sentry
    assert not decide(facts(lease_ok=False), NOW).claim_sentry
    assert not decide(facts(sentry_holder="b"), NOW).claim_sentry
    assert not decide(facts(holds_sentry=True), NOW).claim_sentry


def test_the_sentry_publishes_its_view_as_the_next_epoch() -> None:
    view = {n: record(n) for n in "ab"}
    published = decide(sentry(view=view, epoch_record=epoch(4, "b", {"b": view["b"]})), NOW)
    assert published.publish == epoch(5, "a", view)
    assert decide(sentry(), NOW).publish == epoch(1, "a", {"a": record("a")})


def test_only_the_sentry_with_a_valid_lease_publishes() -> None:
    assert decide(facts(), NOW).publish is None  # not the sentry
    assert decide(sentry(sentry_ok=False), NOW).publish is None  # its sentry lease ran out
    assert decide(sentry(lease_ok=False), NOW).publish is None  # its member lease ran out


def test_no_publish_before_the_view_is_quiet_for_settle() -> None:
    decision = decide(sentry(view_changed_at=NOW - 0.01), NOW)
    assert decision.publish is None
    assert abs(decision.delay - (SETTLE - 0.01)) < 1e-9
    assert decide(sentry(view_changed_at=NOW - 2 * SETTLE), NOW).publish is not None
    assert decide(facts(view_changed_at=NOW), NOW).delay == HEARTBEAT  # not the sentry


def test_never_a_topology_without_the_sentry() -> None:
    assert decide(sentry(view={"b": record("b")}), NOW).publish is None


def test_no_republish_of_an_identical_member_set() -> None:
    view = {n: record(n) for n in "ab"}
    assert decide(sentry(view=view, epoch_record=epoch(3, "a", view)), NOW).publish is None
    # ... unless another sentry wrote it: the new sentry names itself.
    assert decide(sentry(view=view, epoch_record=epoch(3, "b", view)), NOW).publish == epoch(
        4, "a", view
    )
    # ... or a member restarted (same names, another incarnation).
    restarted = {**view, "b": record("b", incarnation=2)}
    assert decide(sentry(view=restarted, epoch_record=epoch(3, "a", view)), NOW).publish == (
        epoch(4, "a", restarted)
    )


# -- adoption and acknowledgement -------------------------------------------------------------


def test_only_a_newer_epoch_is_adopted() -> None:
    view = {"a": record("a")}
    assert decide(facts(epoch_record=epoch(1, "a", view)), NOW).adopt == epoch(1, "a", view)
    adopted = topology(2, "a", view)
    assert decide(facts(epoch_record=epoch(3, "a", view), topology=adopted), NOW).adopt == epoch(
        3, "a", view
    )
    assert decide(facts(epoch_record=epoch(2, "a", view), topology=adopted), NOW).adopt is None
    assert decide(facts(epoch_record=epoch(1, "a", view), topology=adopted), NOW).adopt is None


def test_the_adopted_epoch_is_acknowledged_once() -> None:
    adopted = topology(2, "a", {"a": record("a")})
    assert decide(facts(topology=adopted, acked=1), NOW).ack == 2
    assert decide(facts(topology=adopted, acked=2), NOW).ack is None
    assert decide(facts(topology=adopted, acked=None), NOW).ack is None  # not joined
    assert decide(facts(acked=0), NOW).ack is None  # nothing adopted


# -- suspend, settle, state moves ------------------------------------------------------------


def test_losing_the_lease_fences_and_suspends_once() -> None:
    view = {"a": record("a", acked=1)}
    ready = facts(view=view, topology=topology(1, "a", view), state=State.READY, suspended=False)
    lost = decide(dataclasses.replace(ready, lease_ok=False), NOW)
    assert lost.fence and lost.suspend is SuspendReason.LEASE_LOST
    assert lost.move is State.REHASHING and lost.settle is None
    again = decide(
        dataclasses.replace(ready, lease_ok=False, suspended=True, state=State.REHASHING), NOW
    )
    assert not again.fence and again.suspend is None and again.move is None


def settled(**changes: Any) -> Facts:
    """``a`` alone, ready on epoch 1 it settled on, on a medium that elects (9 s)."""
    view = {"a": record("a", acked=1)}
    return facts(
        **{
            "view": view,
            "topology": topology(1, "a", view),
            "state": State.READY,
            "suspended": False,
            "settled_epoch": 1,
            "failover_time": 9.0,
            **changes,
        }
    )


def test_a_lapse_shorter_than_the_medium_s_failover_pauses_and_keeps_the_keys() -> None:
    ready = settled()
    lapsed = dataclasses.replace(ready, lease_ok=False, lapsed_for=0.1)
    first = decide(lapsed, NOW)
    assert first.fence and first.pause and first.suspend is None
    assert first.move is State.REHASHING  # not ready: readiness and listeners say so at once
    paused = dataclasses.replace(lapsed, paused=True, state=State.REHASHING, lapsed_for=5.0)
    meanwhile = decide(paused, NOW)
    assert not meanwhile.fence and not meanwhile.pause and meanwhile.suspend is None
    renewed = decide(dataclasses.replace(paused, lease_ok=True, lapsed_for=0.0), NOW)
    assert renewed.resume and renewed.move is State.READY
    assert renewed.settle is None and renewed.suspend is None  # nothing to settle again


def test_a_lapse_that_outlasts_the_failover_or_a_lost_record_suspends() -> None:
    paused = settled(state=State.REHASHING, lease_ok=False, paused=True)
    too_long = decide(dataclasses.replace(paused, lapsed_for=9.0), NOW)
    assert too_long.suspend is SuspendReason.LEASE_LOST and not too_long.fence  # counted once
    gone = decide(dataclasses.replace(paused, lapsed_for=1.0, record_lost=True), NOW)
    assert gone.suspend is SuspendReason.LEASE_LOST
    fresh = dataclasses.replace(paused, paused=False, state=State.READY, record_lost=True)
    at_once = decide(fresh, NOW)  # a rejoin after an expiry never waits
    assert at_once.fence and not at_once.pause and at_once.suspend is SuspendReason.LEASE_LOST


def test_a_medium_that_never_elects_suspends_at_once() -> None:
    view = {"a": record("a", acked=1)}
    ready = facts(view=view, topology=topology(1, "a", view), state=State.READY, suspended=False)
    lost = decide(dataclasses.replace(ready, lease_ok=False, lapsed_for=0.0), NOW)
    assert lost.suspend is SuspendReason.LEASE_LOST and not lost.pause


def test_a_newer_epoch_adopted_during_a_pause_is_settled_as_usual() -> None:
    view = {"a": record("a", acked=2), "b": record("b", acked=2)}
    paused = settled(view=view, topology=topology(2, "a", view), state=State.REHASHING)
    decision = decide(dataclasses.replace(paused, paused=True), NOW)
    assert decision.resume and decision.settle is not None and decision.settle.epoch == 2


def test_short_of_consensus_suspends_once() -> None:
    view = {"a": record("a", acked=1)}
    ready = facts(
        view=view, topology=topology(1, "a", view), state=State.READY, suspended=False, consensus=2
    )
    short = decide(ready, NOW)
    assert short.suspend is SuspendReason.SHORT_OF_CONSENSUS and not short.fence
    assert short.move is State.REHASHING and short.settle is None
    assert decide(dataclasses.replace(ready, suspended=True), NOW).suspend is None


def test_assembling_to_rehashing_to_ready_once_everyone_acked() -> None:
    view = {n: record(n, acked=1) for n in "ab"}
    t = topology(1, "a", view)
    decision = decide(facts(view=view, topology=t, acked=1, consensus=2), NOW)
    assert decision.move is State.REHASHING
    assert decision.settle is t and decision.move_after_settle is State.READY
    assert decision.suspend is None


def test_no_settle_until_every_member_acked_in_its_incarnation() -> None:
    view = {"a": record("a", acked=2), "b": record("b", acked=1)}
    t = topology(2, "a", view)
    waiting = decide(facts(view=view, topology=t, state=State.REHASHING, acked=2), NOW)
    assert waiting.settle is None and waiting.move is None
    restarted = {**view, "b": record("b", acked=2, incarnation=9)}  # acked, but not the same b
    assert decide(facts(view=restarted, topology=t, state=State.REHASHING), NOW).settle is None
    acked = {**view, "b": record("b", acked=2)}
    done = decide(facts(view=acked, topology=t, state=State.REHASHING), NOW)
    assert done.settle is t and done.move is None and done.move_after_settle is State.READY


def test_ready_settles_again_only_after_a_suspend() -> None:
    view = {"a": record("a", acked=1)}
    ready = facts(view=view, topology=topology(1, "a", view), state=State.READY, acked=1)
    resumed = decide(dataclasses.replace(ready, suspended=True), NOW)
    assert resumed.settle is not None and resumed.move is None and resumed.move_after_settle is None
    settled = dataclasses.replace(ready, suspended=False, sentry_holder="a")
    assert decide(settled, NOW) == Decision(delay=HEARTBEAT)


def test_a_new_epoch_while_ready_waits_for_the_acks_again() -> None:
    old = {"a": record("a", acked=1)}
    new = {**old, "b": record("b")}
    ready = facts(view=new, topology=topology(1, "a", old), state=State.READY, suspended=False)
    assert decide(dataclasses.replace(ready, epoch_record=epoch(2, "a", new)), NOW).adopt
    # _adopt moves ready -> rehashing; then nothing settles until b acked epoch 2.
    rehashing = dataclasses.replace(ready, topology=topology(2, "a", new), state=State.REHASHING)
    assert decide(rehashing, NOW).settle is None


# -- properties -------------------------------------------------------------------------------

names = st.sampled_from("abcd")
records = st.builds(record, names, acked=st.integers(0, 3), incarnation=st.integers(1, 2)).map(
    lambda r: (r.node, r)
)
views = st.lists(records, max_size=4).map(dict)


@st.composite
def any_facts(draw: st.DrawFn) -> Facts:
    view = draw(views)
    members = draw(views)
    adopted = None
    if draw(st.booleans()):
        adopted = topology(draw(st.integers(1, 3)), draw(names), members)
    published = None
    if draw(st.booleans()):
        published = epoch(draw(st.integers(1, 4)), draw(names), draw(views))
    return facts(
        view=view,
        view_changed_at=draw(st.floats(NOW - 1, NOW)),
        epoch_record=published,
        sentry_holder=draw(st.none() | names),
        holds_sentry=draw(st.booleans()),
        lease_ok=draw(st.booleans()),
        sentry_ok=draw(st.booleans()),
        acked=draw(st.none() | st.integers(0, 3)),
        topology=adopted,
        state=draw(st.sampled_from([State.ASSEMBLING, State.REHASHING, State.READY])),
        suspended=draw(st.booleans()),
        consensus=draw(st.integers(1, 4)),
        expected=frozenset(draw(st.sets(names, max_size=2))),
        record_lost=draw(st.booleans()),
        lapsed_for=draw(st.floats(0, 20)),
        paused=draw(st.booleans()),
        settled_epoch=draw(st.integers(0, 3)),
        failover_time=draw(st.sampled_from([0.0, 9.0])),
        epoch_garbage=draw(st.booleans()),
        sentry_garbage=draw(st.booleans()),
        ghosts=draw(st.dictionaries(st.sampled_from(["g1", "g2"]), st.integers(1, 9))),
        data_lost=draw(st.booleans()),
        rebuild_above=draw(st.none() | st.integers(0, 3)),
    )


@given(any_facts())
def test_never_settle_without_every_ack_and_quorum(f: Facts) -> None:
    decision = decide(f, NOW)
    if decision.settle is not None:
        t = decision.settle
        assert t is f.topology and f.lease_ok
        assert quorum(t, f.node, f.consensus, f.expected)
        for name, spec in t.members.items():
            assert f.view[name].acked == t.epoch and f.view[name].incarnation == spec.incarnation
    assert decision.settle is None or decision.suspend is None


@given(any_facts())
def test_never_publish_without_a_valid_sentry_lease(f: Facts) -> None:
    decision = decide(f, NOW)
    if decision.publish is not None:
        assert f.lease_ok and f.sentry_ok
        assert NOW - f.view_changed_at >= f.settle
        assert f.node in decision.publish.members and decision.publish.sentry == f.node
        if f.epoch_record is not None and not f.epoch_garbage:
            assert decision.publish.epoch == f.epoch_record.epoch + 1
        else:  # no readable record: above every epoch a member acknowledged
            assert all(decision.publish.epoch > r.acked for r in f.view.values())
    if decision.claim_sentry:
        assert f.lease_ok and not f.holds_sentry
        assert f.sentry_holder is None or f.sentry_garbage  # free, or unreadable


@given(any_facts())
def test_suspend_only_when_lease_or_quorum_is_lost_and_not_yet_suspended(f: Facts) -> None:
    decision = decide(f, NOW)
    lost = not (f.lease_ok and quorum(f.topology, f.node, f.consensus, f.expected))
    if f.data_lost:
        assert decision.suspend is (None if f.suspended else SuspendReason.MEDIUM_LOST)
        return
    assert (decision.suspend is not None) == (
        lost and not f.suspended and not waits_out_the_lapse(f)
    )
    assert decision.fence == (not f.lease_ok and not f.suspended and not f.paused)
    if f.topology is not None and decision.settle is not None:
        assert acknowledged(f.topology, f.view)


def test_counters_as_dict() -> None:
    counters = ClusterCounters()
    counters.fenced += 2
    assert counters.as_dict() == {
        "epochs_adopted": 0,
        "bad_records": 0,
        "fenced": 2,
        "heartbeat_failures": 0,
        "medium_data_loss": 0,
        "requests_refused": 0,
        "request_errors": 0,
        "crashes_seen": 0,
    }
    assert counters["fenced"] == 2
    with pytest.raises(KeyError):
        counters["as_dict"]


@given(any_facts())
def test_only_the_sentry_deletes_ghosts(f: Facts) -> None:
    decision = decide(f, NOW)
    if decision.delete_ghosts:
        assert f.lease_ok and f.sentry_ok
        assert dict(decision.delete_ghosts) == dict(f.ghosts)


def test_the_sentry_overwrites_a_garbage_epoch_record_above_every_acknowledged_epoch() -> None:
    view = {"a": record("a", acked=5, incarnation=1)}
    published = epoch(5, "a", {"a": record("a", acked=5, incarnation=1)})
    quiet = facts(view=view, view_changed_at=NOW - 1, epoch_record=published, sentry_ok=True)
    assert decide(quiet, NOW).publish is None  # nothing changed
    garbage = dataclasses.replace(quiet, epoch_record=None, epoch_garbage=True)
    publish = decide(garbage, NOW).publish
    assert publish is not None and publish.epoch == 6


def test_a_garbage_sentry_lease_is_claimed_over() -> None:
    held = facts(sentry_holder="?", holds_sentry=False)
    assert not decide(held, NOW).claim_sentry
    assert decide(dataclasses.replace(held, sentry_garbage=True), NOW).claim_sentry


def test_a_sentry_whose_lease_was_written_over_stops_acting_at_once() -> None:
    """Its clock says the lease is valid, but the medium shows it at a later revision
    (somebody claimed over it, or garbage): no more publishing or deleting, no claim of
    its own either (its renewal will find out), so there are never two sentries."""
    view = {n: record(n) for n in "ab"}
    over = sentry(
        view=view,
        epoch_record=epoch(4, "b", view),
        held_sentry_revision=7,
        sentry_revision=9,
        sentry_holder="b",
        unreachable={"b": 1},
        renewed={"b": (1, 0.0)},
    )
    decision = decide(over, NOW)
    assert decision.publish is None and decision.departed == () and not decision.claim_sentry
    for seen in (7, 6, None):  # its own revision, a watch lagging behind it, nothing seen
        still = decide(dataclasses.replace(over, sentry_revision=seen), NOW)
        assert still.publish == epoch(5, "a", view)


def test_the_sentry_expires_only_records_unrenewed_for_twice_their_ttl() -> None:
    view = {"a": record("a"), "b": record("b"), "c": record("c")}
    renewed = {"a": (1, NOW - 100), "b": (2, NOW - 2.1), "c": (3, NOW - 1.9)}
    base = facts(
        view=view, renewed=renewed, failure_timeout=1.0, sentry_ok=True, view_changed_at=NOW
    )
    assert decide(base, NOW).expire == (("b", 2),)  # never our own record (a)
    assert decide(dataclasses.replace(base, failover_time=9.0), NOW).expire == ()
    assert decide(dataclasses.replace(base, sentry_ok=False), NOW).expire == ()


# -- a medium that lost its data ------------------------------------------------------------


def test_an_epoch_record_gone_or_at_a_lower_revision_is_a_loss() -> None:
    assert control_loss(knew_epoch=False, known_revision=None, listed_revision=None) is None
    assert control_loss(True, 7, 7) is None
    assert control_loss(True, 7, 9) is None  # a newer epoch
    assert "gone" in (control_loss(True, 7, None) or "")
    assert "from 7 to 2" in (control_loss(True, 7, 2) or "")


def test_a_member_record_at_a_lower_revision_is_a_loss() -> None:
    assert member_loss({"a": 5}, {"a": 6, "b": 1}) is None  # b is new: never seen before
    assert member_loss({"a": 5, "b": 3}, {"a": 6}) is None  # b left
    assert "'a' went back from revision 5 to 2" in (member_loss({"a": 5}, {"a": 2}) or "")


@st.composite
def epoch_history(draw: st.DrawFn) -> list[tuple[int, int]]:
    """(epoch, revision) of the epoch record as written in order, by compare-and-set:
    each write a higher epoch (a garbage record in between only skips revisions)."""
    steps = draw(st.lists(st.tuples(st.integers(1, 2), st.integers(1, 5)), min_size=2))
    history, epoch_number, revision = [], 0, 0
    for more, gap in steps:
        epoch_number, revision = epoch_number + more, revision + gap
        history.append((epoch_number, revision))
    return history


@given(epoch_history(), st.data())
def test_a_replayed_epoch_is_never_taken_for_a_loss(
    history: list[tuple[int, int]], data: st.DataObject
) -> None:
    """A watch may deliver any older record after a listing showed a newer one."""
    known = data.draw(st.sampled_from(history))
    seen = data.draw(st.sampled_from(history))
    record = EpochRecord(known[0], "a", {})
    assert epoch_event_loss(record, known[1], *seen) is None


@given(epoch_history(), st.integers(1, 3), st.data())
def test_a_newer_epoch_at_a_recounted_revision_is_a_loss(
    history: list[tuple[int, int]], above: int, data: st.DataObject
) -> None:
    """After the medium lost its data the sentry publishes above the last epoch, and the
    re-created bucket counts revisions from 1 again."""
    known = history[-1]
    revision = data.draw(st.integers(1, known[1] - 1)) if known[1] > 1 else None
    if revision is None:
        return
    record = EpochRecord(known[0], "a", {})
    assert epoch_event_loss(record, known[1], known[0] + above, revision) is not None


def test_a_data_loss_suspends_and_leaves_ready() -> None:
    view = {"a": record("a", acked=3)}
    t = topology(3, "a", view)
    lost = facts(view=view, topology=t, state=State.READY, suspended=False, data_lost=True)
    decision = decide(lost, NOW)
    assert decision.suspend is SuspendReason.MEDIUM_LOST
    assert decision.move is State.REHASHING
    assert decision.settle is None


def test_after_a_loss_the_node_settles_only_on_a_later_epoch() -> None:
    view = {"a": record("a", acked=3)}
    waiting = facts(view=view, topology=topology(3, "a", view), state=State.REHASHING)
    assert decide(waiting, NOW).settle is not None  # (no loss: it would settle)
    assert decide(dataclasses.replace(waiting, rebuild_above=3), NOW).settle is None
    view = {"a": record("a", acked=4)}
    later = facts(
        view=view, topology=topology(4, "a", view), state=State.REHASHING, rebuild_above=3
    )
    assert decide(later, NOW).settle == later.topology


def test_a_sentry_that_forgot_the_lost_epoch_publishes_above_everything_adopted() -> None:
    """The wedge of a lost medium: the epoch record is gone (forgotten), so the sentry
    publishes one — above its own topology and every member's acknowledgement — and
    creates the key instead of updating one that no longer exists."""
    view = {"a": record("a", acked=5), "b": record("b", acked=6)}
    f = sentry(view=view, topology=topology(5, "a", view), acked=5, rebuild_above=5)
    decision = decide(f, NOW)
    assert decision.publish is not None and decision.publish.epoch == 7
    assert next_epoch(f) == decision.publish


@given(any_facts())
def test_never_settle_on_an_epoch_from_before_the_loss(f: Facts) -> None:
    decision = decide(f, NOW)
    if decision.settle is not None:
        assert not f.data_lost
        assert f.rebuild_above is None or decision.settle.epoch > f.rebuild_above


# -- crashes seen before the TTL (no responders) ------------------------------------------------


def test_the_sentry_deletes_the_records_of_members_whose_process_is_gone() -> None:
    view = {"a": record("a"), "b": record("b"), "c": record("c")}
    renewed = {"a": (1, NOW), "b": (2, NOW), "c": (3, NOW)}
    base = sentry(view=view, renewed=renewed, unreachable={"b": 2}, view_changed_at=NOW)
    assert decide(base, NOW).departed == (("b", 2),)
    assert decide(base, NOW).expire == ()  # long before its TTL


def test_a_record_renewed_since_the_probe_stays() -> None:
    view = {"a": record("a"), "b": record("b")}
    base = sentry(view=view, renewed={"a": (1, NOW), "b": (5, NOW)}, unreachable={"b": 2})
    assert decide(base, NOW).departed == ()  # b wrote revision 5 after the probe: alive


def test_only_a_valid_sentry_deletes_the_records_of_the_dead() -> None:
    view = {"a": record("a"), "b": record("b")}
    renewed = {"a": (1, NOW), "b": (2, NOW)}
    gone = sentry(view=view, renewed=renewed, unreachable={"b": 2, "a": 1, "x": 9})
    assert decide(gone, NOW).departed == (("b", 2),)  # never ourselves, nor a stranger
    assert decide(dataclasses.replace(gone, sentry_ok=False), NOW).departed == ()
    assert decide(dataclasses.replace(gone, lease_ok=False), NOW).departed == ()


@given(
    st.dictionaries(st.sampled_from("abcd"), st.integers(1, 5)),
    st.dictionaries(st.sampled_from("abcd"), st.integers(1, 5)),
)
def test_departed_records_are_probed_at_the_revision_they_still_have(
    unreachable: dict[str, int], revisions: dict[str, int]
) -> None:
    view = {n: record(n) for n in revisions}
    renewed = {n: (r, NOW) for n, r in revisions.items()}
    base = sentry(view=view, renewed=renewed, unreachable=unreachable)
    for name, revision in decide(base, NOW).departed:
        assert name != "a" and name in view
        assert revisions[name] == revision == unreachable[name]


def test_any_member_claims_over_the_lease_of_a_sentry_whose_process_is_gone() -> None:
    view = {"a": record("a"), "b": record("b")}
    renewed = {"a": (1, NOW), "b": (2, NOW)}
    alive = facts(view=view, renewed=renewed, sentry_holder="b", sentry_revision=7)
    assert not decide(alive, NOW).claim_sentry  # b holds it and answers
    gone = dataclasses.replace(alive, unreachable={"b": 2})
    decision = decide(gone, NOW)
    assert decision.claim_sentry and decision.claim_over == 7
    assert decision.departed == ()  # the record is the sentry's to delete, once claimed
    renewed_since = dataclasses.replace(gone, renewed={"a": (1, NOW), "b": (3, NOW)})
    assert not decide(renewed_since, NOW).claim_sentry  # b renewed after the probe
    assert decide(dataclasses.replace(gone, lease_ok=False), NOW).claim_over is None


def test_a_sentry_never_claims_over_its_own_lease() -> None:
    view = {"a": record("a"), "b": record("b")}
    base = sentry(view=view, renewed={"a": (1, NOW)}, unreachable={"a": 1}, sentry_revision=4)
    assert decide(base, NOW).claim_over is None and not decide(base, NOW).claim_sentry
