"""The crash prober on its own: what counts as a process gone, and what does not."""

from __future__ import annotations

from collections.abc import Callable

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
