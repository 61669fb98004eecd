"""A manager for the ``executor="process"`` tests: importable by a child process."""

from __future__ import annotations

import os
import time
from typing import Any

from cloister import DynamicManager, Ok, Replace


def burn(seconds: float) -> int:
    """Pure-Python CPU work for ``seconds`` (holds the GIL of its process throughout)."""
    end = time.perf_counter() + seconds
    spins = 0
    while time.perf_counter() < end:
        spins += 1
    return spins


class InChildren(DynamicManager):
    executor = "process"
    pool_size = 2

    def children_specs(self) -> dict[Any, Any]:
        return {f"k{i}": {"payload": []} for i in range(4)}

    def handle_call(self, message: Any, id: Any, payload: Any) -> Any:
        if message == "pid":
            return Ok(os.getpid())
        if message == "raise":
            raise ValueError(f"{id} refuses")
        if isinstance(message, list) and message[0] == "sleep":
            time.sleep(message[1])
            return Ok("slept")
        if isinstance(message, list) and message[0] == "burn":
            burn(message[1])
            return Ok("burnt")
        if message == "payload":
            return Ok(payload)
        return Ok(None)

    def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        return Replace([*payload, message])
