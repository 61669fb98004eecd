"""The fault checker itself, on hand-made journals: each rule finds what it is for, and
a clean run shows nothing (a checker that passes everything would prove nothing)."""

from __future__ import annotations

from cloister.testing import NodeEvent, parse_event
from tests.faults import checker
from tests.faults.checker import Handling, Write


def cast(node: str, seq: int, fence: int, start: float, end: float | None = None) -> Handling:
    return Handling(
        "cast", node, "k000", seq, fence, start, start + 0.01 if end is None else end, 1
    )


def events(*lines: str) -> list[NodeEvent]:
    """The events of these messages, as a node logs them (a record of cloister.events)."""
    logged = (f"2026-12-01T00:00:00.000+00:00 INFO cloister.events: {m}" for m in lines)
    parsed = [parse_event(line) for line in logged]
    assert all(parsed), lines
    return [e for e in parsed if e is not None]


def run(
    handlings: list[Handling],
    *,
    acked: list[int] | None = None,
    final: list[int] | None = None,
    writes: list[Write] | None = None,
    node_events: dict[str, list[NodeEvent]] | None = None,
    frozen: dict[str, list[tuple[float, float]]] | None = None,
    may_leave: tuple[str, ...] = (),
    fence_first: tuple[str, ...] = (),
) -> checker.Report:
    seqs = sorted({h.seq for h in handlings})
    return checker.check(
        handlings=handlings,
        acked={"k000": seqs if acked is None else acked},
        writes=writes or [],
        final={"k000": seqs if final is None else final},
        events=node_events or {},
        frozen=frozen or {},
        may_leave=may_leave,
        fence_first=fence_first,
    )


def test_a_clean_handoff_shows_nothing() -> None:
    report = run([cast("a", 1, 2, 1.0), cast("a", 2, 2, 2.0), cast("b", 3, 3, 3.0)])
    assert report.failures() == {}
    assert report.keys_moved == 1


def test_a_lost_cast_a_duplicate_and_disorder_in_the_final_payload() -> None:
    report = run([cast("a", 1, 2, 1.0), cast("a", 2, 2, 2.0)], acked=[1, 2, 3], final=[2, 1, 1])
    assert report.lost == 1 and report.payload_duplicates == 1 and report.payload_disorder == 1


def test_a_seq_handled_after_a_higher_one() -> None:
    assert run([cast("a", 2, 2, 1.0), cast("a", 1, 2, 2.0)]).order_violations == 1


def test_a_resumed_node_working_a_key_it_lost_is_a_zombie_until_it_settles_anew() -> None:
    report = run(
        [
            cast("a", 1, 2, 1.0),
            cast("b", 2, 3, 2.0),  # b took the key over under epoch 3
            cast("a", 3, 2, 3.0),  # a resumes under its old fence: zombie
            cast("a", 4, 2, 3.1),  # and again
            cast("a", 5, 4, 4.0),  # a settled epoch 4: its own again
        ]
    )
    assert report.zombie_handlings == 2 and report.token_not_increasing == 0


def test_a_new_owner_under_the_old_fence() -> None:
    report = run([cast("a", 1, 2, 1.0), cast("b", 2, 2, 2.0)])
    assert report.token_not_increasing == 1 and report.zombie_handlings == 0


def test_handling_after_an_epoch_without_the_node() -> None:
    others = events("epoch 3 members=b,c sentry=b fingerprint=x t=1.5")
    report = run([cast("a", 1, 2, 1.0), cast("a", 2, 2, 2.0)], node_events={"b": others})
    assert report.zombie_handlings == 1


def test_handling_while_suspended_until_the_manager_is_up_again() -> None:
    lines = events(
        "suspended reason=lease_lost t=1.5",
        "manager up workers=3 epoch=4 t=2.5",
    )
    report = run(
        [cast("a", 1, 2, 1.0), cast("a", 2, 2, 2.0), cast("a", 3, 4, 3.0)],
        node_events={"a": lines},
        may_leave=("a",),
    )
    assert report.handled_while_suspended == 1


def test_a_write_that_does_not_extend_the_previous_one_is_stale() -> None:
    writes = [Write("k000", 1, (1, 2, 3), 1.0), Write("k000", 2, (1, 2), 2.0)]
    assert run([cast("a", 1, 2, 1.0)], writes=writes).stale_writes == 1


def test_overlaps_are_allowed_only_when_the_first_node_was_frozen() -> None:
    both = [cast("a", 1, 2, 1.0, end=5.0), cast("b", 1, 3, 3.0)]
    assert run(both).overlaps == 1
    thawed = run(both, frozen={"a": [(1.5, 4.5)]})
    assert thawed.overlaps == 0 and thawed.overlaps_frozen == 1


def test_removals_and_suspensions_a_fault_should_not_cause() -> None:
    lines = {
        "a": events(
            "epoch 2 members=a,b,c sentry=a fingerprint=x t=1.0",
            "epoch 3 members=a,c sentry=a fingerprint=y t=2.0",
        ),
        "b": events("suspended reason=lease_lost t=1.8"),
        "c": events("epoch 2 members=a,b,c sentry=a fingerprint=x t=1.0"),
    }
    report = run([cast("a", 1, 2, 0.5)], node_events=lines)
    assert report.unexpected_removals == 1 and report.suspensions == 1
    allowed = run([cast("a", 1, 2, 0.5)], node_events=lines, may_leave=("b",))
    assert allowed.unexpected_removals == 0 and allowed.suspensions == 0


def test_a_joining_node_is_not_missing_from_earlier_epochs() -> None:
    lines = {
        "a": events(
            "epoch 2 members=a,b sentry=a fingerprint=x t=1.0",
            "epoch 3 members=a,b,d sentry=a fingerprint=y t=2.0",
        ),
        "d": events("epoch 3 members=a,b,d sentry=a fingerprint=y t=2.0"),
    }
    assert run([cast("a", 1, 2, 0.5)], node_events=lines).unexpected_removals == 0


def test_a_cut_off_node_must_suspend_before_its_keys_are_given_away() -> None:
    given = events("epoch 3 members=a,c sentry=a fingerprint=y t=2.0")
    late = {"a": given, "b": events("suspended reason=lease_lost t=2.5")}
    early = {"a": given, "b": events("suspended reason=lease_lost t=1.5")}
    for lines, expected in ((late, 1), (early, 0)):
        report = run(
            [cast("a", 1, 2, 0.5)], node_events=lines, may_leave=("b",), fence_first=("b",)
        )
        assert report.fenced_late == expected


def test_pauses_of_moved_keys_and_the_stall_elsewhere() -> None:
    casts = [
        Handling("cast", "a", "k1", 1, 2, 0.0, 0.0, 1),
        Handling("cast", "b", "k1", 2, 3, 3.0, 3.0, 1),  # moved: 2 s after the fault
        Handling("cast", "c", "k2", 1, 2, 0.5, 0.5, 1),
        Handling("cast", "c", "k2", 2, 2, 1.5, 1.5, 1),
        Handling("cast", "c", "k2", 3, 2, 2.0, 2.0, 1),
    ]
    found = checker.pauses(casts, at=1.0, until=2.5, faulted="a")
    assert found.moved_keys == 1 and found.moved_pause_median == 2.0
    assert found.stall_elsewhere == 0.5  # c handled at 1.5 and 2.0, then nothing until 2.5
    assert found.stall_faulted_others == 1.5  # a had only k1, which moved: none until 2.5
