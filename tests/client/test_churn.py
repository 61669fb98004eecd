"""A ``SyncClient`` shared by 8 threads casts 10,000 messages and calls keys while the
cluster of real ``cloister run`` processes loses a node to ``kill -9``, loses one to
SIGTERM and gains one: no acknowledged cast is lost, every key handles its casts in the
order they were acknowledged, every call is answered or fails with a typed error, and
the published epoch only ever lists the nodes — never the client.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from cloister import SyncClient
from cloister.errors import ClusterNotReadyError, RequestTimeoutError, UnknownWorkerError
from cloister.testing import NatsServer, ProcessGroup, wait_for
from tests.client.app import KEYS, key_name
from tests.client.processes import spawn_node

THREADS = 8
CASTS = 10_000
CALL_EVERY = 25  # each thread asks one of its keys after this many casts
PAUSE = 0.003  # between two casts of a thread: spreads the casts over the faults
TYPED = (RequestTimeoutError, ClusterNotReadyError, UnknownWorkerError)


class Progress:
    """How many casts were acknowledged so far, over every thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.casts = 0

    def add(self) -> None:
        with self._lock:
            self.casts += 1

    def reached(self, count: int) -> bool | None:
        return True if self.casts >= count else None


def test_sync_client_from_8_threads_through_kill_leave_and_join(
    nats_server: NatsServer, node_processes: ProcessGroup
) -> None:
    nodes = {name: spawn_node(node_processes, nats_server, "churn", name) for name in "abc"}
    client = SyncClient("churn", backend=nats_server.url)
    try:
        wait_for(
            lambda: True if _epoch_members(client) == {"a", "b", "c"} else None,
            30,
            "one epoch with a, b and c",
        )
        progress = Progress()
        acked: list[dict[str, list[int]]] = [{} for _ in range(THREADS)]
        calls: list[Counter[str]] = [Counter() for _ in range(THREADS)]
        untyped: list[BaseException] = []
        epochs: list[tuple[int, frozenset[str]]] = []
        done = threading.Event()
        # Casting holds at these counts until the fault before it happened, so every
        # fault falls in the middle of the stream, however fast the machine.
        killed, left, joined = threading.Event(), threading.Event(), threading.Event()
        holds = ((2_500, killed), (5_000, left), (7_500, joined))

        def produce(thread: int) -> None:
            keys = [key_name(n) for n in range(thread, KEYS, THREADS)]
            mine, outcomes = acked[thread], calls[thread]
            for n in range(CASTS // THREADS):
                for count, fault in holds:
                    if progress.casts >= count:
                        fault.wait(60)
                key, seq = keys[n % len(keys)], n // len(keys) + 1
                try:
                    client.cast("orders", key, seq)
                except Exception as exc:  # not acknowledged: it may or may not be stored
                    untyped.append(exc)
                    continue
                mine.setdefault(key, []).append(seq)
                progress.add()
                if n % CALL_EVERY == 0:
                    try:
                        answer = client.call("orders", key, "ping")
                        outcomes["answered" if answer == [key, "ping"] else "wrong"] += 1
                    except TYPED as exc:
                        outcomes[type(exc).__name__] += 1
                    except Exception as exc:
                        untyped.append(exc)
                time.sleep(PAUSE)

        def watch_epochs() -> None:  # the epoch as published, all along
            while not done.is_set():
                record = client.epoch()
                if record is not None:
                    epochs.append((record.epoch, frozenset(record.members)))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch_epochs, name="epochs")
        watcher.start()
        producers = [threading.Thread(target=produce, args=(t,)) for t in range(THREADS)]
        for thread in producers:
            thread.start()
        try:
            wait_for(lambda: progress.reached(2_000), 60, "2,000 casts before the kill")
            quiet = {members for _, members in epochs}
            nodes["a"].kill()  # kill -9
            killed.set()
            wait_for(lambda: progress.reached(4_500), 60, "4,500 casts before the leave")
            assert nodes["b"].terminate() == 0  # SIGTERM: b hands its keys over and leaves
            left.set()
            wait_for(lambda: progress.reached(6_500), 60, "6,500 casts before the join")
            spawn_node(node_processes, nats_server, "churn", "d")
            joined.set()
        finally:
            for fault in (killed, left, joined):
                fault.set()  # a failed step must not leave the producers holding
            for thread in producers:
                thread.join(timeout=120)
            done.set()
            watcher.join(timeout=10)

        assert untyped == []
        assert progress.casts == CASTS
        expected: dict[str, list[int]] = {}
        for per_thread in acked:
            expected.update(per_thread)

        def all_handled() -> dict[str, Any] | None:
            histories = {key: client.call("orders", key, "history") for key in expected}
            complete = all(
                set(seqs) <= set(histories[key]["seqs"]) for key, seqs in expected.items()
            )
            return histories if complete else None

        histories = wait_for(all_handled, 60, "every acknowledged cast handled")
        for key, history in histories.items():
            assert history["violations"] == 0, key  # never a lower new number after a higher
            assert history["seqs"] == sorted(set(history["seqs"])), key
        answered = sum(c["answered"] for c in calls)
        assert sum(c["wrong"] for c in calls) == 0
        assert answered > 0.5 * sum(sum(c.values()) for c in calls), calls

        # Before the first fault the epoch never moved, though 2,000 casts and 80 calls
        # went through; after it, only the nodes' own comings and goings changed it.
        assert quiet == {frozenset("abc")}, quiet
        allowed = {frozenset("abc"), frozenset("bc"), frozenset("c"), frozenset("cd")}
        assert {members for _, members in epochs} <= allowed, epochs
        assert set(client.members()) == {"c", "d"}
    finally:
        client.close()


def _epoch_members(client: SyncClient) -> set[str] | None:
    record = client.epoch()
    return None if record is None else set(record.members)
