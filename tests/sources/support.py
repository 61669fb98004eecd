"""A memory-backend cluster whose manager records what it handled, and key functions."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from typing import Any

from cloister import DynamicManager, Replace
from cloister.errors import BackendUnavailableError
from cloister.sources import Source, SourceMessage
from cloister.testing import eventually
from tests._support.nodes import ClusterNodes
from tests._support.timing import MEMORY

KEYS = [f"k{i}" for i in range(50)]


class Journal:
    """What the workers of one test handled: key -> messages, in handling order."""

    def __init__(self) -> None:
        self.handled: dict[Any, list[Any]] = defaultdict(list)
        self.nodes: set[str] = set()

    def total(self) -> int:
        return sum(len(v) for v in self.handled.values())


class Sink(DynamicManager):
    journal: Journal
    partitions = 16

    def children_specs(self) -> dict[Any, Any]:
        return {k: {"payload": 0, "timeout": 0} for k in KEYS}

    async def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        self.journal.handled[id].append(message)
        self.journal.nodes.add(self.cluster.node)  # type: ignore[union-attr]
        return Replace(message)


class Nodes(ClusterNodes):
    """Cluster nodes on one memory world, each with a Sink manager; all stopped at the end."""

    def __init__(self, stack: AsyncExitStack, name: str) -> None:
        super().__init__(stack, f"memory://{name}", timing=MEMORY, record=True)
        self.journal = Journal()
        self.cls: type[Sink] = type("S", (Sink,), {"journal": self.journal, "name": "sink"})

    async def start(self, *names: str, **cluster_options: Any) -> list[Sink]:
        for node in names:
            await self.start_manager(node, self.cls, **cluster_options)
        await eventually(lambda: self.agreed(set(self.managers)), what="cluster ready")
        return [self.managers[n] for n in names]

    def in_order(self, per_key: int) -> bool:
        """Every key handled 1..per_key exactly once, in order."""
        return not self.disorder(per_key)

    def out_of_order(self, per_key: int) -> dict[Any, list[Any]]:
        """The keys whose messages were not *first* handled 1..per_key in order (a message
        handled again — at-least-once, after a rehash — is allowed), with their first
        handlings. Also lists keys that miss messages."""
        expected = list(range(1, per_key + 1))
        firsts = {k: list(dict.fromkeys(self.journal.handled[k])) for k in KEYS}
        return {k: seqs for k, seqs in firsts.items() if seqs != expected}

    def disorder(self, per_key: int) -> dict[Any, list[Any]]:
        """The keys not handled 1..per_key exactly once in order, with what they got."""
        expected = list(range(1, per_key + 1))
        return {k: self.journal.handled[k] for k in KEYS if self.journal.handled[k] != expected}


async def join_and_leave(
    nodes: Nodes,
    leaving: Source,
    start_source: Callable[[Sink], Awaitable[Source]],
    publish_round: Callable[[int], Awaitable[int]],
    per_key: int,
) -> tuple[int, Source]:
    """Publish ``per_key`` rounds (one message per key each) while node ``c`` joins (with
    the source ``start_source`` makes) and node ``a`` leaves (``leaving``, its source,
    first); returns how many were published and c's source, once all were handled."""

    async def produce() -> int:
        sent = 0
        for sequence in range(1, per_key + 1):  # slowly: the topology changes meanwhile
            sent += await publish_round(sequence)
            await asyncio.sleep(0.02)
        return sent

    producing = asyncio.create_task(produce())
    await asyncio.sleep(0.3)
    joined = await start_source(await nodes.start_manager("c", nodes.cls))
    nodes.stack.push_async_callback(joined.stop)
    await eventually(lambda: len(joined.reading) > 0, what="c reads its partitions")
    await asyncio.sleep(0.3)
    await leaving.stop()  # as cloister run stops them: the source, the manager, the node
    await nodes.managers["a"].stop()
    await nodes.clusters["a"].stop()
    count = await producing
    await eventually(lambda: nodes.journal.total() >= count, timeout=30, what="all handled")
    return count, joined


def every_partition_read(sources: list[Any]) -> bool:
    """Each partition read by exactly one of ``sources``."""
    return sorted(p for s in sources for p in s.reading) == list(range(Sink.partitions))


def messages(per_key: int) -> Iterator[tuple[str, int]]:
    """(key, sequence) for every key, interleaved: sequence 1 of every key, then 2, ..."""
    for sequence in range(1, per_key + 1):
        for key in KEYS:
            yield key, sequence


def body(key: str, sequence: int) -> bytes:
    return json.dumps({"key": key, "seq": sequence}).encode()


def key_fn(body: Any, meta: SourceMessage) -> tuple[Any, Any]:
    return body["key"], body["seq"]


def flaky_cast(manager: Sink, failures: list[int]) -> None:
    """Make storing into ``manager``'s inbox (``inbox.put``: what sources and
    ``manager.cast`` call) raise BackendUnavailableError while ``failures[0] > 0``."""
    inbox = manager.inbox
    real: Callable[..., Any] = inbox.put

    async def put(*args: Any, **kwargs: Any) -> Any:
        if failures[0] > 0:
            failures[0] -= 1
            raise BackendUnavailableError("backend down (on purpose)")
        return await real(*args, **kwargs)

    inbox.put = put  # type: ignore[method-assign]
