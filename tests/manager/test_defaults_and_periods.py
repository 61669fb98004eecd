"""Manager-wide spec defaults, Tarearbol's integer ``instant_perform``, permanent periods.

Standalone first; then on a memory cluster, where a period changed for good must survive a
graceful handoff (shipped with the worker) and a crash (stored with its state).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from typing import Any

import pytest

from cloister import DynamicManager, Ok, Timeout
from cloister.errors import ConfigurationError
from cloister.manager.spec import Spec
from cloister.testing import eventually

from ._distributed import IDS, Counter, Ledger, Nodes
from ._standalone import Recorder, running, until


class Defaulted(Recorder):
    defaults = {"timeout": 0, "lull": 2.0, "payload": "from the class"}
    SPECS = {"own": {"payload": "own"}, "bare": {}, "none": None, "periodic": {"timeout": 5}}


async def test_defaults_fill_what_a_spec_leaves_out_in_documented_precedence() -> None:
    async with running(Defaulted, defaults={"lull": 3.0}) as manager:
        specs = {i: manager.get(i).spec for i in ("own", "bare", "none", "periodic")}  # type: ignore[union-attr]
        await manager.put("late", payload="put at runtime")
        late = manager.get("late").spec  # type: ignore[union-attr]
    # spec > start(defaults=) > class defaults > library defaults, field by field
    assert specs["own"] == Spec(payload="own", timeout=0.0, lull=3.0, instant_perform=False)
    assert specs["bare"] == Spec(payload="from the class", timeout=0.0, lull=3.0)
    assert specs["none"] == specs["bare"]
    assert specs["periodic"] == Spec(payload="from the class", timeout=5.0, lull=3.0)
    assert late == Spec(payload="put at runtime", timeout=0.0, lull=3.0)
    async with running(Recorder) as plain:  # no defaults: the library's
        await plain.put("a")
        assert plain.get("a").spec == Spec()  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("defaults", "match"),
    [
        ({"nope": 1}, "unknown field"),
        ({"timeout": -1}, "timeout must be >= 0"),
        ({"instant_perform": 1.5}, "instant_perform must be"),
        ([("timeout", 1)], "must be a dict"),
    ],
)
async def test_bad_defaults_are_refused_at_start(defaults: Any, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        await Recorder.start(defaults=defaults)
    bad_class = type("Bad", (Recorder,), {"defaults": defaults})
    with pytest.raises(ConfigurationError, match=match):
        await bad_class.start()


class Periodic(DynamicManager):
    """Performs every 20 ms until a perform answers with a permanent Timeout."""

    SCRIPT: dict[int, Any] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ticks: list[float] = []

    def children_specs(self) -> dict[Any, Any]:
        return {"a": {"timeout": 0.02, "instant_perform": True}}

    def perform(self, id: Any, payload: Any) -> Any:
        self.ticks.append(time.monotonic())
        return self.SCRIPT.get(len(self.ticks), Ok(None))

    def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        return message


async def test_a_permanent_timeout_changes_the_period_for_good() -> None:
    class P(Periodic):
        SCRIPT = {3: Timeout(0.25, "slower", permanent=True)}

    async with running(P) as manager:
        await until(lambda: len(manager.ticks) >= 5, timeout=3)
        info = manager.get("a")
    assert info is not None and info.spec.timeout == 0.25 and info.last_result is None
    gaps = [b - a for a, b in zip(manager.ticks[2:], manager.ticks[3:], strict=False)]
    assert all(gap >= 0.24 for gap in gaps), gaps  # every later perform, not only the next


async def test_a_one_off_timeout_changes_only_the_next_perform() -> None:
    class P(Periodic):
        SCRIPT = {3: Timeout(0.25, "once")}

    async with running(P) as manager:
        await until(lambda: len(manager.ticks) >= 8, timeout=3)
        assert manager.get("a").spec.timeout == 0.02  # type: ignore[union-attr]
    gaps = [b - a for a, b in zip(manager.ticks, manager.ticks[1:], strict=False)]
    assert gaps[2] >= 0.24 and min(gaps[3:]) < 0.1, gaps


async def test_a_permanent_timeout_of_zero_stops_performs_also_from_a_cast() -> None:
    async with running(Periodic) as manager:
        await until(lambda: len(manager.ticks) >= 2)
        await manager.cast("a", Timeout(0, "stop", permanent=True))
        await until(lambda: manager.get("a").spec.timeout == 0)  # type: ignore[union-attr]
        settled = len(manager.ticks)
        await asyncio.sleep(0.15)
        assert len(manager.ticks) <= settled + 1  # one perform may have been due already


# -- in a cluster: the period survives handoff and takeover ---------------------------------


@pytest.fixture
async def nodes(request: pytest.FixtureRequest) -> Any:
    async with AsyncExitStack() as stack:
        yield Nodes(stack, f"periods-{request.node.name}", Ledger())


class Slowable(Counter):
    """The distributed Counter; the cast ``"slow-down"`` sets a 60 s period for good."""

    def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        if message == "slow-down":
            return Timeout(60, "slowed", permanent=True)
        return super().handle_cast(message, id, payload)


async def _start(nodes: Nodes, name: str) -> Any:
    cls = type("S", (Slowable,), {"ledger": nodes.ledger, "name": "counter"})
    return await nodes.start_manager(name, cls)


def _period(nodes: Nodes, worker_id: str) -> float | None:
    """The period of ``worker_id`` on its owner (None: not live there)."""
    node = nodes.managers[nodes.live_names()[0]].owner_of(worker_id)
    info = None if node is None else nodes.managers[node].get(worker_id)
    return None if info is None else info.spec.timeout


async def test_a_permanent_period_survives_a_graceful_handoff_and_a_crash(nodes: Nodes) -> None:
    for name in "ab":
        await _start(nodes, name)
    await eventually(nodes.settled, what="every id live on its owner")
    worker_id = IDS[0]
    await nodes.managers["a"].cast(worker_id, "slow-down")
    await eventually(lambda: _period(nodes, worker_id) == 60.0, what="the period changed")
    first = nodes.managers["a"].owner_of(worker_id)
    assert first is not None
    # The node holding it leaves gracefully: the period is shipped with the worker.
    await _start(nodes, "c")
    await eventually(nodes.settled, what="c joined")
    holder = nodes.managers["a"].owner_of(worker_id)
    assert holder is not None
    await nodes.clusters[holder].stop()
    await eventually(nodes.settled, what="after the graceful leave")
    assert _period(nodes, worker_id) == 60.0
    # Its next holder crashes: the period was stored with the worker's state.
    heir = nodes.managers[nodes.live_names()[0]].owner_of(worker_id)
    assert heir is not None and heir != holder
    nodes.world.crash(heir)
    await eventually(nodes.settled, what="after the crash", timeout=5)
    assert heir not in nodes.live_names()
    assert _period(nodes, worker_id) == 60.0


async def test_a_put_worker_keeps_its_spec_when_its_payload_is_replaced_and_its_owner_crashes(
    nodes: Nodes,
) -> None:
    """A payload write does not drop the runtime spec stored with the worker's record."""
    for name in "ab":
        await _start(nodes, name)
    await eventually(nodes.settled, what="every id live on its owner")
    a = nodes.managers["a"]
    await a.put("extra", payload=0, timeout=0, lull=7.0)
    await eventually(lambda: a.owner_of("extra") in nodes.managers)
    owner = a.owner_of("extra")
    assert owner is not None
    await a.cast("extra", 5)  # Replace(0 + 5): a payload write
    held = nodes.managers[owner]
    await eventually(lambda: (held.get("extra") or held.get("missing")) is not None)
    table = held._region.table  # type: ignore[union-attr]
    await eventually(
        lambda: table.mirror.get("extra") is not None and table.mirror["extra"].payload == 5,
        what="the new payload stored",
    )
    nodes.world.crash(owner)
    survivor = next(n for n in "ab" if n != owner)
    await eventually(lambda: nodes.managers[survivor].get("extra") is not None, timeout=5)
    info = nodes.managers[survivor].get("extra")
    assert info is not None and info.payload == 5 and info.spec.lull == 7.0
