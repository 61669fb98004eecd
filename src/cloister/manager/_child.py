"""A child process of ``executor="process"``: ``python -m cloister.manager._child
module:Class``. It imports the manager class, builds one standalone instance and answers
``[callback, args]`` frames on stdin with ``["ok", response]`` or ``["raised", text]`` on
stdout (see :mod:`cloister.manager.processes`)."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import signal
import sys
import traceback
from typing import Any

from cloister.manager.processes import PATH_VARIABLE, encode_response, read_frame, write_frame

_CALLBACKS = ("perform", "handle_call", "handle_cast")


def _load(target: str) -> Any:
    module_name, _, qualname = target.partition(":")
    value: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        value = getattr(value, part)
    return value()  # standalone: no cluster, nothing started


def main() -> int:
    """Serve callbacks until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    for path in reversed(json.loads(os.environ.get(PATH_VARIABLE, "[]"))):
        if path not in sys.path:
            sys.path.insert(0, path)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a print() in a callback must not corrupt the frames
    try:
        manager = _load(sys.argv[1])
    except Exception as exc:
        write_frame(stdout, [f"cannot load {sys.argv[1]}: {exc!r}"])
        return 1
    write_frame(stdout, ["ready"])
    while True:
        try:
            request = read_frame(stdin)
        except EOFError:
            return 0
        if (
            not isinstance(request, list)
            or len(request) != 2
            or request[0] not in _CALLBACKS
            or not isinstance(request[1], list)
        ):
            write_frame(stdout, ["raised", f"malformed request {request!r:.200}"])
            continue
        name, args = request
        try:
            result = getattr(manager, name)(*args)
            if asyncio.iscoroutine(result):
                result = asyncio.run(result)
            write_frame(stdout, ["ok", encode_response(result)])
        except Exception as exc:
            text = "".join(traceback.format_exception_only(exc)).strip()
            print(traceback.format_exc(), file=sys.stderr, flush=True)
            write_frame(stdout, ["raised", text])


if __name__ == "__main__":
    raise SystemExit(main())
