"""``SyncClient`` as threaded code uses it: shared, closed from another thread, refused
where it cannot work."""

from __future__ import annotations

import threading

import pytest

from cloister import SyncClient
from cloister.errors import ClusterNotReadyError, ConfigurationError, NotRunningError
from cloister.testing import NatsServer
from tests.client.test_client import Ledger


def test_close_ends_what_other_threads_wait_for(nats_server: NatsServer) -> None:
    client = SyncClient("nobody-here", backend=nats_server.url)
    with pytest.raises(ClusterNotReadyError):
        client.call(Ledger, "k1", "history", timeout=0.2)
    outcome: list[BaseException] = []
    started = threading.Event()

    def wait_long() -> None:
        started.set()
        try:
            client.call(Ledger, "k1", "history", timeout=30)  # no epoch: retries until closed
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait_long)
    waiter.start()
    started.wait()
    client.close()
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], NotRunningError), outcome
    with pytest.raises(NotRunningError):
        client.cast(Ledger, "k1", 1)
    client.close()  # twice is fine


def test_memory_is_refused_with_what_to_use() -> None:
    with pytest.raises(ConfigurationError, match=r"cloister\.Client"):
        SyncClient("shop", backend="memory://sync")
