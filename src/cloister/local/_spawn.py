"""Spawning and killing child processes without ever leaving one behind.

Every child gets its own session (so its own process group: a Ctrl-C in the terminal
does not reach it, and a SIGKILL to the group takes its own children along). On Linux it
is also started through a tiny launcher that asks the kernel to SIGKILL it when its parent
dies (``PR_SET_PDEATHSIG``), which covers a test runner that is itself killed. Children
still running when the interpreter exits are killed by an ``atexit`` hook.

Caveat of ``PR_SET_PDEATHSIG``: "the parent" is the *thread* that spawned the child. Spawn
from a thread that outlives the child (the main thread, or the event loop's thread), not
from a short-lived worker thread such as ``asyncio.to_thread``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

log = logging.getLogger("cloister.local")

_LAUNCHER = """\
import ctypes, os, sys
ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
if os.getppid() != int(sys.argv[1]):
    os._exit(70)  # the parent died before prctl took effect
os.execvp(sys.argv[2], sys.argv[2:])
"""

_LIVE: set[subprocess.Popen[bytes]] = set()
_LIVE_LOCK = threading.Lock()

StdStream = int | IO[bytes] | None


def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    stdout: StdStream,
    stderr: StdStream,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    die_with_parent: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session; it is registered for the ``atexit`` clean-up."""
    args = [os.fspath(a) for a in argv]
    if die_with_parent and sys.platform.startswith("linux"):
        args = [sys.executable, "-S", "-E", "-c", _LAUNCHER, str(os.getpid()), *args]
    proc = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        env=None if env is None else dict(env),
        cwd=cwd,
        start_new_session=True,
    )
    with _LIVE_LOCK:
        _LIVE.add(proc)
    return proc


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to the child's process group (its pid: it leads its own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _forget(proc: subprocess.Popen[bytes]) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(proc)


def stop(proc: subprocess.Popen[bytes], *, grace: float | None, send_term: bool = True) -> int:
    """Stop ``proc`` and everything in its process group; return its exit code.

    With ``grace=None`` the whole group is SIGKILLed at once. Otherwise the child gets
    SIGTERM (unless ``send_term`` is false: it was sent already) and ``grace`` seconds to
    exit before the group is SIGKILLed. Either way, any process left in the group
    afterwards (its own children) is SIGKILLed too.
    """
    if proc.poll() is None:
        if grace is None:
            _signal_group(proc, signal.SIGKILL)
        else:
            if send_term:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("pid %d ignored SIGTERM for %.1fs: sending SIGKILL", proc.pid, grace)
                _signal_group(proc, signal.SIGKILL)
    code = proc.wait()
    _signal_group(proc, signal.SIGKILL)  # its own children, if any are left
    _forget(proc)
    return code


def pid_alive(pid: int) -> bool:
    """Tell whether a process with this pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (not Linux): trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


@atexit.register
def _kill_leftovers() -> None:
    with _LIVE_LOCK:
        left = list(_LIVE)
    for proc in left:
        if proc.poll() is None:
            log.warning("killing leftover child pid %d at exit", proc.pid)
        _signal_group(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        _forget(proc)
