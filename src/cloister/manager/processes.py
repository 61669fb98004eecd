"""``executor="process"``: sync callbacks in child processes, for CPU-bound work.

Threads keep the event loop free of a callback that *waits*; one that *computes* in pure
Python still holds the GIL and slows everything else in its process. With
``executor="process"`` each pool thread (see :mod:`.executor`) owns one child process and
sends it its callbacks: the thread waits on a pipe (no GIL held) while the child computes
on its own CPU.

The wire between them is the project's msgpack (:mod:`cloister.wire`) — nothing is
pickled: a child imports the manager's class by name (it must be importable: defined at
module level), builds a fresh standalone instance, and answers ``[callback, args]``
frames with the response encoded by :func:`encode_response`. So a callback in a child sees
its arguments (message, id, payload), not the parent's instance attributes, and its
payloads and messages must be wire values (as a durable manager's already are).

A child that is inside an abandoned callback (``on_handler_timeout="abandon"``) is killed
— unlike a thread, a process can be stopped — and the next callback starts a fresh one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from cloister import wire
from cloister.errors import ConfigurationError, RemoteError, WireFormatError
from cloister.manager.responses import Halt, Ok, Replace, Timeout

log = logging.getLogger("cloister.manager.processes")

_FRAME = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024  # as the wire's own limit
START_TIMEOUT = 30.0  # seconds a child may take to import the manager's module
PATH_VARIABLE = "CLOISTER_CHILD_PATH"  # the parent's sys.path, so the child finds the app


# -- responses across the pipe ----------------------------------------------------------------


def encode_response(response: Any) -> list[Any]:
    """A callback's response as a wire value (the child's side)."""
    if isinstance(response, Ok):
        return ["ok", response.result]
    if isinstance(response, Replace):
        return (
            ["rekey", response.payload, response.id]
            if response.rekeys
            else [
                "replace",
                response.payload,
            ]
        )
    if isinstance(response, Halt):
        return ["halt", response.reason]
    if isinstance(response, Timeout):
        if response.permanent:
            return ["period", response.seconds, response.result]
        return ["timeout", response.seconds, response.result]
    return ["value", response]


def decode_response(value: Any) -> Any:
    """The response a child sent, checked (the parent's side)."""
    if not isinstance(value, list) or not value or not isinstance(value[0], str):
        raise WireFormatError("child response: expected [kind, ...]")
    kind, rest = value[0], value[1:]
    shapes = {"ok": 1, "replace": 1, "rekey": 2, "halt": 1, "timeout": 2, "period": 2, "value": 1}
    if shapes.get(kind) != len(rest):
        raise WireFormatError(f"child response: unknown or malformed kind {kind!r}")
    if kind == "ok":
        return Ok(rest[0])
    if kind == "replace":
        return Replace(rest[0])
    if kind == "rekey":
        return Replace(rest[0], id=rest[1])
    if kind == "halt":
        if not isinstance(rest[0], str):
            raise WireFormatError("child response: a halt reason is a str")
        return Halt(rest[0])
    if kind in ("timeout", "period"):
        try:
            return Timeout(rest[0], rest[1], permanent=kind == "period")
        except (TypeError, ValueError) as exc:
            raise WireFormatError(f"child response: {exc}") from None
    return rest[0]


def write_frame(stream: IO[bytes], value: Any) -> None:
    """Write one length-prefixed msgpack frame."""
    data = wire.encode(value)
    stream.write(_FRAME.pack(len(data)) + data)
    stream.flush()


def read_frame(stream: IO[bytes]) -> Any:
    """Read one frame; EOFError when the other side is gone."""
    head = stream.read(_FRAME.size)
    if len(head) < _FRAME.size:
        raise EOFError("the other side of the pipe is gone")
    (size,) = _FRAME.unpack(head)
    if size > MAX_FRAME:
        raise WireFormatError(f"frame of {size} bytes exceeds the {MAX_FRAME} limit")
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the other side of the pipe is gone")
    return wire.decode(data)


# -- the parent's side ------------------------------------------------------------------------


def class_path(cls: type) -> str:
    """``module:qualname`` of a manager class a child can import; ConfigurationError if
    it cannot be (defined inside a function, or in ``__main__`` run as a script)."""
    module, qualname = cls.__module__, cls.__qualname__
    if "<locals>" in qualname:
        raise ConfigurationError(
            f"executor='process' needs a manager class a child process can import; "
            f"{qualname} is defined inside a function: move it to module level"
        )
    if module == "__main__":
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        if spec is None or not spec.name:
            raise ConfigurationError(
                f"executor='process': {qualname} lives in a script run as __main__; put it "
                "in a module (or run the script with python -m)"
            )
        module = spec.name
    return f"{module}:{qualname}"


class Child:
    """One child process and its pipes."""

    def __init__(self, target: str) -> None:
        env = dict(os.environ)
        env[PATH_VARIABLE] = json.dumps([p for p in sys.path if isinstance(p, str)])
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cloister.manager._child", target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self._in, self._out = self.process.stdin, self.process.stdout
        self.busy_since = 0.0  # time.monotonic() of the call under way; 0.0 = idle
        hello = read_frame(self._out)
        if hello != ["ready"]:
            self.kill()
            raise ConfigurationError(f"executor='process': the child could not start: {hello}")

    def call(self, callback: str, args: tuple[Any, ...]) -> Any:
        """Run ``callback(*args)`` in the child; its response, or what it raised."""
        self.busy_since = time.monotonic()
        try:
            write_frame(self._in, [callback, list(args)])
            answer = read_frame(self._out)
        finally:
            self.busy_since = 0.0
        if not isinstance(answer, list) or len(answer) != 2 or answer[0] not in ("ok", "raised"):
            raise WireFormatError("child answer: expected ['ok' | 'raised', value]")
        if answer[0] == "raised":
            raise RemoteError(f"{callback} raised in its child process: {answer[1]}")
        return decode_response(answer[1])

    def kill(self) -> None:
        """Stop the child at once (it may be inside a runaway callback)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self._in, self._out):
            with contextlib.suppress(OSError):  # a broken pipe to a child that is gone
                stream.close()


class ProcessCalls:
    """The callbacks of one manager, run in child processes: one child per pool thread."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._local = threading.local()
        self._children: set[Child] = set()
        self._lock = threading.Lock()
        self._closed = False

    def callback(self, name: str) -> Callable[..., Any]:
        """A sync callable that runs the manager's callback ``name`` in this thread's child."""

        def call_in_child(*args: Any) -> Any:
            return self._call(name, args)

        call_in_child.__name__ = call_in_child.__qualname__ = name
        return call_in_child

    def _call(self, name: str, args: tuple[Any, ...]) -> Any:
        child: Child | None = getattr(self._local, "child", None)
        if child is None or child.process.poll() is not None:
            if self._closed:
                raise RuntimeError("the manager's child processes were stopped")
            child = self._local.child = Child(self.target)
            with self._lock:
                self._children.add(child)
        try:
            return child.call(name, args)
        except (EOFError, OSError) as exc:
            # Killed (abandoned, or the system's OOM killer): the next call starts afresh.
            with self._lock:
                self._children.discard(child)
            self._local.child = None
            code = child.process.wait()
            raise RemoteError(f"the child process running {name} ended (exit {code})") from exc

    def kill_overdue(self, seconds: float | None) -> int:
        """Kill the children inside a callback for ``seconds`` or more; how many."""
        if seconds is None:
            return 0
        now = time.monotonic()
        with self._lock:
            overdue = [c for c in self._children if c.busy_since and now - c.busy_since >= seconds]
        for child in overdue:
            log.warning(
                "killing child process %d: its callback ran past the handler_timeout",
                child.process.pid,
            )
            if child.process.poll() is None:
                child.process.kill()
        return len(overdue)

    def close(self) -> None:
        """Stop every child."""
        self._closed = True
        with self._lock:
            children, self._children = self._children, set()
        for child in children:
            child.kill()
