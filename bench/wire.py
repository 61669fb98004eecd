"""Benchmark: decoding each record kind, before and after the schema layer, one run.

For every kind of record pycloister reads from the medium or the wire (member, epoch,
sentry lease, claim, stored worker, inbox record, dead letter, table value, request,
reply, handoff batch) this times, on the same bytes:

- **msgpack + checks**: the decoder as it was before :mod:`cloister.schema` —
  ``msgpack.unpackb`` with the tuple hook plus the hand checks each module made (copied
  below from commit d2d4ecc, so the comparison does not depend on that commit's files);
- **schema**: :func:`cloister.schema.decode` (msgspec, typed and strict) into the same
  typed object the project uses;
- **schema, sealed**: the same with a cluster secret (HMAC-SHA256 tag checked), and the
  cost of encoding unsealed vs sealed.

Prints a table and writes bench/results/wire.json. Usage: python bench/wire.py [--rounds N]
"""

from __future__ import annotations

import argparse
import gc
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack

from _common import print_table, write_json
from cloister import schema, wire
from cloister.cluster.control import decode_sentry, encode_sentry
from cloister.cluster.membership import MemberRecord
from cloister.cluster.rpc import (
    CallResult,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)
from cloister.cluster.topology import EpochRecord, MemberSpec
from cloister.errors import RemoteError, WireFormatError
from cloister.manager.claims import Claim
from cloister.manager.state import Stored
from cloister.schema import Keyring

# -- the decoders before the schema layer (commit d2d4ecc) ------------------------------------


class _OldDepth(threading.local):
    depth = 0


_old_thread = _OldDepth()


def _old_hook(code: int, data: bytes) -> Any:
    if code == 1:
        depth = _old_thread.depth
        if depth >= wire.MAX_TUPLE_DEPTH:
            raise WireFormatError(f"tuples nested more than {wire.MAX_TUPLE_DEPTH} deep")
        _old_thread.depth = depth + 1
        try:
            return tuple(old_decode(data))
        finally:
            _old_thread.depth = depth
    raise WireFormatError(f"unknown msgpack extension type {code}")


def old_decode(data: bytes) -> Any:
    if len(data) > wire.MAX_BYTES:
        raise WireFormatError(f"message of {len(data)} bytes exceeds the limit")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_old_hook)
    except WireFormatError:
        raise
    except Exception as exc:
        raise WireFormatError(f"undecodable message ({exc})") from exc


def old_map(data: bytes, what: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    value = old_decode(data)
    if not isinstance(value, dict):
        raise WireFormatError(f"{what}: expected a map")
    missing = [name for name in required if name not in value]
    if missing:
        raise WireFormatError(f"{what}: missing field(s) {', '.join(missing)}")
    return value


def old_field(message: dict[str, Any], name: str, kind: Any, what: str) -> Any:
    value = message.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
        raise WireFormatError(f"{what}: field {name!r}")
    return value


def _old_finite(value: float, what: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise WireFormatError(f"{what}: expected a finite number")
    return number


def _old_weight(value: float, what: str) -> float:
    weight = float(value)
    if not (math.isfinite(weight) and weight > 0):
        raise WireFormatError(f"{what}: weight")
    return weight


def old_member(data: bytes, key: str) -> MemberRecord:
    what = f"member record {key!r}"
    message = old_map(data, what, ("node", "inc", "weight", "groups", "started_at"))
    node = old_field(message, "node", str, what)
    if not node or node != key:
        raise WireFormatError(f"{what}: node")
    groups = old_field(message, "groups", list, what)
    if not all(isinstance(g, str) and g for g in groups):
        raise WireFormatError(f"{what}: groups")
    acked = message.get("acked", 0)
    if not isinstance(acked, int) or isinstance(acked, bool) or acked < 0:
        raise WireFormatError(f"{what}: acked")
    state = message.get("state", "")
    if not isinstance(state, str):
        raise WireFormatError(f"{what}: state")
    ttl = message.get("ttl")
    if ttl is not None:
        if not isinstance(ttl, int | float) or isinstance(ttl, bool):
            raise WireFormatError(f"{what}: ttl")
        ttl = _old_finite(ttl, what)
        if ttl <= 0:
            raise WireFormatError(f"{what}: ttl")
    return MemberRecord(
        node=node,
        incarnation=old_field(message, "inc", int, what),
        weight=_old_weight(old_field(message, "weight", (int, float), what), what),
        groups=tuple(groups),
        started_at=_old_finite(old_field(message, "started_at", (int, float), what), what),
        acked=acked,
        state=state,
        ttl=ttl,
    )


def _old_spec(data: Any) -> MemberSpec:
    if (
        not isinstance(data, list)
        or len(data) != 3
        or not isinstance(data[0], int | float)
        or isinstance(data[0], bool)
        or not isinstance(data[1], list)
        or not all(isinstance(g, str) and g for g in data[1])
        or not isinstance(data[2], int)
        or isinstance(data[2], bool)
    ):
        raise WireFormatError("epoch record: malformed member spec")
    return MemberSpec(_old_weight(data[0], "epoch"), tuple(data[1]), data[2])


def old_epoch(data: bytes) -> EpochRecord:
    what = "epoch record"
    message = old_map(data, what, ("epoch", "sentry", "members"))
    members = old_field(message, "members", dict, what)
    epoch = old_field(message, "epoch", int, what)
    if epoch < 0:
        raise WireFormatError(f"{what}: negative epoch")
    sentry = old_field(message, "sentry", str, what)
    if not all(isinstance(name, str) and name for name in members):
        raise WireFormatError(f"{what}: member names")
    return EpochRecord(epoch, sentry, {n: _old_spec(s) for n, s in members.items()})


def old_sentry(data: bytes) -> str:
    holder: str = old_field(old_map(data, "sentry lease"), "node", str, "sentry lease")
    if not holder:
        raise WireFormatError("sentry lease: empty node name")
    return holder


def old_claim(data: bytes) -> Claim:
    message = old_map(data, "partition claim", ("node", "epoch"))
    node = old_field(message, "node", str, "partition claim")
    epoch = old_field(message, "epoch", int, "partition claim")
    if not node or epoch < 0:
        raise WireFormatError("partition claim")
    return Claim(node, epoch)


def old_stored(data: bytes) -> Stored:
    message = old_map(data, "stored worker", ("id",))
    spec = message.get("spec")
    if spec is not None and not isinstance(spec, dict):
        raise WireFormatError("stored worker: spec")
    watermark = message.get("w") or 0
    if isinstance(watermark, bool) or not isinstance(watermark, int) or watermark < 0:
        raise WireFormatError("stored worker: w")
    return Stored(
        id=message["id"],
        spec=spec,
        payload=message.get("payload"),
        has_payload=bool(message.get("has_payload")),
        deleted=bool(message.get("deleted")),
        watermark=watermark,
    )


def old_inbox(data: bytes) -> tuple[Any, Any, str | None]:
    value = old_decode(data)
    if not isinstance(value, list) or len(value) != 3:
        raise WireFormatError("inbox record")
    key, message, msg_id = value
    if msg_id is not None and not isinstance(msg_id, str):
        raise WireFormatError("inbox record: msg_id")
    return key, message, msg_id


def old_letter(data: bytes) -> dict[str, Any]:
    letter = old_map(data, "dead letter")
    attempts, at, reason = letter.get("attempts", 0), letter.get("at", 0.0), letter.get("reason")
    if isinstance(attempts, bool) or not isinstance(attempts, int):
        raise WireFormatError("dead letter: attempts")
    if isinstance(at, bool) or not isinstance(at, int | float):
        raise WireFormatError("dead letter: at")
    if not isinstance(reason, str):
        raise WireFormatError("dead letter: reason")
    return letter


def old_request(data: bytes) -> tuple[str, Any]:
    message = old_map(data, "request", ("h",))
    return old_field(message, "h", str, "request"), message.get("p")


def old_reply(data: bytes) -> Any:
    try:
        message = old_map(data, "reply from n1")
    except WireFormatError as exc:
        return CallResult("n1", error=exc).unwrap()
    if "e" in message:
        return CallResult("n1", error=RemoteError(str(message.get("m", "remote error")))).unwrap()
    return CallResult("n1", value=message.get("r")).unwrap()


def old_handoff(data: bytes) -> tuple[int, list[Any]]:
    _name, batch = old_request(data)
    if not isinstance(batch, dict) or not isinstance(batch.get("epoch"), int):
        raise WireFormatError("handoff")
    workers = batch.get("workers")
    if not isinstance(workers, list):
        raise WireFormatError("handoff: workers")
    checked = []
    for entry in workers:
        if (
            not isinstance(entry, list)
            or len(entry) != 4
            or not isinstance(entry[2], list)
            or not isinstance(entry[3], int)
            or isinstance(entry[3], bool)
        ):
            raise WireFormatError("handoff: worker")
        checked.append((entry[0], entry[1], entry[2], entry[3]))
    return batch["epoch"], checked


# -- the records --------------------------------------------------------------------------------

PAYLOAD = {"qty": 3, "items": ["apple", "pear", "plum"], "total": 12.5, "at": 1.7e9}
WORKER = ("tenant-7", 4711)


def _letter_fields() -> dict[str, Any]:
    return {
        "key": WORKER,
        "message": PAYLOAD,
        "msg_id": "m-0001",
        "reason": "handle_cast raised ValueError('bad qty')",
        "attempts": 3,
        "at": 1.7e9,
        "raw": None,
    }


class Case:
    """One record kind: how it is encoded, decoded the old way and through the schema."""

    def __init__(
        self,
        name: str,
        kind: schema.Kind[Any],
        encode: Callable[[Keyring], bytes],
        old: Callable[[bytes], Any],
        new: Callable[[bytes, Keyring], Any],
    ) -> None:
        self.name, self.kind, self.encode, self.old, self.new = name, kind, encode, old, new


def _handoff_batch() -> dict[str, Any]:
    workers = [[("tenant", n), {"n": n, "seen": [n, n + 1]}, [], n] for n in range(200)]
    return {"epoch": 12, "workers": workers}


def _handoff_new(data: bytes, keyring: Keyring) -> Any:
    return schema.HANDOFF.convert(decode_request(data, keyring).p)


def cases() -> list[Case]:
    member = MemberRecord("node-3", 7, 1.0, ("eu", "gpu"), 1.7e9, 41, "up", 3.0)
    specs = {f"node-{n}": MemberSpec(1.0, ("eu",), n) for n in range(10)}
    epoch = EpochRecord(42, "node-0", specs)
    stored = Stored(WORKER, None, PAYLOAD, True, watermark=1234)
    inbox = [WORKER, PAYLOAD, "m-0001"]
    return [
        Case(
            "member",
            schema.MEMBER,
            member.encode,
            lambda d: old_member(d, "node-3"),
            lambda d, k: MemberRecord.decode(d, "node-3", k),
        ),
        Case("epoch (10 members)", schema.EPOCH, epoch.encode, old_epoch, EpochRecord.decode),
        Case(
            "sentry lease",
            schema.SENTRY,
            lambda k: encode_sentry("node-0", k),
            old_sentry,
            decode_sentry,
        ),
        Case("claim", schema.CLAIM, Claim("node-3", 42).encode, old_claim, Claim.decode),
        Case("stored worker", schema.STATE, stored.encode, old_stored, Stored.decode),
        Case(
            "inbox record",
            schema.INBOX,
            lambda k: schema.encode(schema.INBOX, inbox, k),
            old_inbox,
            lambda d, k: schema.decode(schema.INBOX, d, k),
        ),
        Case(
            "dead letter",
            schema.DEAD_LETTER,
            lambda k: schema.encode(schema.DEAD_LETTER, _letter_fields(), k),
            old_letter,
            lambda d, k: schema.decode(schema.DEAD_LETTER, d, k),
        ),
        Case(
            "table value",
            schema.TABLE,
            lambda k: schema.encode(schema.TABLE, PAYLOAD, k),
            old_decode,
            lambda d, k: schema.decode(schema.TABLE, d, k),
        ),
        Case(
            "request",
            schema.REQUEST,
            lambda k: encode_request(
                "cloister.manager.shop.call", [WORKER, PAYLOAD], "n1", keyring=k
            ),
            old_request,
            decode_request,
        ),
        Case(
            "reply",
            schema.REPLY,
            lambda k: encode_reply({"r": PAYLOAD}, k),
            old_reply,
            lambda d, k: decode_reply("n1", d, k).unwrap(),
        ),
        Case(
            "handoff (200 workers)",
            schema.REQUEST,
            lambda k: encode_request(
                "cloister.manager.shop.handoff", _handoff_batch(), "n1", keyring=k
            ),
            old_handoff,
            _handoff_new,
        ),
    ]


def per_call(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Microseconds of CPU per call of each function: the best of ``rounds`` timed
    batches, the functions taking turns within each round. CPU time of this process
    (``process_time``), not wall time: on a shared machine the time spent descheduled
    would swamp differences of a microsecond."""
    collecting = gc.isenabled()
    gc.disable()  # as timeit does: a collection falling in one batch is not its cost
    try:
        return _per_call(fns, rounds)
    finally:
        if collecting:
            gc.enable()


def _per_call(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    number = 1
    first = next(iter(fns.values()))
    while True:  # a batch long enough to time (~20 ms)
        start = time.process_time()
        for _ in range(number):
            first()
        if time.process_time() - start > 0.02:
            break
        number *= 2
    best = dict.fromkeys(fns, math.inf)
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.process_time()
            for _ in range(number):
                fn()
            best[name] = min(best[name], (time.process_time() - start) / number)
    return {name: seconds * 1e6 for name, seconds in best.items()}


def _contenders(
    case: Case, data: bytes, data_sealed: bytes, plain: Keyring, sealed: Keyring
) -> dict[str, Callable[[], object]]:
    return {
        "old_decode_us": lambda: case.old(data),
        "schema_decode_us": lambda: case.new(data, plain),
        "sealed_decode_us": lambda: case.new(data_sealed, sealed),
        "encode_us": lambda: case.encode(plain),
        "sealed_encode_us": lambda: case.encode(sealed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="timed batches per figure")
    rounds = parser.parse_args().rounds
    plain, sealed = Keyring(), Keyring(["bench secret, new", "bench secret, old"])
    rows: list[dict[str, Any]] = []
    for case in cases():
        data, data_sealed = case.encode(plain), case.encode(sealed)
        assert data == wire.encode(wire.decode(data)), f"{case.name}: bytes not as before"
        assert case.new(data, plain) is not None and case.old(data) is not None
        assert case.new(data_sealed, sealed) == case.new(data, plain)
        timed = per_call(_contenders(case, data, data_sealed, plain, sealed), rounds)
        row: dict[str, Any] = {"record": case.name, "bytes": len(data), **timed}
        row["speedup"] = row["old_decode_us"] / row["schema_decode_us"]
        row["seal_cost_us"] = (
            row["sealed_decode_us"]
            + row["sealed_encode_us"]
            - row["schema_decode_us"]
            - row["encode_us"]
        )
        rows.append(row)
    print_table(
        "decoding a record: msgpack + hand checks (before) vs cloister.schema (msgspec), us",
        [
            "record",
            "bytes",
            "before",
            "schema",
            "speedup",
            "sealed dec",
            "encode",
            "sealed enc",
            "seal cost",
        ],
        [
            (
                r["record"],
                r["bytes"],
                f"{r['old_decode_us']:.2f}",
                f"{r['schema_decode_us']:.2f}",
                f"{r['speedup']:.2f}x",
                f"{r['sealed_decode_us']:.2f}",
                f"{r['encode_us']:.2f}",
                f"{r['sealed_encode_us']:.2f}",
                f"+{r['seal_cost_us']:.2f}",
            )
            for r in rows
        ],
    )
    slower = [r["record"] for r in rows if r["speedup"] < 1.0]
    path = write_json(
        "wire",
        {
            "rounds": rounds,
            "unit": "microseconds per record",
            "before": "msgpack.unpackb + hand checks (commit d2d4ecc)",
            "schema": "cloister.schema.decode (msgspec typed Structs, strict)",
            "sealed": "HMAC-SHA256 tag checked (decode) / added (encode), 41 bytes more",
            "rows": rows,
            "slower_than_before": slower,
        },
    )
    verdict = f"; SLOWER: {', '.join(slower)}" if slower else "; schema at least as fast for all"
    print(f"\nwrote {path}{verdict}")


if __name__ == "__main__":
    main()
