"""A manager that counts the casts of each key in its payload (stored before each ack)."""

from __future__ import annotations

from typing import Any

from cloister import DynamicManager, Replace

KEYS = [f"k{i}" for i in range(16)]


class Counter(DynamicManager):
    """Adds each cast to its key's payload; ``call`` returns the payload. Subclass it with
    other ``keys`` for another set of workers."""

    partitions = 8
    keys: tuple[str, ...] = tuple(KEYS)

    def children_specs(self) -> dict[str, dict[str, Any]]:
        return {key: {"payload": 0} for key in self.keys}

    async def handle_cast(self, message: Any, id: Any, payload: Any) -> Replace:
        return Replace(payload + message)

    async def handle_call(self, message: Any, id: Any, payload: Any) -> Any:
        return payload
