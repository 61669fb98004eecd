"""NATS-specific behaviour of the partitioned log (the shared contract is in test_contract.py).

The layout on the server, names NATS cannot carry as they are, recovery of deliveries lost
on the wire, a server restart under a live claim, and the loss of an R3 stream's leader
in the middle of appends.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg

from cloister.backends import Log, LogConsumer, LogRecord
from cloister.backends._names import log_stream
from cloister.backends.nats._log import NatsLog
from cloister.backends.nats._log_admin import (
    ACK_WAIT,
    MAX_ACK_PENDING,
    consumer_name,
    parse_consumer_name,
)
from cloister.backends.nats._log_consumer import NatsLogConsumer
from cloister.backends.nats._publish import FramedPublisher, _Batch
from cloister.errors import BackendError, BackendUnavailableError, ConfigurationError
from cloister.testing import NatsCluster, NatsServer, eventually
from tests.backends.support import connected


async def drain(consumer: LogConsumer, expected: int, timeout: float = 20.0) -> list[LogRecord]:
    """Fetch (retrying unavailability) until ``expected`` records came or time ran out."""
    records: list[LogRecord] = []
    deadline = time.monotonic() + timeout
    while len(records) < expected and time.monotonic() < deadline:
        try:
            records.extend(await consumer.fetch(256, 1.0))
        except BackendUnavailableError:
            await asyncio.sleep(0.1)
    return records


async def depth_becomes(log: Log, value: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (found := await log.depth()) != value:
        assert time.monotonic() < deadline, f"depth stayed {found}, not {value}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("name", ["n1", "node.7", "a=b", "ünï cödé", "p3-x", "=41"])
def test_consumer_names_round_trip(name: str) -> None:
    durable = consumer_name(5, name)
    assert not set(durable) & set(".*> \t/\\")
    assert parse_consumer_name(durable) == (5, name)


async def test_layout_on_the_server(nats_server: NatsServer) -> None:
    async with connected(nats_server.url, cluster="shop") as backend:
        log = await backend.log("inbox-orders", partitions=8, dedup_window=30)
        assert await backend.log("inbox-orders", partitions=8) is log
        with pytest.raises(ConfigurationError, match="fixed"):
            await backend.log("inbox-orders", partitions=4)
        with pytest.raises(ConfigurationError):
            await backend.log("bad.name", partitions=1)
        await log.append(3, b"x", msg_id="m-1")
        await log.claim(3, "node.1")
        raw = await nats.connect(nats_server.url)
        try:
            jsm = raw.jetstream()._jsm
            info = await jsm.stream_info(log_stream("shop", "inbox-orders"))
            config = info.config
            assert config.subjects == ["cloister.shop.log.inbox-orders.*"]
            assert config.retention == "workqueue"
            assert config.storage == "file"
            assert config.duplicate_window == 30
            assert (config.metadata or {})["cloister.partitions"] == "8"
            consumer = await jsm.consumer_info(
                log_stream("shop", "inbox-orders"), consumer_name(3, "node.1")
            )
            assert consumer.config.filter_subject == "cloister.shop.log.inbox-orders.3"
            assert consumer.config.ack_wait == ACK_WAIT
            assert consumer.config.max_ack_pending == MAX_ACK_PENDING
            assert consumer.config.durable_name == "p3-node=2E1"
        finally:
            await raw.close()


async def test_deliveries_lost_on_the_wire_are_taken_again(nats_server: NatsServer) -> None:
    """A gap in the consumer sequence (or a reconnect) re-creates the durable: the lost
    records come, in order; those already handed out do not come twice and their acks
    still count."""
    async with connected(nats_server.url) as backend:
        log = await backend.log("gaps", partitions=1)
        for i in range(8):
            await log.append(0, b"%d" % i)
        consumer = await log.claim(0, "n1")
        assert isinstance(consumer, NatsLogConsumer)
        first = await consumer.fetch(3, 2.0)
        assert [r.data for r in first] == [b"0", b"1", b"2"]
        await consumer.ack(first[0])
        consumer._lost = True  # as if a delivery had gone missing
        rest = await drain(consumer, 5, timeout=5)
        assert [r.data for r in rest] == [b"3", b"4", b"5", b"6", b"7"]
        for record in [*first[1:], *rest]:
            await consumer.ack(record)
        await depth_becomes(log, 0)


async def test_acks_lost_on_the_wire_are_sent_again_before_release(
    nats_server: NatsServer,
) -> None:
    """An ack lost in flight (a leader change, a dropped connection) would hand its
    record to the next consumer again: release notices and sends it once more."""
    async with connected(nats_server.url) as backend:
        log = await backend.log("lost-acks", partitions=1)
        for i in range(3):
            await log.append(0, b"%d" % i)
        consumer = await log.claim(0, "n1")
        assert isinstance(consumer, NatsLogConsumer)
        records = await consumer.fetch(3, 2.0)
        await consumer.ack(records[0])
        lost = records[1]  # acked by the caller, but the ack never reached the server:
        del consumer._held[lost.sequence]
        consumer._recent[lost.sequence] = lost.ref.reply
        consumer._acks += 1
        await consumer.release()
        successor = await log.claim(0, "n2")
        assert [r.data for r in await drain(successor, 1, timeout=3)] == [b"2"]


async def _everything(log: Log, partitions: int, expected: int) -> dict[int, list[bytes]]:
    """The records of every partition, in order (each partition claimed, read, released)."""
    found: dict[int, list[bytes]] = {}
    for partition in range(partitions):
        consumer = await log.claim(partition, "reader")
        found[partition] = [r.data for r in await drain(consumer, expected, timeout=3)]
        await consumer.release()
    return found


@pytest.mark.parametrize("framed", [True, False], ids=["framed", "publish_async"])
async def test_append_many_stores_a_batch_in_order_and_each_msg_id_once(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, framed: bool
) -> None:
    """A pipelined batch (larger than one chunk of frames) is stored in order per
    partition; a record whose id the log already holds, in this batch or before, is
    dropped and answered with the first one's sequence; records without an id are
    stored each time. Both ways of publishing (prebuilt frames, and nats-py's
    ``publish_async`` where nats-py lacks what the frames need) do the same."""
    if not framed:
        monkeypatch.setattr("cloister.backends.nats._log.framed_ok", lambda nc: False)
    async with connected(nats_server.url) as backend:
        log = await backend.log("batch", partitions=3)
        first = await log.append(1, b"before", msg_id="id-before")
        body = b"x" * 100
        records: list[tuple[int, bytes, str | None]] = [
            (n % 3, b"%d:" % n + body, f"id-{n}" if n % 5 else None) for n in range(2000)
        ]
        records += [(1, b"again", "id-before"), (2, b"again", "id-7")]
        sequences = await log.append_many(records)
        assert len(sequences) == len(records)
        assert sequences[-2] == first  # a duplicate: the first one's sequence
        assert sequences[-1] == sequences[7]
        assert len(set(sequences[:2000])) == 2000
        assert await log.depth() == 2001
        # The same batch again: only the 400 records without an id are stored again.
        assert await log.append_many(records[:2000:5]) != sequences[:2000:5]
        assert await log.append_many(records[1:2000:5]) == sequences[1:2000:5]
        assert await log.depth() == 2401
        stored = await _everything(log, 3, 1000)
        for partition in range(3):
            mine = [data for p, data, _ in records[:2000] if p == partition]
            once = [data for p, data, i in records[:2000:5] if p == partition]
            assert stored[partition] == ([b"before"] if partition == 1 else []) + mine + once
        assert await log.append_many([]) == []


async def test_append_many_ids_match_those_of_single_appends(nats_server: NatsServer) -> None:
    """A record of a batch that is appended again alone (its ack lost) must carry the
    id the server saw first: ids nats-py trims or unfolds, and ids beyond ASCII (whose
    header length is counted in bytes), deduplicate across the two ways."""
    odd = [" padded ", "two\r\nlines", "ünï cödé-1", "tab\tinside"]
    async with connected(nats_server.url) as backend:
        log = await backend.log("ids", partitions=1)
        sequences = await log.append_many([(0, b"%d" % n, i) for n, i in enumerate(odd)])
        assert len(set(sequences)) == len(odd)
        for n, msg_id in enumerate(odd):
            assert await log.append(0, b"again", msg_id=msg_id) == sequences[n]
        assert await log.append_many([(0, b"again", i) for i in odd]) == sequences
        assert await log.depth() == len(odd)
        assert backend.connected  # no frame the server could not parse


async def test_append_many_answers_a_lost_ack_by_appending_it_again(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An acknowledgement that never comes (the server stored the record) leaves its
    record unanswered for ``op_timeout``; it is then appended alone, with its id, and
    the server drops the repeat."""
    async with connected(nats_server.url, op_timeout=0.5) as backend:
        log = await backend.log("lost", partitions=2)
        assert isinstance(log, NatsLog)
        framed = log._framed
        real = framed._on_ack
        lost: list[str] = []

        async def loses_the_third(msg: Any) -> None:
            if msg.subject.endswith(".2") and not lost:
                lost.append(msg.subject)
                return
            await real(msg)

        monkeypatch.setattr(framed, "_on_ack", loses_the_third)  # before it subscribes
        sequences = await log.append_many([(n % 2, b"%d" % n, f"m{n}") for n in range(6)])
        assert len(lost) == 1
        assert len(set(sequences)) == 6
        assert await log.depth() == 6
        assert not framed._batches  # nothing is kept of a finished batch


async def test_acks_are_read_at_the_boundary() -> None:
    """What reaches the acks' inbox is checked before it answers a record: another
    batch's number, a record number that is none, a status reply (no responders), a
    refusal or a body that is no ack answer nothing, or None; nothing raises (it would
    in nats-py's subscription task)."""
    framed = FramedPublisher()
    framed._inbox, framed._cut = "_INBOX.me", len("_INBOX.me") + 1
    loop = asyncio.get_running_loop()
    batch = framed._batches["5"] = _Batch(4, loop.create_future())

    def ack(subject: str, data: bytes, headers: dict[str, str] | None = None) -> Msg:
        return Msg(None, subject=f"_INBOX.me.{subject}", data=data, headers=headers)  # type: ignore[arg-type]

    for stray in [
        ack("6.0", b'{"stream":"s","seq":9}'),  # no such batch
        ack("5.x", b'{"stream":"s","seq":9}'),
        ack("5.\u0663", b'{"stream":"s","seq":9}'),  # a digit, not an ASCII one
        ack("5.99", b'{"stream":"s","seq":9}'),  # beyond the batch
        ack("5", b'{"stream":"s","seq":9}'),
    ]:
        await framed._on_ack(stray)
    assert batch.left == 4
    await framed._on_ack(ack("5.0", b'{"stream":"s","seq":12}'))
    await framed._on_ack(ack("5.0", b'{"stream":"s","seq":13}'))  # a second answer
    await framed._on_ack(ack("5.1", b"", {"Status": "503"}))
    await framed._on_ack(ack("5.2", b'{"error":{"code":400,"description":"no"}}'))
    assert batch.left == 1 and not batch.done.done()
    await framed._on_ack(ack("5.3", b"not json at all"))
    assert batch.done.done()
    assert batch.sequences == [12, None, None, None]
    await framed._on_ack(ack("5.3", b'{"stream":"s","seq":3,"duplicate":true}'))
    assert batch.sequences[3] is None


async def test_append_many_too_large_for_the_server_says_so(nats_server: NatsServer) -> None:
    """A record beyond the server's ``max_payload`` is never written (the server would
    close the connection): the batch fails with the single append's error, the other
    records are stored, and the connection stays up."""
    async with connected(nats_server.url) as backend:
        log = await backend.log("big", partitions=1)
        assert backend.max_payload is not None
        huge = b"x" * (backend.max_payload + 1)
        with pytest.raises(BackendError, match="payload"):
            await log.append_many([(0, b"small", "s1"), (0, huge, "h1"), (0, b"too", "s2")])
        assert backend.connected
        assert await log.depth() == 2


async def test_claim_survives_a_server_restart(nats_server: NatsServer) -> None:
    async with connected(nats_server.url) as backend:
        log = await backend.log("restart", partitions=2)
        for i in range(10):
            await log.append(1, b"%d" % i)
        consumer = await log.claim(1, "n1")
        before = await consumer.fetch(4, 2.0)
        for record in before[:2]:
            await consumer.ack(record)
        await asyncio.sleep(0.1)  # let the acks reach the server before it goes down
        reconnects = backend.reconnects
        await nats_server.restart_async()
        await eventually(lambda: backend.reconnects > reconnects, 10, "a reconnect")
        after = await drain(consumer, 6)
        assert [r.data for r in after] == [b"%d" % i for i in range(4, 10)]
        for record in [*before[2:], *after]:
            await consumer.ack(record)
        await depth_becomes(log, 0)


async def test_no_acknowledged_append_is_lost_when_the_stream_leader_dies(
    nats_cluster: NatsCluster,
) -> None:
    """1000 appends to an R3 log, consumed as they come; SIGKILL the stream leader a
    third of the way through.

    Appends retry (with their message id) until acknowledged. Every acknowledged record
    is fetched, in order per partition; a record is handed out twice at most in the rare
    case that an applied ack was lost with the leader (at-least-once), and the log ends
    empty.
    """
    total, partitions = 1000, 4
    stream = log_stream("t", "r3")
    async with (
        connected(nats_cluster.url, node="producer", replicas=3) as producer,
        connected(nats_cluster.url, node="consumer", replicas=3) as reader,
    ):
        log = await producer.log("r3", partitions=partitions)
        theirs = await reader.log("r3", partitions=partitions)
        leader = await nats_cluster.wait_stream_leader_async(stream)
        acknowledged: dict[int, list[tuple[int, bytes]]] = {p: [] for p in range(partitions)}
        fetched: dict[int, list[tuple[int, bytes]]] = {p: [] for p in range(partitions)}
        produced = asyncio.Event()

        async def consume(partition: int) -> None:
            consumer = await theirs.claim(partition, "consumer")
            while not produced.is_set() or len(set(fetched[partition])) < len(
                acknowledged[partition]
            ):
                try:
                    records = await consumer.fetch(100, 0.5)
                except BackendUnavailableError:
                    await asyncio.sleep(0.1)
                    continue
                for record in records:
                    fetched[partition].append((record.sequence, record.data))
                    while True:  # an ack refused while reconnecting is sent again
                        try:
                            await consumer.ack(record)
                            break
                        except BackendUnavailableError:
                            await asyncio.sleep(0.1)

        consumers = [asyncio.ensure_future(consume(p)) for p in range(partitions)]
        failures = 0
        killed_at = recovered_at = 0.0
        for i in range(total):
            if i == total // 3:
                leader.kill()
                killed_at = time.monotonic()
            partition, data = i % partitions, b"%d" % i
            while True:
                try:
                    sequence = await log.append(partition, data, msg_id=f"r-{i}")
                    break
                except BackendUnavailableError:
                    failures += 1
                    assert time.monotonic() - killed_at < 30, "appends never came back"
                    await asyncio.sleep(0.05)
            if killed_at and not recovered_at:
                recovered_at = time.monotonic()
            acknowledged[partition].append((sequence, data))
        produced.set()
        await asyncio.wait_for(asyncio.gather(*consumers), 30)
        twice = sum(len(fetched[p]) - len(set(fetched[p])) for p in range(partitions))
        print(
            f"\nR3 leader loss: appends back after {recovered_at - killed_at:.2f}s "
            f"({failures} failed attempts); {twice} record(s) fetched twice"
        )
        for partition in range(partitions):
            distinct = list(dict.fromkeys(fetched[partition]))
            assert distinct == acknowledged[partition], f"partition {partition}"
        assert twice <= 2
        await depth_becomes(theirs, 0)
    await leader.restart_async()
