"""``cloister cast`` and ``cloister call``: send to a worker from a shell, as a client.

Both connect as a :class:`~cloister.client.Client` (never as a member: no record, no
epoch change) with the same cluster and connection flags and ``CLOISTER_*`` variables
as ``run``::

    cloister cast Processor foo_42 '{"qty": 1}' --msg-id order-17   # prints the msg id
    cloister call Processor foo_42 '"balance?"'                      # prints the reply

``MANAGER`` is the manager's name (its class's ``name``, else the class name); its
partition count is read from its inbox. ``ID`` is a string, or JSON with ``--json-id``
(``7``, ``["user", 7]`` for a tuple id). ``JSON`` is the message. The reply of ``call``
is printed as JSON. Exit codes as for every command: 1 when the cluster refused or did
not answer (unknown worker, timeout, ...), 2 for invalid input.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
from typing import Any

from cloister.cli.options import (
    EXIT_OK,
    UsageError,
    add_common,
    add_connection,
    add_target,
    connection_options,
    positive_float,
    resolve_target,
)
from cloister.client import Client


def add_parser(commands: Any) -> None:
    """Register ``cloister cast`` and ``cloister call``."""
    cast = commands.add_parser(
        "cast",
        help="store a message in a worker's durable inbox (from outside the cluster)",
        description="Append MESSAGE for worker ID of MANAGER to the manager's durable "
        "inbox, as a client (never a member), and print its message id once stored. "
        "A cast repeated with the same --msg-id within the dedup window is stored once.",
    )
    _arguments(cast)
    cast.add_argument(
        "--msg-id",
        metavar="ID",
        help="the message id (default: a generated one, printed); repeat it to retry safely",
    )
    cast.set_defaults(run=run_cast)
    call = commands.add_parser(
        "call",
        help="ask a worker (its handle_call) and print the reply as JSON",
        description="Send MESSAGE to the owner of worker ID of MANAGER, as a client "
        "(never a member), and print the worker's reply as JSON.",
    )
    _arguments(call)
    call.set_defaults(run=run_call)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manager", metavar="MANAGER", help="the manager's name")
    parser.add_argument("id", metavar="ID", help="the worker id (a string; see --json-id)")
    parser.add_argument("message", metavar="JSON", help="the message, as JSON")
    parser.add_argument(
        "--json-id", action="store_true", help="read ID as JSON (numbers, arrays for tuples)"
    )
    parser.add_argument(
        "--timeout", type=positive_float, default=None, metavar="S", help="give up after S s"
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=None,
        metavar="N",
        help="the manager's partition count (default: read from its inbox)",
    )
    add_target(parser)
    add_connection(parser)
    add_common(parser)


def run_cast(args: argparse.Namespace) -> int:
    """``cloister cast``: print the stored message's id."""
    client, worker_id, message = _prepare(args)

    async def cast() -> str:
        async with client:
            return await client.cast(
                args.manager, worker_id, message, args.msg_id, timeout=args.timeout
            )

    print(asyncio.run(cast()), flush=True)
    return EXIT_OK


def run_call(args: argparse.Namespace) -> int:
    """``cloister call``: print the reply as JSON."""
    client, worker_id, message = _prepare(args)

    async def call() -> Any:
        async with client:
            return await client.call(args.manager, worker_id, message, timeout=args.timeout)

    print(json.dumps(asyncio.run(call()), default=_jsonable, sort_keys=True), flush=True)
    return EXIT_OK


def _prepare(args: argparse.Namespace) -> tuple[Client, Any, Any]:
    backend, cluster = resolve_target(args)
    if backend.startswith("memory://"):
        raise UsageError(
            "a memory:// cluster lives inside one process; cast and call need a shared "
            "backend such as nats://host:port"
        )
    message = _json(args.message, "JSON")
    worker_id = _tuples(_json(args.id, "ID")) if args.json_id else args.id
    partitions = {} if args.partitions is None else {args.manager: args.partitions}
    client = Client(cluster, backend, partitions=partitions, **connection_options(args))
    return client, worker_id, message


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} is not valid JSON ({exc}): {text[:80]!r}") from None


def _tuples(value: Any) -> Any:
    """JSON arrays as tuples: the ring places tuple ids, not lists."""
    if isinstance(value, list):
        return tuple(_tuples(item) for item in value)
    return value


def _jsonable(value: Any) -> Any:
    """What a reply holds besides JSON types: bytes (as text, else base64), tuples."""
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return base64.b64encode(value).decode()
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON")
