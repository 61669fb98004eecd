"""The producer of the fault runs: ``python -m tests.faults.producer --url ... --out DIR``.

One task per key casts seq 1, 2, 3, ... into the manager's durable inbox, each with the
msg_id ``<key>:<seq>``, one put at a time per key (so the inbox holds every key's messages
in order) and retried with the same msg_id until the backend acknowledges it (the dedup
window drops a retry of a put that had landed). Every acknowledged cast is recorded in
``DIR/acked.log`` (``key seq t``), flushed at once.

Beside it a watcher records every payload write the medium accepted into the state
bucket (``DIR/writes.log``, one JSON line per write: key, revision, payload, t): the
checker finds stale writes there (a write that is not an extension of the previous one).

SIGTERM stops casting; the casts in flight are finished (acknowledged) first, then the
process prints ``producer done`` and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import IO, Any

from cloister import wire
from cloister.backends import open_backend
from cloister.backends.base import Backend, KVOp
from cloister.store.inbox import Inbox
from tests.faults.app import key_name

MANAGER = "faults"
RETRY_PAUSE = 0.2


class Producer:
    """Casts per key in order, records acknowledgements; stops on request."""

    def __init__(self, inbox: Inbox, acked: IO[str], args: argparse.Namespace) -> None:
        self.inbox = inbox
        self.acked = acked
        self.interval = args.interval
        self.special = parse_special(args.special)
        self.stopping = asyncio.Event()
        self.failures = 0

    def message(self, key: str, seq: int) -> Any:
        """The message for ``(key, seq)``: the seq, or a sleeping one if it is special."""
        if self.special is not None and self.special[:2] == (key, seq):
            return {"seq": seq, "sleep": self.special[2]}
        return seq

    async def cast(self, key: str, seq: int) -> None:
        """Put one message until the backend acknowledges it, then record it."""
        while True:
            try:
                await self.inbox.put(key, self.message(key, seq), msg_id=f"{key}:{seq}", timeout=5)
                break
            except Exception as exc:  # the medium is electing or unreachable: try again
                self.failures += 1
                print(f"put {key}:{seq} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                await asyncio.sleep(RETRY_PAUSE)
        self.acked.write(f"{key} {seq} {time.monotonic():.6f}\n")

    async def run_key(self, key: str, offset: float) -> None:
        """Cast ``key``'s messages in order, one every ``interval`` seconds, until stopped."""
        await asyncio.sleep(offset)  # spread the keys over the interval
        seq = 0
        while not self.stopping.is_set():
            seq += 1
            began = time.monotonic()
            await self.cast(key, seq)
            pause = self.interval - (time.monotonic() - began)
            if pause > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), pause)


def parse_special(text: str | None) -> tuple[str, int, float] | None:
    """``key:seq:seconds`` -> the message that sleeps in its handler, or None."""
    if not text:
        return None
    key, seq, seconds = text.split(":")
    return key, int(seq), float(seconds)


async def watch_writes(backend: Backend, out: IO[str]) -> None:
    """Record every payload write into the manager's state bucket, until killed.

    It outlives the casting: the writes of the drain after the fault count too.
    """
    kv = await backend.kv(f"mgr-{MANAGER}")
    while True:
        try:
            async with kv.watch() as events:
                async for event in events:
                    if event.op is KVOp.PUT and event.value is not None:
                        record_write(out, event.key, event.revision, event.value)
        except Exception as exc:  # a watch that broke over a failover: watch again
            print(f"watch failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            await asyncio.sleep(RETRY_PAUSE)


def record_write(out: IO[str], key: str, revision: int, value: bytes) -> None:
    """One accepted write: which worker, at which revision, with which payload."""
    try:
        stored = wire.decode(value)
    except Exception:
        return  # not a stored worker: nothing the checker can compare
    if not isinstance(stored, dict) or not stored.get("has_payload", True):
        return
    payload = stored.get("payload")
    line = {
        "key": stored.get("id"),
        "rev": revision,
        "payload": list(payload) if isinstance(payload, list | tuple) else None,
        "t": round(time.monotonic(), 6),
    }
    out.write(json.dumps(line, separators=(",", ":")) + "\n")


async def main_async(args: argparse.Namespace) -> int:
    out = Path(args.out)
    backend = open_backend(args.url, args.cluster, "producer", replicas=args.replicas)
    await backend.connect()
    inbox = Inbox(backend, MANAGER, partitions=args.partitions)
    await inbox.open()
    loop = asyncio.get_running_loop()
    with (
        (out / "acked.log").open("a", buffering=1) as acked,
        (out / "writes.log").open("a", buffering=1) as writes,
    ):
        producer = Producer(inbox, acked, args)
        loop.add_signal_handler(signal.SIGTERM, producer.stopping.set)
        watcher = asyncio.ensure_future(watch_writes(backend, writes))
        await asyncio.sleep(0.5)  # the watch is on before the first write
        print("producer started", flush=True)
        keys = [key_name(i) for i in range(args.keys)]
        spread = args.interval / max(1, len(keys))
        await asyncio.gather(*(producer.run_key(k, n * spread) for n, k in enumerate(keys)))
        print(f"producer done failures={producer.failures}", flush=True)
        await watcher  # until the harness kills this process
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--keys", type=int, default=30)
    parser.add_argument("--partitions", type=int, default=32)
    parser.add_argument("--interval", type=float, default=0.3, help="seconds between casts")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--special", help="key:seq:seconds, a message whose handler sleeps")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
