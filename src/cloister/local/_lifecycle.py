"""The common shape of the harness's resources: start, stop, and ``with`` for both."""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self


class Lifecycle(ABC):
    """A resource that ``with`` starts (unless already started) and always stops on exit."""

    @abstractmethod
    def _was_started(self) -> bool:
        """Whether :meth:`start` has been called."""

    @abstractmethod
    def start(self) -> Self:
        """Start the resource."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the resource and release what it holds; idempotent."""

    def __enter__(self) -> Self:
        if not self._was_started():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
