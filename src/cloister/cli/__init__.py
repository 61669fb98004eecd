"""The ``cloister`` command line: one entry point, one subcommand per job.

Each subcommand lives in its own module (:mod:`.run`, :mod:`.dev`, :mod:`.node`,
:mod:`.status`, :mod:`.client` (``cast``, ``call``), :mod:`.demo`, :mod:`.bench`) that
adds its parser and names the function that runs it; this module builds the parser, sets
up logging and turns failures into exit codes scripts can trust:

- ``0``: done;
- ``1``: runtime failure (backend unreachable, refused credentials, no members, ...);
- ``2``: usage error (unknown option, invalid value, bad backend URL);
- ``130``: interrupted by Ctrl-C before a clean stop.

A failure prints one line to stderr, ``cloister <command>: error: <what to do>``; the
traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import traceback
from collections.abc import Sequence

from cloister import __version__
from cloister.cli import bench, client, demo, dev, node, run, status
from cloister.cli.logs import configure_logging
from cloister.cli.options import (
    EXIT_FAILURE,
    EXIT_USAGE,
    UsageError,
    add_common,
    log_level,
    resolve,
)
from cloister.errors import CloisterError, ConfigurationError

__all__ = ["main"]

EXIT_INTERRUPTED = 130
_COMMANDS = (run, dev, node, status, client, demo, bench)


def build_parser() -> argparse.ArgumentParser:
    """The ``cloister`` parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="cloister",
        description="pycloister: keyed workers split over a cluster by a consistent hash ring.",
        epilog="Run `cloister COMMAND --help` for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_common(parser, top_level=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _COMMANDS:
        module.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with argparse's message on a usage error
    prog = f"cloister {args.command}"
    try:
        resolve(args)  # the environment and the config file fill in what flags left out
    except UsageError as exc:
        configure_logging("warning")
        return _fail(prog, exc, EXIT_USAGE, bool(args.debug))
    configure_logging(log_level(args), args.log_format)
    try:
        code: int = args.run(args)
        return code
    except UsageError as exc:
        return _fail(prog, exc, EXIT_USAGE, args.debug)
    except ConfigurationError as exc:
        return _fail(prog, exc, EXIT_USAGE, args.debug)
    except (CloisterError, OSError, TimeoutError) as exc:
        return _fail(prog, exc, EXIT_FAILURE, args.debug)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except asyncio.CancelledError:
        print(f"{prog}: stopped before a clean exit", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # a bug: still one line, the traceback with --debug
        return _fail(
            prog,
            f"internal error {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
            EXIT_FAILURE,
            args.debug,
        )


def _fail(prog: str, problem: BaseException | str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    message = " ".join(str(problem).split()) or type(problem).__name__
    if isinstance(problem, OSError | TimeoutError) and not isinstance(problem, CloisterError):
        message = f"{type(problem).__name__}: {message}"
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return code
