"""The backoff primitive: capped, monotonic without jitter, resettable."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloister._backoff import Backoff

initials = st.floats(min_value=0.0, max_value=10.0, allow_nan=False)
spans = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)
factors = st.floats(min_value=1.0, max_value=10.0, allow_nan=False)
jitters = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
unit = st.floats(min_value=0.0, max_value=1.0, exclude_max=True, allow_nan=False)


@given(initials, spans, factors, jitters, st.lists(unit, min_size=1, max_size=50))
def test_delays_never_exceed_the_maximum(
    initial: float, span: float, factor: float, jitter: float, draws: list[float]
) -> None:
    randoms = itertools.cycle(draws)
    backoff = Backoff(initial, initial + span, factor, jitter=jitter, random=lambda: next(randoms))
    for delay in itertools.islice(backoff.delays(), 200):
        assert 0.0 <= delay <= backoff.maximum


@given(initials, spans, factors)
def test_delays_grow_monotonically_without_jitter(
    initial: float, span: float, factor: float
) -> None:
    backoff = Backoff(initial, initial + span, factor)
    delays = list(itertools.islice(backoff.delays(), 200))
    assert delays[0] == min(initial, backoff.maximum)
    assert all(a <= b for a, b in itertools.pairwise(delays))
    assert delays == [backoff.delay(n) for n in range(200)]


@given(initials, spans, factors, st.integers(min_value=0, max_value=50))
def test_reset_starts_again(initial: float, span: float, factor: float, taken: int) -> None:
    backoff = Backoff(initial, initial + span, factor)
    expected = list(itertools.islice(backoff.delays(), 10))
    for _ in range(taken):
        backoff.next()
    backoff.reset()
    assert [backoff.next() for _ in range(10)] == expected


@given(st.integers(min_value=0, max_value=10_000))
def test_huge_attempts_stay_at_the_cap(attempt: int) -> None:
    backoff = Backoff(0.05, 1.0)
    assert backoff.delay(attempt) == min(1.0, 0.05 * 2.0 ** min(attempt, 64))


def test_doubling_matches_the_hand_written_loops() -> None:
    """min(2 * pause, cap) from 0.02 (the loops the primitive replaced)."""
    pause, expected = 0.02, []
    for _ in range(8):
        expected.append(pause)
        pause = min(2 * pause, 0.2)
    assert list(itertools.islice(Backoff(0.02, 0.2).delays(), 8)) == expected


@given(unit)
def test_jitter_keeps_the_unjittered_share(draw: float) -> None:
    backoff = Backoff(1.0, 1.0, jitter=0.5, random=lambda: draw)
    assert 0.5 <= backoff.delay(3) <= 1.0  # at least half is kept (rounding: 0.5 itself)
    assert Backoff(1.0, 1.0, jitter=1.0, random=lambda: draw).delay(0) == pytest.approx(1 - draw)


@pytest.mark.parametrize(
    "args",
    [(-1.0, 1.0, 2.0, 0.0), (2.0, 1.0, 2.0, 0.0), (0.1, 1.0, 0.5, 0.0), (0.1, 1.0, 2.0, 1.5)],
)
def test_invalid_settings_are_refused(args: tuple[float, float, float, float]) -> None:
    initial, maximum, factor, jitter = args
    with pytest.raises(ValueError):
        Backoff(initial, maximum, factor, jitter=jitter)
