"""The Restate service ``bench/peers.py`` runs (``hypercorn peers_restate:app``).

A Virtual Object ``Counter`` keyed like the other systems: ``add`` reads its key's count
from Restate's durable state, stores it plus one. Each handling appends one byte to
``PEERS_HANDLED`` (how the benchmark knows it is done) and, with ``PEERS_LATENCY`` set,
``now - sent`` to that file.
"""

from __future__ import annotations

import os
import time
from typing import IO

import restate

counter = restate.VirtualObject("Counter")

_handled: IO[str] = open(os.environ["PEERS_HANDLED"], "a", buffering=1)  # noqa: SIM115
_path = os.environ.get("PEERS_LATENCY")
_latency: IO[str] | None = open(_path, "a", buffering=1) if _path else None  # noqa: SIM115


@counter.handler()
async def add(ctx: restate.ObjectContext, sent: float) -> None:
    """One message: the key's count, durably, plus one."""
    count = await ctx.get("n") or 0
    ctx.set("n", count + 1)
    _handled.write("\n")
    if _latency is not None:
        _latency.write(f"{time.time() - sent:.6f}\n")


app = restate.app(services=[counter])
