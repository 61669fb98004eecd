"""What a fault run did, checked against issue 12's "How it is judged".

Pure functions over what a run leaves behind — the handlers' journals, the producer's
acknowledgements, the payload writes the medium accepted, the final stored payloads and
the nodes' event lines — so the same checks serve the tests and ``bench/faults.py``.

Times are ``time.monotonic()`` of this machine, one clock for every process.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cloister.testing import NodeEvent

Interval = tuple[float, float]


@dataclass(frozen=True, slots=True)
class Handling:
    """One journal line: a callback that ran to its end on ``node``."""

    kind: str  # "cast" or "perform"
    node: str
    key: str
    seq: int
    fence: int
    start: float
    end: float
    pid: int


@dataclass(frozen=True, slots=True)
class Write:
    """One payload write the medium accepted (seen by the producer's watcher)."""

    key: str
    revision: int
    payload: tuple[int, ...]
    t: float


@dataclass(frozen=True, slots=True)
class Epoch:
    """A node adopted epoch ``epoch`` listing ``members`` at ``t``."""

    node: str
    epoch: int
    members: frozenset[str]
    t: float


@dataclass(slots=True)
class Report:
    """The checker's findings. ``failures()`` lists every figure that must be 0."""

    acked: int = 0
    handled: int = 0
    lost: int = 0  # acknowledged casts missing from the final payloads
    payload_duplicates: int = 0  # a seq twice in one final payload (never allowed)
    payload_disorder: int = 0  # adjacent inversions in final payloads
    payload_unacked: int = 0  # seqs in a payload that were never acknowledged (reported)
    order_violations: int = 0  # a key's new seq handled after a higher one
    zombie_handlings: int = 0  # handlings started by a node after it lost the key
    token_not_increasing: int = 0  # a new owner's first handlings under the old fence
    handled_while_suspended: int = 0  # ... after the node itself said it stopped
    stale_writes: int = 0  # accepted writes that do not extend the key's previous write
    overlaps: int = 0  # two nodes in one key's handler at once, the first not frozen
    overlaps_frozen: int = 0  # the same with the first frozen mid-call (allowed)
    fenced_late: int = 0  # a cut-off node still working when its keys were given away
    unexpected_removals: int = 0  # epochs dropping a node the fault should not remove
    suspensions: int = 0  # suspended lines of nodes the fault should not suspend
    keys_moved: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)

    def failures(self) -> dict[str, int]:
        """Every figure that must be 0 and is not."""
        must_be_zero = (
            "lost",
            "payload_duplicates",
            "payload_disorder",
            "order_violations",
            "zombie_handlings",
            "token_not_increasing",
            "handled_while_suspended",
            "stale_writes",
            "overlaps",
            "fenced_late",
            "unexpected_removals",
            "suspensions",
        )
        return {name: getattr(self, name) for name in must_be_zero if getattr(self, name)}

    def note(self, what: str, example: str, keep: int = 5) -> None:
        """Keep a few examples of each finding, for the failure message."""
        found = self.examples.setdefault(what, [])
        if len(found) < keep:
            found.append(example)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line of figures and, below it, the examples."""
        skip = {"examples"}
        figures = " ".join(f"{k}={v}" for k, v in self.as_dict().items() if k not in skip)
        lines = [figures, *(f"  {k}: {v}" for k, v in self.examples.items())]
        return "\n".join(lines)


# -- reading what a run left behind ------------------------------------------------------------


def read_journals(paths: Iterable[Path]) -> list[Handling]:
    """Every complete journal line of ``paths`` (a line cut by SIGKILL is skipped)."""
    found = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                doc = json.loads(line)
                found.append(
                    Handling(
                        str(doc["kind"]), str(doc["node"]), str(doc["key"]), int(doc["seq"]),
                        int(doc["fence"]), float(doc["start"]), float(doc["end"]), int(doc["pid"]),
                    )
                )  # fmt: skip
            except (ValueError, KeyError, TypeError):
                continue
    return sorted(found, key=lambda h: h.start)


def read_acked(path: Path) -> dict[str, list[int]]:
    """key -> the seqs the backend acknowledged, in order."""
    acked: dict[str, list[int]] = defaultdict(list)
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if len(parts) == 3:
                acked[parts[0]].append(int(parts[1]))
    return dict(acked)


def read_writes(path: Path) -> list[Write]:
    """Every payload write the producer's watcher saw, in revision order."""
    writes = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc.get("payload"), list) and isinstance(doc.get("key"), str):
                payload = tuple(int(s) for s in doc["payload"])
                writes.append(Write(doc["key"], int(doc["rev"]), payload, float(doc["t"])))
    return sorted(writes, key=lambda w: w.revision)


def epochs_of(events: Mapping[str, Sequence[NodeEvent]]) -> list[Epoch]:
    """Every ``epoch`` line of every node, in time order."""
    found = [
        Epoch(node, event.epoch, frozenset(event.members), event.t)
        for node, lines in events.items()
        for event in lines
        if event.kind == "epoch" and event.epoch is not None
    ]
    return sorted(found, key=lambda e: e.t)


# -- the checks ---------------------------------------------------------------------------------


def check(
    *,
    handlings: Sequence[Handling],
    acked: Mapping[str, Sequence[int]],
    writes: Sequence[Write],
    final: Mapping[str, Sequence[int]],
    events: Mapping[str, Sequence[NodeEvent]],
    frozen: Mapping[str, Sequence[Interval]],
    may_leave: Iterable[str] = (),
    fence_first: Iterable[str] = (),
    since: float = 0.0,
) -> Report:
    """Check one run. ``frozen``: per node, when it was stopped (SIGSTOP) — a handler
    call spanning such an interval may overlap its key's next owner; ``may_leave``: the
    nodes the fault may remove or suspend; ``fence_first``: nodes cut off while running,
    which must suspend before their keys are given away; ``since``: when the cluster was
    ready (epochs and suspensions before it are the start-up's)."""
    report = Report(acked=sum(len(s) for s in acked.values()))
    casts = [h for h in handlings if h.kind == "cast"]
    report.handled = len(casts)
    check_payloads(report, acked, final)
    check_order(report, casts)
    check_zombies(report, casts, epochs_of(events), events)
    check_stale_writes(report, writes)
    check_overlaps(report, casts, frozen)
    check_membership(report, events, set(may_leave), since)
    check_fenced_first(report, events, fence_first, since)
    report.keys_moved = sum(1 for ks in by_key(casts).values() if len({h.node for h in ks}) > 1)
    return report


def by_key(handlings: Iterable[Handling]) -> dict[str, list[Handling]]:
    """Handlings grouped per key, each group in start order."""
    grouped: dict[str, list[Handling]] = defaultdict(list)
    for h in sorted(handlings, key=lambda h: h.start):
        grouped[h.key].append(h)
    return grouped


def check_payloads(
    report: Report, acked: Mapping[str, Sequence[int]], final: Mapping[str, Sequence[int]]
) -> None:
    """Final payload = every acknowledged seq, once, in order (DESIGN: at-least-once
    delivery, but a redelivered message's effect on the payload is never doubled)."""
    for key, seqs in acked.items():
        payload = list(final.get(key, ()))
        present = set(payload)
        missing = [s for s in seqs if s not in present]
        report.lost += len(missing)
        if missing:
            report.note("lost", f"{key}: missing {missing[:8]} of {len(seqs)} acked")
        dupes = len(payload) - len(present)
        report.payload_duplicates += dupes
        if dupes:
            report.note("payload_duplicates", f"{key}: {payload}")
        inversions = sum(1 for a, b in itertools.pairwise(payload) if b < a)
        report.payload_disorder += inversions
        if inversions:
            report.note("payload_disorder", f"{key}: {payload}")
        report.payload_unacked += len(present - set(seqs))


def check_order(report: Report, casts: Sequence[Handling]) -> None:
    """Per key, a seq handled for the first time after a higher one is out of order."""
    for key, handlings in by_key(casts).items():
        seen: set[int] = set()
        highest = 0
        for h in handlings:
            if h.seq in seen:
                continue  # a redelivery: at-least-once allows it
            if h.seq < highest:
                report.order_violations += 1
                report.note("order_violations", f"{key}: {h.seq} after {highest} on {h.node}")
            seen.add(h.seq)
            highest = max(highest, h.seq)


def check_zombies(
    report: Report,
    casts: Sequence[Handling],
    epochs: Sequence[Epoch],
    events: Mapping[str, Sequence[NodeEvent]],
) -> None:
    """Handlings started by a node after it lost the key, and fences that do not grow.

    Each owner of a key settles on a later epoch than the owner before it, so its fence
    (``self.fence``, the epoch it settled on) is higher. A node that handles a key again
    after another node handled it, under a fence no higher than that node's, works a key
    it lost (a zombie); a node that takes a key over under a fence no higher than the
    previous owner's hands out a token that cannot tell the two apart. A node also lost
    its keys once any node adopted an epoch later than its fence without it; and a node
    that printed ``suspended`` may start nothing until its manager is up again.
    """
    for key, handlings in by_key(casts).items():
        check_key_fences(report, key, handlings, epochs)
    for h in casts:
        if suspended_at(h.node, h.start, events.get(h.node, ())):
            report.handled_while_suspended += 1
            report.note("handled_while_suspended", f"{h.key} seq {h.seq} on {h.node}")


def check_key_fences(
    report: Report, key: str, handlings: Sequence[Handling], epochs: Sequence[Epoch]
) -> None:
    """The fence rules of :func:`check_zombies` along one key's handlings."""
    owner: Handling | None = None  # the latest handling by the key's rightful owner
    zombies: dict[str, int] = {}  # node -> the rival fence it must exceed to be believed
    worked: set[str] = set()
    for h in handlings:
        rival = zombies.get(h.node)
        if rival is not None and h.fence <= rival:
            report.zombie_handlings += 1  # still working a key it lost
            continue
        zombies.pop(h.node, None)
        if owner is not None and owner.node != h.node and h.fence <= owner.fence:
            what = "zombie_handlings" if h.node in worked else "token_not_increasing"
            setattr(report, what, getattr(report, what) + 1)
            report.note(
                what,
                f"{key} seq {h.seq} on {h.node} under fence {h.fence} at {h.start:.3f}, "
                f"after {owner.node} handled seq {owner.seq} under fence {owner.fence} "
                f"at {owner.start:.3f}",
            )
            if h.node in worked:
                zombies[h.node] = owner.fence
                continue
        elif (lost := lost_at(h.node, h.fence, epochs)) is not None and h.start > lost:
            report.zombie_handlings += 1
            report.note(
                "zombie_handlings",
                f"{key} seq {h.seq} on {h.node} fence {h.fence} at {h.start:.3f}: an epoch "
                f"without {h.node} was adopted at {lost:.3f}",
            )
        worked.add(h.node)
        owner = h


def lost_at(node: str, fence: int, epochs: Sequence[Epoch]) -> float | None:
    """When the first epoch later than ``fence`` that lists no ``node`` was adopted."""
    for epoch in epochs:
        if epoch.epoch > fence and node not in epoch.members:
            return epoch.t
    return None


def suspended_at(node: str, t: float, events: Sequence[NodeEvent]) -> bool:
    """Whether ``node``'s last word before ``t`` was ``suspended`` or ``paused`` (not up,
    ready or resumed again since).

    Only a ``suspended`` line of this node itself counts, so nothing here depends on
    the clocks of two processes agreeing closely.
    """
    suspended = False
    for event in events:
        if event.t >= t:
            break
        if event.kind == "paused" or (
            event.kind == "suspended" and event.fields.get("reason") != "stopping"
        ):
            suspended = True
        elif event.kind == "resumed":
            suspended = False
        elif event.kind == "manager" and "up" in event.words:
            suspended = False  # settled again: it may work what it owns now
        elif event.kind == "state" and event.change[1] == "ready":
            suspended = False
    return suspended


def check_stale_writes(report: Report, writes: Sequence[Write]) -> None:
    """A write the medium accepted that does not extend the key's previous write is
    stale: it came from a node that no longer had the key's latest state."""
    last: dict[str, Write] = {}
    for w in writes:
        before = last.get(w.key)
        if before is not None and w.payload[: len(before.payload)] != before.payload:
            report.stale_writes += 1
            report.note(
                "stale_writes",
                f"{w.key} rev {w.revision}: {len(w.payload)} seqs ending "
                f"{list(w.payload[-3:])} over {len(before.payload)} ending "
                f"{list(before.payload[-3:])}",
            )
        last[w.key] = w


def check_overlaps(
    report: Report, casts: Sequence[Handling], frozen: Mapping[str, Sequence[Interval]]
) -> None:
    """Two nodes inside one key's handler at once: allowed only when the first one's
    node was frozen (SIGSTOP) during that call."""
    for key, handlings in by_key(casts).items():
        latest: dict[str, Handling] = {}  # per node, the handling that ended last
        for h in handlings:
            for node, other in latest.items():
                if node == h.node or other.end <= h.start:
                    continue
                if any(a < other.end and b > other.start for a, b in frozen.get(node, ())):
                    report.overlaps_frozen += 1
                else:
                    report.overlaps += 1
                    report.note(
                        "overlaps",
                        f"{key}: {node} seq {other.seq} [{other.start:.3f}, {other.end:.3f}] "
                        f"and {h.node} seq {h.seq} from {h.start:.3f}",
                    )
            if h.node not in latest or latest[h.node].end < h.end:
                latest[h.node] = h


def check_membership(
    report: Report, events: Mapping[str, Sequence[NodeEvent]], may_leave: set[str], since: float
) -> None:
    """A fault that should remove nobody (a blocked handler, a server loss) must not
    change the member set, nor suspend a node. A node counts as removed from an epoch
    when an earlier epoch listed it (a node joining later is not missing before)."""
    seen: set[str] = set()
    dropped: set[int] = set()
    for epoch in epochs_of(events):
        missing = (seen - may_leave) - epoch.members
        if epoch.t > since and missing and epoch.epoch not in dropped:
            dropped.add(epoch.epoch)
            report.note("unexpected_removals", f"epoch {epoch.epoch}: {sorted(epoch.members)}")
        seen |= epoch.members
    report.unexpected_removals = len(dropped)
    for node, lines in events.items():
        if node in may_leave:
            continue
        for event in lines:
            reason = event.fields.get("reason")
            if event.kind == "suspended" and event.t > since and reason != "stopping":
                report.suspensions += 1
                report.note("suspensions", f"{node} {event.fields} at {event.t:.3f}")


def check_fenced_first(
    report: Report, events: Mapping[str, Sequence[NodeEvent]], nodes: Iterable[str], since: float
) -> None:
    """A node cut off (still running) must stop working — say ``suspended`` or ``paused``
    — before any node adopts an epoch that gives its keys away (an order, not a
    duration)."""
    epochs = epochs_of(events)
    for node in nodes:
        given_away = next(
            (e.t for e in epochs if e.t > since and e.node != node and node not in e.members),
            None,
        )
        if given_away is None:
            continue
        fenced = [
            e.t
            for e in events.get(node, ())
            if since < e.t
            and (
                e.kind == "paused"
                or (e.kind == "suspended" and e.fields.get("reason") != "stopping")
            )
        ]
        if not fenced or fenced[0] > given_away:
            report.fenced_late += 1
            report.note(
                "fenced_late",
                f"{node}: keys given away at {given_away:.3f}, stopped at "
                f"{fenced[0] if fenced else None}",
            )


# -- figures for the benchmark -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pauses:
    """How long work paused around a fault at ``at`` (seconds; None: nothing to measure)."""

    moved_keys: int
    moved_pause_median: float | None
    moved_pause_max: float | None
    stall_elsewhere: float | None  # longest gap across keys not on the faulted node
    stall_faulted_others: float | None  # ... across the faulted node's other keys


def pauses(
    casts: Sequence[Handling],
    at: float,
    until: float,
    faulted: str | None,
    faulted_key: str | None = None,
) -> Pauses:
    """The pause of moved keys and the processing stalls around a fault at ``at``.

    A key moved if its first handling after ``at`` ran on another node than its last one
    before; its pause is from ``at`` to that first handling on the new owner. A stall is
    the longest gap between handling starts in ``[at, until]`` over a set of keys: those
    whose last handling before ``at`` was not on ``faulted`` (every key if ``faulted`` is
    None), and those that were on ``faulted`` except ``faulted_key`` (the key of a
    blocked handler: a blocked handler should stall its own key only).
    """
    moved: list[float] = []
    elsewhere: list[float] = []
    others: list[float] = []
    for key, handlings in by_key(h for h in casts if h.kind == "cast").items():
        before = [h for h in handlings if h.start < at]
        later = [h for h in handlings if h.start >= at]
        after = [h for h in later if h.start <= until]
        if not before:
            continue
        owner = before[-1].node
        new = [h for h in later if h.node != owner]
        if new and later[0].node != owner:
            moved.append(new[0].start - at)
        if owner != faulted:
            elsewhere += [h.start for h in after]
        elif key != faulted_key:
            others += [h.start for h in after]
    moved.sort()
    return Pauses(
        moved_keys=len(moved),
        moved_pause_median=moved[len(moved) // 2] if moved else None,
        moved_pause_max=moved[-1] if moved else None,
        stall_elsewhere=longest_gap(at, elsewhere, until) if elsewhere or not faulted else None,
        stall_faulted_others=longest_gap(at, others, until) if faulted else None,
    )


def longest_gap(at: float, starts: Iterable[float], until: float) -> float:
    """The longest time in ``[at, until]`` with no start (``until - at`` with none)."""
    marks = [at, *sorted(starts), until]
    return max(b - a for a, b in itertools.pairwise(marks))
