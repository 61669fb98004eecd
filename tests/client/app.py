"""The application the client tests run in real node processes (``cloister run``).

Each worker keeps the sequence numbers it was cast, in the order it handled them; a cast
repeated after a crash (delivery is at-least-once) is recognised by its number and
ignored, a number lower than the last one that is new is an order violation, counted.
``call(id, "history")`` answers ``{"seqs": [...], "violations": n}``; any other call
echoes ``[id, message]``.
"""

from __future__ import annotations

from typing import Any

from cloister import DynamicManager, Ok, Replace

KEYS = 64
PARTITIONS = 32


def key_name(n: int) -> str:
    return f"key-{n}"


class Orders(DynamicManager):
    name = "orders"
    partitions = PARTITIONS
    executor = "loop"
    flush_interval = 0.05

    def children_specs(self) -> dict[Any, Any]:
        return {key_name(n): {"payload": {"seqs": [], "violations": 0}} for n in range(KEYS)}

    def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        seqs: list[int] = payload["seqs"]
        if not isinstance(message, int):
            return Ok(None)
        if seqs and message <= seqs[-1]:
            if message in seqs:
                return Ok(None)  # a redelivered copy: handled already
            return Replace({"seqs": seqs, "violations": payload["violations"] + 1})
        return Replace({"seqs": [*seqs, message], "violations": payload["violations"]})

    def handle_call(self, message: Any, id: Any, payload: Any) -> Any:
        return Ok(payload if message == "history" else [id, message])
