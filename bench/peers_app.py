"""The application ``bench/peers.py`` runs on every pycloister node (``cloister run``).

One keyed counter per key: every message changes its key's state durably (``Replace``),
the workload the peers run too. A message is the wall-clock time it was sent; with
``PEERS_LATENCY`` set, each handling appends ``now - sent`` to that file (the paced
latency round), line by line.

Configuration comes from the environment (``PEERS_*``), as ``cloister run`` is spawned.
"""

from __future__ import annotations

import os
import time
from typing import IO, Any

from cloister import DynamicManager, Replace

KEYS = int(os.environ.get("PEERS_KEYS", "10000"))


def key_name(index: int) -> str:
    """The id of key ``index`` (the producer and the checks use the same names)."""
    return f"k{index}"


class Counter(DynamicManager):
    """``handle_cast`` counts the messages of its key; the count is the stored state."""

    name = "peers"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        path = os.environ.get("PEERS_LATENCY")
        self._latency: IO[str] | None = (
            open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - process-long
            if path
            else None
        )

    def children_specs(self) -> dict[str, Any]:
        return {key_name(i): {"payload": 0, "timeout": 0} for i in range(KEYS)}

    def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        if self._latency is not None:
            self._latency.write(f"{time.time() - float(message):.6f}\n")
        return Replace(payload + 1)
