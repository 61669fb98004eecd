"""``SyncClient``: the :class:`~cloister.client.Client` for threads (Django, Flask, scripts).

One background thread runs an event loop that owns one :class:`Client` and its one
connection; every method hands its coroutine to that loop and waits for the result, so
any number of threads may share one ``SyncClient`` (as they would share a database
connection pool) and their casts are pipelined on the same connection.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable, Mapping
from concurrent.futures import CancelledError, Future
from types import TracebackType
from typing import Any, TypeVar

from cloister.client.core import Client
from cloister.client.targets import ManagerRef
from cloister.cluster.membership import MemberRecord
from cloister.cluster.topology import EpochRecord
from cloister.errors import ConfigurationError, NotRunningError
from cloister.observer import ClusterStatus

__all__ = ["SyncClient"]

T = TypeVar("T")


class SyncClient:
    """A blocking, thread-safe client of cluster ``cluster``; connects on creation.

    Takes the arguments of :class:`~cloister.client.Client`; its methods are the same,
    without ``await``. Close it (or use ``with SyncClient(...) as client:``) to stop its
    thread. ``memory://`` clusters live in one event loop: use :class:`Client` there.
    """

    def __init__(
        self,
        cluster: str,
        backend: str = "memory://default",
        *,
        call_timeout: float = 5.0,
        cast_timeout: float = 30.0,
        partitions: Mapping[str, int] | None = None,
        max_in_flight: int = 4096,
        secret: str | bytes | Iterable[str | bytes] | None = None,
        **backend_options: Any,
    ) -> None:
        if backend.startswith("memory://"):
            raise ConfigurationError(
                "a memory:// cluster lives in one event loop and SyncClient runs its own: "
                "use cloister.Client in the cluster's loop, or a shared backend (nats://)"
            )
        self._client = Client(
            cluster,
            backend,
            call_timeout=call_timeout,
            cast_timeout=cast_timeout,
            partitions=partitions,
            max_in_flight=max_in_flight,
            secret=secret,
            **backend_options,
        )
        self.cluster = cluster
        self.name = self._client.name
        self._closing = threading.Lock()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"cloister client {cluster}", daemon=True
        )
        self._thread.start()
        try:
            self._run(self._client.start())
        except BaseException:
            self._stop_loop()
            raise

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect and stop the background thread. Safe to call twice, from any thread."""
        with self._closing:  # from here on no method hands the loop anything new
            if self._closed:
                return
            self._closed = True
        try:
            self._submit(self._shutdown()).result()
        finally:
            self._stop_loop()

    async def _shutdown(self) -> None:
        """Close the client, then end what other threads still wait for (they get
        :class:`NotRunningError`): nothing is left on the loop when it stops."""
        await self._client.close()
        current = asyncio.current_task()
        waiting = [task for task in asyncio.all_tasks() if task is not current]
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)

    def cast(
        self,
        manager: ManagerRef,
        id: Any,
        message: Any,
        msg_id: str | None = None,
        *,
        timeout: float | None = None,
    ) -> str:
        """:meth:`Client.cast <cloister.client.Client.cast>`: returns the message id."""
        return self._run(self._client.cast(manager, id, message, msg_id, timeout=timeout))

    def cast_many(
        self,
        manager: ManagerRef,
        messages: Iterable[tuple[Any, Any] | tuple[Any, Any, str | None]],
        *,
        timeout: float | None = None,
    ) -> list[str]:
        """:meth:`Client.cast_many <cloister.client.Client.cast_many>`, pipelined."""
        batch = list(messages)  # read here, in the caller's thread
        return self._run(self._client.cast_many(manager, batch, timeout=timeout))

    def call(
        self, manager: ManagerRef, id: Any, message: Any, *, timeout: float | None = None
    ) -> Any:
        """:meth:`Client.call <cloister.client.Client.call>`: the worker's reply."""
        return self._run(self._client.call(manager, id, message, timeout=timeout))

    def status(self) -> ClusterStatus:
        """What ``cloister status --json`` shows (``status().to_json()``)."""
        return self._run(self._client.status())

    def members(self) -> dict[str, MemberRecord]:
        """The member records by node name."""
        return self._run(self._client.members())

    def epoch(self) -> EpochRecord | None:
        """The published epoch record, or None before the first one."""
        return self._run(self._client.epoch())

    # -- internals ---------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._closing:
            if self._closed:
                coro.close()
                raise NotRunningError(f"the client of cluster {self.cluster!r} is closed")
            future = self._submit(coro)
        try:
            return future.result()
        except CancelledError:
            if self._closed:
                raise NotRunningError(
                    f"the client of cluster {self.cluster!r} was closed while this waited"
                ) from None
            raise
        except BaseException:
            future.cancel()  # interrupted (Ctrl-C) or failed: nothing keeps running for us
            raise

    def _submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        if threading.current_thread() is self._thread:
            coro.close()
            raise NotRunningError(
                "SyncClient called from its own event loop thread (a callback of an async "
                "framework?): use cloister.Client with await there"
            )
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
