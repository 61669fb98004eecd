"""``cloister run APP``: run your ``DynamicManager`` as one node of a cluster.

``APP`` names the manager class: ``package.module:Class`` (imported with the current
directory on ``sys.path``) or ``path/to/file.py:Class``. The node joins the cluster, starts
``await Class.start(cluster)`` and runs until SIGTERM or SIGINT; then the manager hands
its workers over (``await manager.stop()``) and the node leaves (``await
cluster.stop()``): exit 0, within ``--shutdown-timeout`` seconds (a handler still running
then is abandoned: its message stays in the inbox for the key's next owner, and nothing
acknowledged is lost). At startup the medium is tried for up to ``--connect-timeout``
seconds, with backoff. Every option also comes from the environment (``CLOISTER_APP``,
``CLOISTER_BACKEND``, ...) or a config file; ``--print-config`` shows them all and where
each came from (see :mod:`cloister.cli.options`), as container deployments expect.

Output: stdout is the application's own (what its handlers print); everything of the
node goes to stderr as log records in one format, with wall-clock timestamps (text, or
JSON lines with ``--log-format json``; see :mod:`cloister.cli.logs`): INFO logs (one line
per topology change) and the events of ``cloister node`` (see :mod:`cloister.cli.node`)
plus ``manager ...`` events. The node answers ``cloister.manager.status`` (live workers,
counters, inbox depth) for ``cloister status``; ``--metrics-port`` serves Prometheus
metrics (:mod:`cloister.metrics`) and the probes ``/healthz`` and ``/readyz``
(:mod:`cloister.health`), ``--health-port`` the probes alone.

Exit codes: 0 after a graceful leave; 1 when the backend is unreachable or the
application fails (to import or to start); 2 when ``APP`` names no such module, file or
attribute, or not a ``DynamicManager`` subclass.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib
import importlib.util
import inspect
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

from cloister.cli.node import (
    CONFIG_EPILOG,
    Node,
    NodeEvents,
    ServeOptions,
    add_node_options,
    make_cluster,
    print_config,
    retry_transient,
    serve,
)
from cloister.cli.options import (
    UsageError,
    add_common,
    add_connection,
    add_settings,
    add_target,
    required,
)
from cloister.cluster import Cluster, SuspendReason, Topology
from cloister.errors import CloisterError
from cloister.manager import DynamicManager
from cloister.observer import MANAGER_STATUS_HANDLER, ManagerStatus

log = logging.getLogger("cloister.cli")

_STATUS_DEPTH_TIMEOUT = 1.0


class AppError(CloisterError):
    """The application failed: its module raised on import, or ``start`` raised (exit 1)."""


def add_parser(commands: Any) -> None:
    """Register ``cloister run``."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "run",
        help="run your DynamicManager (module:Class) as one node of a cluster",
        description="Run APP, a DynamicManager subclass given as module:Class or "
        "path/to/file.py:Class, as one node of a cluster until SIGTERM or SIGINT; then hand "
        "its workers over and leave gracefully (exit 0). Logs (on stderr) the events of "
        "`cloister node` plus `manager ...` events, and topology changes, at INFO. Exit 2 if "
        "APP cannot be found, 1 if the backend is unreachable or the application fails.",
        epilog=CONFIG_EPILOG,
    )
    add_app_argument(parser)
    add_target(parser)
    add_node_options(parser)
    add_connection(parser)
    add_common(parser)
    parser.set_defaults(run=run, default_log_level="info")


def add_app_argument(parser: argparse.ArgumentParser) -> None:
    """The ``APP`` positional (``run`` and ``dev``); read it with :func:`app_spec`."""
    add_settings(parser, ("app",))


def app_spec(args: argparse.Namespace) -> str:
    """``APP`` as resolved (command line, ``$CLOISTER_APP``, config file); a
    :class:`UsageError` if none gives it."""
    return str(required(args, "app"))


def run(args: argparse.Namespace) -> int:
    """Load APP, build the node from the resolved settings, run until a signal."""
    if args.print_config:
        return print_config(args)
    spec = app_spec(args)
    app = load_app(spec)
    events = NodeEvents()
    # Join the manager's group: its workers are placed only on nodes that run it.
    build = make_cluster(args, events, extra_groups=(app.placement_group(),))
    attach = functools.partial(_run_manager, app, spec)
    return asyncio.run(serve(build, events, attach=attach, options=ServeOptions.from_args(args)))


# -- loading the application ------------------------------------------------------------------


def load_app(spec: str) -> type[DynamicManager]:
    """The ``DynamicManager`` subclass ``spec`` (``module:Class`` or ``file.py:Class``) names.

    Raises:
        UsageError: no such module, file or attribute, or not a DynamicManager subclass.
        AppError: the module itself raised while being imported.
    """
    target, _, attr = spec.strip().rpartition(":")
    if not target or not attr:
        raise UsageError(
            f"APP {spec!r}: expected module:Class or path/to/file.py:Class, e.g. myapp:Processor"
        )
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    module = _import_file(spec, target) if is_file else _import_module(spec, target)
    found: Any = module
    for part in attr.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise UsageError(
                f"APP {spec!r}: {module.__name__} has no attribute {attr!r}{_candidates(module)}"
            ) from None
    if not (isinstance(found, type) and issubclass(found, DynamicManager)):
        raise UsageError(
            f"APP {spec!r}: {attr} is {_describe(found)}, not a DynamicManager subclass"
            f"{_candidates(module)}"
        )
    return found


def _import_module(spec: str, name: str) -> ModuleType:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # as `python -m` does: the project's own modules come first
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (name == missing or name.startswith(missing + ".")):
            raise UsageError(
                f"APP {spec!r}: no module named {missing!r} (looked in {cwd} and sys.path)"
            ) from None
        raise _import_failed(name, exc) from exc
    except Exception as exc:
        raise _import_failed(name, exc) from exc


def _import_file(spec: str, target: str) -> ModuleType:
    path = Path(target)
    if not path.is_file():
        raise UsageError(f"APP {spec!r}: no such file {target!r} (from {os.getcwd()})")
    stem = path.stem
    name = stem if stem.isidentifier() and stem not in sys.modules else f"_cloister_app_{id(path)}"
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # so that the file can import its neighbours
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise UsageError(f"APP {spec!r}: {target!r} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # dataclasses, pickle and friends look modules up by name
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise _import_failed(target, exc) from exc
    return module


def _import_failed(what: str, exc: Exception) -> AppError:
    return AppError(
        f"importing {what!r} failed: {type(exc).__name__}: {exc} "
        "(rerun with --debug for the traceback)"
    )


def _candidates(module: ModuleType) -> str:
    names = sorted(
        name
        for name, value in vars(module).items()
        if isinstance(value, type)
        and issubclass(value, DynamicManager)
        and value is not DynamicManager
    )
    return f" (DynamicManager subclasses there: {', '.join(names)})" if names else ""


def _describe(value: Any) -> str:
    if isinstance(value, type):
        return f"the class {value.__qualname__}"
    if isinstance(value, ModuleType):
        return f"the module {value.__name__}"
    if inspect.isroutine(value):
        return f"the function {getattr(value, '__qualname__', value)!r}"
    return f"a {type(value).__name__}"


# -- running it -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _run_manager(app: type[DynamicManager], spec: str, node: Node) -> AsyncIterator[None]:
    """Start ``app`` on the joined node; on the way out hand everything over and stop it,
    within the node's shutdown timeout."""
    cluster, events = node.cluster, node.events
    try:
        # Right after a NATS cluster forms, creating the manager's streams can be refused
        # for a moment ("no suitable peers"): retried within --connect-timeout.
        manager = await retry_transient(
            lambda: app.start(cluster), node.retry_until, f"starting {spec}"
        )
    except CloisterError:
        raise
    except Exception as exc:
        raise AppError(
            f"{spec} failed to start: {type(exc).__name__}: {exc} "
            "(rerun with --debug for the traceback)"
        ) from exc
    events.emit(f"manager {manager.manager_name} started class={spec.replace(' ', '')}")
    report = _WorkersReport(manager, events)
    cluster.add_hook(report)
    if manager.state == "up":  # settled inside start(): the hook missed it
        events.emit(f"manager up workers={len(manager)} epoch={cluster.epoch}")
    cluster.register_handler(MANAGER_STATUS_HANDLER, _status_handler(manager), internal=True)
    if node.metrics is not None:
        node.metrics.attach(manager)
    elif node.health is not None:
        node.health.attach(manager)
    try:
        yield
    except asyncio.CancelledError:
        raise  # a second signal: stop now, without handing over
    except BaseException:
        await _stop_manager(manager, cluster, report)
        raise
    finally:
        if node.health is not None:
            node.health.detach(manager)  # stopping: not ready any more
    budget = (
        None if node.drain is None else node.drain.remaining(keep=node.drain.keep_for_leaving())
    )
    began = time.monotonic()
    try:
        handed = await asyncio.wait_for(_stop_manager(manager, cluster, report), budget)
    except TimeoutError:
        log.warning(
            "manager %s did not hand over within --shutdown-timeout (%.1fs): the node "
            "leaves now; messages not handled stay in the inbox for the keys' next owner",
            manager.manager_name,
            time.monotonic() - began,
        )
        events.emit(f"manager drain timed_out after={time.monotonic() - began:.2f}")
        return
    events.emit(f"manager stopped handed_off={handed}")


async def _stop_manager(manager: DynamicManager, cluster: Cluster, report: _WorkersReport) -> int:
    """Hand every worker over and stop; how many workers were handed over now."""
    report.closed = True  # a settle under way must not print "manager up" any more
    cluster.remove_hook(report)
    before = manager.counters.handed_off
    await manager.stop()
    return manager.counters.handed_off - before


def _status_handler(manager: DynamicManager) -> Any:
    async def status(payload: Any) -> dict[str, Any]:
        # The backlog asks the medium about every owned partition: skipped when the asker
        # says so ({"depth": False}), as a poll of the counters does.
        wanted = not (isinstance(payload, dict) and payload.get("depth") is False)
        depth: int | None = None
        try:
            if wanted:
                depth = await asyncio.wait_for(
                    manager.inbox_depth(owned=True), timeout=_STATUS_DEPTH_TIMEOUT
                )
        except (CloisterError, TimeoutError):
            depth = None  # no inbox (standalone, durable=False), or the backend is slow
        return ManagerStatus(
            manager=manager.manager_name,
            state=str(manager.state),
            workers=len(manager),
            counters=manager.counters.as_dict(),
            inbox_depth=depth,
        ).to_wire()

    return status


class _WorkersReport:
    """A topology hook added after the manager's: ``manager up workers=<n>`` per settle."""

    def __init__(self, manager: DynamicManager, events: NodeEvents) -> None:
        self.manager = manager
        self.events = events
        self.closed = False

    async def release(self, topology: Topology) -> None:
        """Nothing: the manager reports its handoffs itself."""

    async def settle(self, topology: Topology) -> None:
        if self.manager.state == "up" and not self.closed:
            self.events.emit(f"manager up workers={len(self.manager)} epoch={topology.epoch}")

    async def suspend(self, reason: SuspendReason) -> None:
        """Nothing: the node prints ``suspended``."""
