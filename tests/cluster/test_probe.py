"""The crash prober on its own: what counts as a process gone, and what does not."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from cloister.backends import open_backend
from cloister.cluster.probe import Prober
from cloister.errors import NoSuchNodeError, RequestTimeoutError


def prober(answers: Callable[[str], object], targets: dict[str, int]) -> tuple[Prober, list[int]]:
    woken: list[int] = []

    async def ping(node: str, timeout: float) -> object:
        answer = answers(node)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    found = Prober(ping, lambda: targets, lambda: woken.append(1), interval=0.01)
    return found, woken


async def test_a_member_with_no_responder_twice_is_unreachable_at_its_revision() -> None:
    probe, woken = prober(
        lambda n: NoSuchNodeError(f"no responders for {n}") if n == "b" else b"pong",
        {"b": 7, "c": 3},
    )
    await probe.probe_once()
    assert probe.unreachable == {"b": 7} and woken == [1]
    await probe.probe_once()  # the same finding again: nothing new to decide on
    assert probe.unreachable == {"b": 7} and woken == [1]


async def test_a_member_that_answers_the_second_probe_is_not_gone() -> None:
    calls: list[str] = []

    def answers(node: str) -> object:
        calls.append(node)
        return NoSuchNodeError("between two connections") if len(calls) == 1 else b"pong"

    probe, woken = prober(answers, {"b": 7})
    await probe.probe_once()
    assert calls == ["b", "b"] and probe.unreachable == {} and woken == []


async def test_a_member_that_times_out_is_left_to_its_ttl() -> None:
    probe, woken = prober(lambda n: RequestTimeoutError(f"{n} did not answer"), {"b": 7})
    await probe.probe_once()
    assert probe.unreachable == {} and woken == []


async def test_a_member_no_longer_probed_is_forgotten() -> None:
    targets = {"b": 7}
    probe, _ = prober(lambda n: NoSuchNodeError(n), targets)
    await probe.probe_once()
    assert probe.unreachable == {"b": 7}
    targets.clear()  # its record was deleted (or this node is no longer the sentry)
    await probe.probe_once()
    assert probe.unreachable == {}


async def test_a_renewed_record_is_reported_anew_at_its_new_revision() -> None:
    targets = {"b": 7}
    probe, woken = prober(lambda n: NoSuchNodeError(n), targets)
    await probe.probe_once()
    targets["b"] = 9
    await probe.probe_once()
    assert probe.unreachable == {"b": 9} and woken == [1, 1]


async def test_after_a_server_was_lost_a_silent_member_gets_the_move_time() -> None:
    """A member whose server died has no responder until its connection is on another
    server: while the medium says it lost a server a moment ago, a silent member is
    probed once more after the move time, and found back. Without such a loss, a crash
    is confirmed at once."""
    loop = asyncio.get_running_loop()
    back_at = loop.time() + 0.15  # the member's connection has moved by then

    def answers(node: str) -> object:
        return b"pong" if loop.time() >= back_at else NoSuchNodeError("moving")

    lost_at = time.monotonic()
    probe, woken = prober(answers, {"b": 7})
    probe.allow_for((0.2, 0.0), lambda: lost_at)
    await probe.probe_once()
    assert probe.unreachable == {} and woken == []

    gone, _ = prober(lambda n: NoSuchNodeError(n), {"b": 7})
    gone.allow_for((0.2, 0.0), lambda: lost_at)
    await gone.probe_once()  # silent for longer than a move: gone
    assert gone.unreachable == {"b": 7}

    back_at = loop.time() + 0.15
    crash, _ = prober(answers, {"b": 7})
    crash.allow_for((0.2, 0.0), lambda: None)  # no server lost: a crash, known in 0.1 s
    await crash.probe_once()
    assert crash.unreachable == {"b": 7}


async def test_no_probe_counts_right_after_our_own_reconnect() -> None:
    """Back on a restarted server before the others: their silence proves nothing for
    the return spread; after it, it does again."""
    probe, woken = prober(lambda n: NoSuchNodeError(n), {"b": 7})
    probe.allow_for((0.0, 0.2), lambda: None)
    probe.reconnected()
    await probe.probe_once()
    assert probe.unreachable == {} and woken == []
    await asyncio.sleep(0.25)
    await probe.probe_once()
    assert probe.unreachable == {"b": 7} and woken == [1]


def test_the_memory_medium_moves_no_connection_and_nats_allows_for_it() -> None:
    memory = open_backend("memory://probe-spread", "c", "a")
    assert memory.reconnect_spread == (0.0, 0.0) and memory.server_lost_at is None
    nats = open_backend("nats://127.0.0.1:1", "c", "a", reconnect_wait=(0.05, 2.0))
    move, back = nats.reconnect_spread
    assert move > 0.1  # a move outlasts the confirmation of a crash
    assert back == 2.0 + move  # the longest reconnect delay, then a move
