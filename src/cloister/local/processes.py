"""Child processes for tests: spawn, read their output, wait for a line, kill.

A :class:`NodeProcess` runs in its own process group; background threads read its stdout
and stderr line by line into a buffer (and optionally a log file), so a test can wait for
a line such as ``"ready"``. :meth:`NodeProcess.kill` SIGKILLs the whole group, children
included. A :class:`ProcessGroup` owns many and kills whatever is left when it stops.
"""

# The async waits take a timeout so that expiry raises our error carrying logs and state
# (asyncio.timeout would only raise a bare TimeoutError).

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, NamedTuple, Self

from cloister.local import _spawn
from cloister.local._lifecycle import Lifecycle
from cloister.local._wait import poll_async
from cloister.local.errors import HarnessError, LineNotFoundError

__all__ = ["NodeProcess", "OutputLine", "ProcessGroup"]

log = logging.getLogger("cloister.local")

_SRC_DIR = Path(__file__).resolve().parents[2]  # the directory that holds `cloister`
_TAIL_LINES = 20


class OutputLine(NamedTuple):
    """One line a child printed."""

    stream: str
    """``"stdout"`` or ``"stderr"``."""
    text: str
    """The line, decoded as UTF-8 (invalid bytes replaced), without its line break."""
    time: float
    """When it was read, in ``time.monotonic()`` seconds."""


class NodeProcess(Lifecycle):
    """A child process whose output is captured line by line.

    Args:
        argv: the command line (for Python code see :meth:`ProcessGroup.spawn_python`).
        name: a label for logs and error messages; default the program's name.
        env: variables added to (or replacing those in) this process's environment.
        cwd: working directory.
        log_path: also append every output line to this file.
        merge_stderr: read stderr into the stdout stream (one ordered stream).
        die_with_parent: on Linux, have the kernel SIGKILL the child if this process dies.
    """

    def __init__(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        merge_stderr: bool = False,
        die_with_parent: bool = True,
    ) -> None:
        if not argv:
            raise HarnessError("NodeProcess needs a non-empty argv")
        self.argv = [os.fspath(a) for a in argv]
        self.name = name or Path(self.argv[0]).name
        self.env = dict(env or {})
        self.cwd = cwd
        self.log_path = None if log_path is None else Path(log_path)
        self.merge_stderr = merge_stderr
        self.die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None
        self._lines: list[OutputLine] = []
        self._cond = threading.Condition()
        self._readers: list[threading.Thread] = []
        self._open_streams = 0
        self._log_file: IO[str] | None = None
        self._run_start = 0

    # ------------------------------------------------------------------ state

    @property
    def pid(self) -> int | None:
        """The child's pid (also its process group id), or ``None`` before :meth:`start`."""
        return None if self._proc is None else self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit code (negative: killed by that signal), or ``None`` while running."""
        return None if self._proc is None else self._proc.poll()

    @property
    def is_running(self) -> bool:
        """Tell whether the child is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def lines(self) -> list[OutputLine]:
        """A copy of every line read so far, over all runs, in arrival order."""
        with self._cond:
            return list(self._lines)

    @property
    def output(self) -> str:
        """The text of every line read so far, joined by newlines."""
        return "\n".join(line.text for line in self.lines)

    def mark(self) -> int:
        """The number of lines read so far: pass it as ``since`` to wait for newer lines."""
        with self._cond:
            return len(self._lines)

    def tail(self, lines: int = _TAIL_LINES) -> str:
        """The last ``lines`` lines, each prefixed by its stream, for error messages."""
        return "\n".join(f"{ln.stream}: {ln.text}" for ln in self.lines[-lines:])

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Spawn the child (in a new process group) and start reading its output.

        Raises:
            HarnessError: it is already running.
        """
        if self.is_running:
            raise HarnessError(f"{self!r} is already running")
        self._join_readers()
        env = {**os.environ, **self.env}
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = self.log_path.open("a", encoding="utf-8", buffering=1)
        self._proc = _spawn.spawn(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if self.merge_stderr else subprocess.PIPE,
            env=env,
            cwd=self.cwd,
            die_with_parent=self.die_with_parent,
        )
        with self._cond:
            self._run_start = len(self._lines)
        streams = [("stdout", self._proc.stdout)]
        if not self.merge_stderr:
            streams.append(("stderr", self._proc.stderr))
        self._open_streams = len(streams)
        self._readers = []
        for stream, pipe in streams:
            assert pipe is not None
            thread = threading.Thread(
                target=self._read,
                args=(stream, pipe),
                name=f"cloister.local reader {self.name} {stream}",
                daemon=True,
            )
            thread.start()
            self._readers.append(thread)
        log.info("spawned %s (pid %d): %s", self.name, self._proc.pid, " ".join(self.argv))
        return self

    def restart(self) -> Self:
        """Start the same command again (terminating the child first if it still runs).

        :meth:`wait_for_line` then looks only at lines of the new run by default.
        """
        if self.is_running:
            self.terminate()
        return self.start()

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the child itself (not its group)."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    def stop(self) -> None:
        """SIGKILL the child if it still runs (what leaving a ``with`` block does)."""
        self.kill()

    def kill(self) -> int | None:
        """SIGKILL the child and its whole process group; return the exit code (``-9``)."""
        if self._proc is None:
            return None
        code = _spawn.stop(self._proc, grace=None)
        self._join_readers()
        log.info("%s (pid %d) killed, exit code %s", self.name, self._proc.pid, code)
        return code

    def terminate(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the child and wait for it; SIGKILL its group after ``timeout`` seconds.

        Returns the exit code, or ``None`` if it was never started.
        """
        return self._terminate(timeout, send_term=True)

    def _terminate(self, timeout: float, *, send_term: bool) -> int | None:
        if self._proc is None:
            return None
        code = _spawn.stop(self._proc, grace=timeout, send_term=send_term)
        self._join_readers()
        log.info("%s (pid %d) terminated, exit code %s", self.name, self._proc.pid, code)
        return code

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to exit by itself and return its exit code.

        Raises:
            subprocess.TimeoutExpired: still running after ``timeout`` seconds.
            HarnessError: never started.
        """
        if self._proc is None:
            raise HarnessError(f"{self!r} was never started")
        code = self._proc.wait(timeout)
        self._join_readers()
        return code

    def _was_started(self) -> bool:
        return self._proc is not None

    def __repr__(self) -> str:
        state = "running" if self.is_running else f"exit code {self.returncode}"
        return f"<NodeProcess {self.name} pid={self.pid} {state}>"

    # ------------------------------------------------------------------ output

    def wait_for_line(
        self,
        pattern: str | re.Pattern[str],
        timeout: float = 10.0,
        *,
        since: int | None = None,
        stream: str | None = None,
        text_of: Callable[[str], str | None] | None = None,
    ) -> re.Match[str]:
        """Wait until a line matching ``pattern`` (``re.search``) is printed; return the match.

        Lines already printed count: by default every line of the current run (since the
        last :meth:`start`); give ``since=proc.mark()`` to look only at newer lines, and
        ``stream="stdout"`` or ``"stderr"`` to look at one stream. ``text_of`` matches the
        pattern against what it returns for a line instead (None: the line is skipped),
        e.g. the message of a log record.

        Raises:
            LineNotFoundError: the line did not come within ``timeout`` seconds, or the
                child exited without printing it; the message shows its last lines.
        """
        regex = re.compile(pattern)
        scan = _Scan(self, regex, self._run_start if since is None else since, stream, text_of)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = scan.step()
                if found is not None:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise scan.failure(f"within {timeout:.1f}s")
                self._cond.wait(remaining)

    async def wait_for_line_async(
        self,
        pattern: str | re.Pattern[str],
        timeout: float = 10.0,
        *,
        since: int | None = None,
        stream: str | None = None,
        text_of: Callable[[str], str | None] | None = None,
    ) -> re.Match[str]:
        """Like :meth:`wait_for_line`, but awaitable: the event loop keeps running meanwhile."""
        regex = re.compile(pattern)
        scan = _Scan(self, regex, self._run_start if since is None else since, stream, text_of)

        def check() -> re.Match[str] | None:
            with self._cond:
                return scan.step()

        found = await poll_async(check, timeout)
        if found is None:
            raise scan.failure(f"within {timeout:.1f}s")
        return found

    # ------------------------------------------------------------------ internals

    def _read(self, stream: str, pipe: IO[bytes]) -> None:
        try:
            for raw in iter(pipe.readline, b""):
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                log.debug("%s %s| %s", self.name, stream, text)
                with self._cond:
                    self._lines.append(OutputLine(stream, text, time.monotonic()))
                    if self._log_file is not None:
                        self._log_file.write(text + "\n")
                    self._cond.notify_all()
        finally:
            pipe.close()
            with self._cond:
                self._open_streams -= 1
                if self._open_streams == 0 and self._log_file is not None:
                    self._log_file.close()
                    self._log_file = None
                self._cond.notify_all()

    def _join_readers(self) -> None:
        for thread in self._readers:
            thread.join(5.0)
            if thread.is_alive():
                log.warning("%s: output reader still blocked (a grandchild holds the pipe)", self)

    def _finished(self) -> bool:
        """Whether the child exited and all its output was read (call with the lock held)."""
        return self._open_streams == 0 and self._proc is not None and self._proc.poll() is not None


class _Scan:
    """Incremental search of a NodeProcess's lines for one regex."""

    def __init__(
        self,
        proc: NodeProcess,
        regex: re.Pattern[str],
        start: int,
        stream: str | None,
        text_of: Callable[[str], str | None] | None = None,
    ) -> None:
        self.proc, self.regex, self.index, self.stream = proc, regex, start, stream
        self.text_of = text_of

    def step(self) -> re.Match[str] | None:
        """Scan new lines (the caller holds the lock); raise if the child ended without it."""
        lines = self.proc._lines
        while self.index < len(lines):
            line = lines[self.index]
            self.index += 1
            if self.stream is None or line.stream == self.stream:
                text = line.text if self.text_of is None else self.text_of(line.text)
                found = None if text is None else self.regex.search(text)
                if found is not None:
                    return found
        if self.proc._finished():
            raise self.failure(f"before it exited with code {self.proc.returncode}")
        return None

    def failure(self, what: str) -> LineNotFoundError:
        return LineNotFoundError(
            f"{self.proc.name} (pid {self.proc.pid}) printed no line matching "
            f"{self.regex.pattern!r} {what}. Last lines:\n{self.proc.tail() or '(none)'}"
        )


class ProcessGroup(Lifecycle):
    """Owns child processes and kills every one still running when it stops.

    Use it as a context manager (or the ``node_processes`` pytest fixture); each child's
    output also goes to ``<log_dir>/<name>.log`` when ``log_dir`` is given.

    Args:
        log_dir: directory for one log file per child (``None``: no files).
        env: variables given to every child (on top of this process's environment).
        die_with_parent: on Linux, have the kernel kill the children if this process dies.
    """

    def __init__(
        self,
        *,
        log_dir: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        die_with_parent: bool = True,
    ) -> None:
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.env = dict(env or {})
        self.die_with_parent = die_with_parent
        self.processes: list[NodeProcess] = []

    def spawn(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        merge_stderr: bool = False,
    ) -> NodeProcess:
        """Start ``argv`` as a :class:`NodeProcess` owned by this group and return it.

        ``name`` defaults to ``node<k>`` (k = 1, 2, ...).
        """
        name = name or f"node{len(self.processes) + 1}"
        proc = NodeProcess(
            argv,
            name=name,
            env={**self.env, **(env or {})},
            cwd=cwd,
            log_path=None if self.log_dir is None else self.log_dir / f"{name}.log",
            merge_stderr=merge_stderr,
            die_with_parent=self.die_with_parent,
        )
        self.processes.append(proc)
        return proc.start()

    def spawn_python(
        self,
        *args: str | os.PathLike[str],
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        merge_stderr: bool = False,
    ) -> NodeProcess:
        """Start ``python <args>`` with this interpreter, unbuffered, ``cloister`` importable.

        E.g. ``spawn_python("-m", "cloister", "node", "--cluster", "shop", ...)`` or
        ``spawn_python("-c", code)``.
        """
        path = os.pathsep.join(p for p in (str(_SRC_DIR), os.environ.get("PYTHONPATH")) if p)
        python_env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **(env or {})}
        return self.spawn(
            [sys.executable, *args], name=name, env=python_env, cwd=cwd, merge_stderr=merge_stderr
        )

    def kill_all(self) -> None:
        """SIGKILL every child (and its process group)."""
        for proc in self.processes:
            proc.kill()

    def terminate_all(self, timeout: float = 10.0) -> None:
        """SIGTERM every running child at once, then wait (SIGKILL after ``timeout``)."""
        deadline = time.monotonic() + timeout
        for proc in self.processes:
            proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            proc._terminate(max(0.0, deadline - time.monotonic()), send_term=False)

    def stop(self) -> None:
        """Kill every child still running; nothing of this group survives. Idempotent."""
        left = [p for p in self.processes if p.is_running]
        if left:
            log.info("killing %d leftover process(es): %s", len(left), [p.name for p in left])
        self.kill_all()

    def _was_started(self) -> bool:
        return True

    def start(self) -> Self:
        """Nothing to start: children are started by :meth:`spawn`."""
        return self

    def __iter__(self) -> Iterator[NodeProcess]:
        return iter(list(self.processes))

    def __len__(self) -> int:
        return len(self.processes)

    def __getitem__(self, index: int) -> NodeProcess:
        return self.processes[index]
