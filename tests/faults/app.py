"""The application under fault: ``cloister run tests.faults.app:FaultApp`` on every node.

A ``DynamicManager`` whose SYNC ``handle_cast`` appends each message's sequence number to
its key's payload through ``Replace`` — the state a new owner must continue from — and
writes one journal line per handling to this node's journal (``FAULTS_JOURNAL``), flushed
before it returns, so that a SIGKILL loses no record of a handling that finished.

A message is either a sequence number (an int) or ``{"seq": n, "sleep": s}``: the
handler then ``time.sleep``s ``s`` seconds first (scenario 3, a blocking sync handler).
With ``FAULTS_CPU`` set, the worker ``cpu`` busy-loops that many seconds in each
``perform`` (scenario 4), among ``FAULTS_TICKS`` fast performing workers.

Configuration comes from the environment (``FAULTS_*``), as ``cloister run`` is spawned.
"""

from __future__ import annotations

import json
import os
import time
from typing import IO, Any

from cloister import DynamicManager, Ok, Replace

KEYS = int(os.environ.get("FAULTS_KEYS", "30"))
TICKS = int(os.environ.get("FAULTS_TICKS", "0"))
TICK_EVERY = float(os.environ.get("FAULTS_TICK_EVERY", "0.1"))
CPU_SECONDS = float(os.environ.get("FAULTS_CPU", "0"))
CPU_EVERY = float(os.environ.get("FAULTS_CPU_EVERY", "1.0"))


def key_name(index: int) -> str:
    """The id of cast key ``index`` (the producer and the checker use the same names)."""
    return f"k{index:03d}"


def message_seq(message: Any) -> tuple[int, float]:
    """``(seq, seconds to sleep)`` of a message as the producer sends it."""
    if isinstance(message, dict):
        return int(message["seq"]), float(message.get("sleep", 0.0))
    return int(message), 0.0


def busy(seconds: float) -> None:
    """Burn CPU for ``seconds`` without yielding (a CPU-bound callback, not a sleep)."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        pass


class FaultApp(DynamicManager):
    """Keyed workers keeping the list of sequence numbers they handled, journaled."""

    name = "faults"
    partitions = 32  # fewer partitions: faster settles, still several per node
    flush_interval = 0.1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Line-buffered append: every line reaches the file before the handler returns.
        self._journal: IO[str] = open(  # noqa: SIM115 - lives as long as the process
            os.environ["FAULTS_JOURNAL"], "a", buffering=1, encoding="utf-8"
        )
        self._node = os.environ.get("CLOISTER_NODE") or (
            self.cluster.node if self.cluster is not None else "-"
        )

    def children_specs(self) -> dict[str, Any]:
        specs: dict[str, Any] = {key_name(i): {"payload": (), "timeout": 0} for i in range(KEYS)}
        for i in range(TICKS):
            specs[f"tick{i:03d}"] = {"payload": 0, "timeout": TICK_EVERY}
        if CPU_SECONDS > 0:
            specs["cpu"] = {"payload": 0, "timeout": CPU_EVERY}
        return specs

    def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        start = time.monotonic()
        fence = self.fence  # read at the start: the token this handling works under
        seq, sleep = message_seq(message)
        if sleep > 0:
            time.sleep(sleep)  # a blocking sync handler, on purpose
        self._write("cast", id, seq, fence, start)
        return Replace((*payload, seq))

    def perform(self, id: Any, payload: Any) -> Any:
        if id == "cpu":
            start = time.monotonic()
            busy(CPU_SECONDS)
            self._write("perform", id, 0, self.fence, start)
        return Ok(None)

    def _write(self, kind: str, key: Any, seq: int, fence: int, start: float) -> None:
        node = self.cluster.node if self.cluster is not None else self._node
        line = {
            "kind": kind,
            "node": node,
            "key": key,
            "seq": seq,
            "fence": fence,
            "start": round(start, 6),
            "end": round(time.monotonic(), 6),
            "pid": os.getpid(),
        }
        self._journal.write(json.dumps(line, separators=(",", ":")) + "\n")
