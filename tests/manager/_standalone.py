"""Helpers for the standalone DynamicManager tests: recording managers (and ``until``,
which is :func:`cloister.testing.eventually`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from cloister import DynamicManager, Ok
from cloister.testing import eventually as until  # the shared poller, named as these tests call it

__all__ = ["FLAVOURS", "Recorder", "Scripted", "loop_lags", "running", "until", "with_specs"]

M = TypeVar("M", bound=DynamicManager)


@asynccontextmanager
async def running(cls: type[M], **options: Any) -> AsyncIterator[M]:
    """``await cls.start(**options)``, stopped at the end of the block."""
    manager = await cls.start(**options)
    try:
        yield manager
    finally:
        await manager.stop()


@asynccontextmanager
async def loop_lags(tick: float = 0.01) -> AsyncIterator[list[float]]:
    """How late each ``tick`` of a ticker on this event loop came, while the block runs."""
    lags: list[float] = []

    async def ticker() -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(tick)
            lags.append(time.monotonic() - before - tick)

    task = asyncio.create_task(ticker())
    try:
        yield lags
    finally:
        task.cancel()


class Recorder(DynamicManager):
    """Records every callback as a tuple in ``self.events``; specs come from ``SPECS``."""

    SPECS: Mapping[Any, Any] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[tuple[Any, ...]] = []

    def children_specs(self) -> Mapping[Any, Any]:
        return self.SPECS

    def terminate(self, reason: str, id: Any, payload: Any) -> None:
        self.events.append(("terminate", reason, id, payload))

    def handle_state_change(self, state: str) -> None:
        self.events.append(("state", state))

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        """The recorded events of one kind, without the kind."""
        return [e[1:] for e in self.events if e[0] == kind]


class Scripted(Recorder):
    """Sync callbacks driven by the test.

    ``perform`` returns the next item of ``SCRIPT`` (``Ok(None)`` once it is used up);
    ``handle_call`` and ``handle_cast`` return their message, so a test sends the response
    it wants (``await manager.call("a", Replace(1))``). Every callback is recorded.
    """

    SCRIPT: tuple[Any, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.script: list[Any] = list(self.SCRIPT)
        self.perform_times: list[float] = []  # loop time of every perform

    def _perform(self, id: Any, payload: Any) -> Any:
        self.events.append(("perform", id, payload))
        self.perform_times.append(time.monotonic())  # the loop's clock, from any thread
        return self.script.pop(0) if self.script else Ok(None)

    def _message(self, kind: str, message: Any, id: Any, payload: Any) -> Any:
        self.events.append((kind, message, id, payload))
        return message

    def perform(self, id: Any, payload: Any) -> Any:
        return self._perform(id, payload)

    def handle_call(self, message: Any, id: Any, payload: Any) -> Any:
        return self._message("call", message, id, payload)

    def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        return self._message("cast", message, id, payload)


class EagerScripted(Scripted):
    """``async def`` callbacks that finish without suspending."""

    async def perform(self, id: Any, payload: Any) -> Any:
        return self._perform(id, payload)

    async def handle_call(self, message: Any, id: Any, payload: Any) -> Any:
        return self._message("call", message, id, payload)

    async def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        return self._message("cast", message, id, payload)


class SuspendingScripted(Scripted):
    """``async def`` callbacks that really suspend (``await asyncio.sleep``) first."""

    async def perform(self, id: Any, payload: Any) -> Any:
        await asyncio.sleep(0.002)
        return self._perform(id, payload)

    async def handle_call(self, message: Any, id: Any, payload: Any) -> Any:
        await asyncio.sleep(0.002)
        return self._message("call", message, id, payload)

    async def handle_cast(self, message: Any, id: Any, payload: Any) -> Any:
        await asyncio.sleep(0.002)
        return self._message("cast", message, id, payload)


FLAVOURS: dict[str, type[Scripted]] = {
    "sync": Scripted,
    "async-eager": EagerScripted,
    "async-suspending": SuspendingScripted,
}


def with_specs(base: type[M], specs: Mapping[Any, Any], **attributes: Any) -> type[M]:
    """A subclass of ``base`` whose ``children_specs()`` returns ``specs``."""
    return type(base.__name__, (base,), {"SPECS": specs, **attributes})
