"""Event-loop lag: how late the loop runs, and who held it when it stalled.

Leases, renewals and every decision of a node run on its event loop, so a callback that
blocks the loop (a sync ``time.sleep``, a CPU-bound perform) delays them all. A
:class:`LoopWatch` measures that: a task on the loop stamps the time every ``interval``,
and a daemon thread checks the stamp. When it is older than ``threshold`` the thread
reads the loop thread's stack (``sys._current_frames``, no cost on the hot path) and
logs once per stall which code holds the loop — the user's frame, not ours or asyncio's.

One watch per event loop: every node of a process shares it (:func:`watch`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import sysconfig
import threading
import time
import weakref
from types import FrameType

from cloister._histogram import Histogram

log = logging.getLogger("cloister.loopwatch")

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_STDLIB = os.path.abspath(sysconfig.get_paths()["stdlib"])


class LoopWatch:
    """Measures one event loop's lag; see the module's docstring."""

    def __init__(self, threshold: float = 0.25, interval: float = 0.05) -> None:
        self.threshold = threshold
        self.interval = interval
        self.lag = 0.0
        """How late the last tick ran, in seconds (0 when the loop keeps time)."""
        self.max_lag = 0.0
        self.stalls = 0
        """Stalls longer than ``threshold`` seen so far."""
        self.last_culprit: str | None = None
        self.delays = Histogram()
        """Every tick's lateness, in seconds (the metrics export it)."""
        self._stamp = time.monotonic()
        self._reported = False
        self._users = 0
        self._ticker: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._loop_thread = threading.get_ident()

    def start(self) -> None:
        """Start watching the running loop (idempotent: counted per user)."""
        self._users += 1
        if self._ticker is not None:
            return
        self._loop_thread = threading.get_ident()
        self._stamp = time.monotonic()
        self._stop.clear()
        self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="loop watch")
        self._thread = threading.Thread(target=self._watch, name="cloister-loopwatch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """One user less; the last one stops the task and the thread."""
        self._users = max(0, self._users - 1)
        if self._users or self._ticker is None:
            return
        self._ticker.cancel()
        self._ticker = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)  # it wakes every interval: at once, in practice
            self._thread = None

    async def _tick(self) -> None:
        interval = self.interval
        while True:
            before = time.monotonic()
            await asyncio.sleep(interval)
            now = time.monotonic()
            self.lag = max(0.0, now - before - interval)
            self.delays.observe(self.lag)
            self.max_lag = max(self.max_lag, self.lag)
            self._stamp = now
            if self._reported:
                self._reported = False
                log.warning(
                    "the event loop was blocked for %.2fs (by %s); leases and renewals "
                    "waited as long — run such code off the loop",
                    self.lag,
                    self.last_culprit,
                )

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            stalled = time.monotonic() - self._stamp - self.interval
            if stalled > self.threshold and not self._reported:
                # The culprit first: the ticker logs it as soon as it sees the flag.
                self.last_culprit = culprit(sys._current_frames().get(self._loop_thread))
                self.stalls += 1
                self._reported = True

    @property
    def running(self) -> bool:
        """True while the ticker runs."""
        return self._ticker is not None


def culprit(frame: FrameType | None) -> str:
    """``func at file:line``: the innermost frame of the stack that is neither
    pycloister's nor the standard library's (the user's code), else the innermost one."""
    innermost: str | None = None
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        where = f"{frame.f_code.co_name} at {frame.f_code.co_filename}:{frame.f_lineno}"
        if innermost is None:
            innermost = where
        ours = path.startswith(_PACKAGE)
        stdlib = path.startswith(_STDLIB) and "site-packages" not in path
        if not ours and not stdlib and "<frozen" not in path:
            return where
        frame = frame.f_back
    return innermost or "unknown code"


_WATCHES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopWatch] = (
    weakref.WeakKeyDictionary()
)


def watch() -> LoopWatch:
    """The watch of the running loop (created on first use; :meth:`LoopWatch.start` it)."""
    loop = asyncio.get_running_loop()
    found = _WATCHES.get(loop)
    if found is None:
        found = _WATCHES[loop] = LoopWatch()
    return found
