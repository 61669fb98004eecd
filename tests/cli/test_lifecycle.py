"""A node's life as a container sees it: waiting for the medium, a capped drain on
SIGTERM, JSON logs. Real processes on a real nats-server."""

from __future__ import annotations

import json
import re
import signal
from datetime import datetime
from pathlib import Path

from cloister.testing import NatsServer, ProcessGroup, free_port, node_events, wait_for_event
from tests.cli.support import KEYS, cli_env, write_app

SLOW_APP = """
import os
import pathlib
import time

from cloister import DynamicManager, Ok, Replace

HERE = pathlib.Path(os.environ["SLOW_DIR"])


class Slow(DynamicManager):
    def children_specs(self):
        return {"sender": {"timeout": 0.2}, "slow": {"timeout": 0}}

    async def perform(self, id, payload):
        # One cast in the whole test, whichever node runs the sender first.
        if id == "sender" and not (HERE / "sent").exists():
            (HERE / "sent").write_text("1")
            await self.cast("slow", "order-1")
        return Ok(None)

    def handle_cast(self, message, id, payload):
        with open(HERE / "seen", "a") as seen:
            seen.write(f"{os.getpid()} {message}\\n")
        print("handling", message, flush=True)
        time.sleep(float(os.environ["HANDLER_SLEEP"]))
        return Replace(message)
"""


def _slow_node(group: ProcessGroup, server: NatsServer, folder: Path, name: str, sleep: float):
    return group.spawn_python(
        "-m",
        "cloister",
        "run",
        "slowapp:Slow",
        "--backend",
        server.url,
        "--cluster",
        "drain",
        "--name",
        name,
        "--shutdown-timeout",
        "3",
        cwd=folder,
        env=cli_env({"SLOW_DIR": str(folder), "HANDLER_SLEEP": str(sleep)}),
        name=name,
    )


def test_sigterm_with_a_20s_handler_exits_within_the_cap_and_loses_nothing(
    nats_server: NatsServer, node_processes: ProcessGroup, tmp_path: Path
) -> None:
    (tmp_path / "slowapp.py").write_text(SLOW_APP)
    first = _slow_node(node_processes, nats_server, tmp_path, "first", sleep=20)
    first.wait_for_line(r"^handling order-1$", timeout=30)
    first.send_signal(signal.SIGTERM)
    # The cap is 3 s; the handler would hold the exit 20 s. (A generous bound: under load
    # the interpreter's own exit takes a moment.)
    assert first.wait(12) == 0
    wait_for_event(first, r"^manager drain timed_out after=", timeout=1)
    wait_for_event(first, r"^node first pid=\d+ stopped ", timeout=1)

    # The message was never acknowledged: it is still stored, and the next owner gets it.
    second = _slow_node(node_processes, nats_server, tmp_path, "second", sleep=0)
    second.wait_for_line(r"^handling order-1$", timeout=30)
    seen = (tmp_path / "seen").read_text().split("\n")
    assert [line.split()[1] for line in seen if line] == ["order-1", "order-1"]
    assert second.terminate() == 0


def test_a_node_waits_for_the_medium_then_joins(
    node_processes: ProcessGroup, tmp_path: Path
) -> None:
    port = free_port()
    node = node_processes.spawn_python(
        "-m",
        "cloister",
        "node",
        "--backend",
        f"nats://127.0.0.1:{port}",
        "--cluster",
        "late",
        env=cli_env({"CLOISTER_CONNECT_TIMEOUT": "60"}),
    )
    name = wait_for_event(node, r"^node (\S+) pid=\d+ waiting attempt=2 retry_in=", timeout=20)[1]
    assert node.is_running
    server = NatsServer(port=port)
    server.start()
    try:
        # A generated name stays the same from one attempt to the next.
        wait_for_event(node, rf"^state rehashing -> ready epoch=1 members={name} ", timeout=30)
        assert node.terminate() == 0
    finally:
        server.stop()
    assert {event.words[0] for event in node_events(node, "node")} == {name}
    warnings = [line.text for line in node.lines if line.stream == "stderr"]
    assert any("cannot join yet" in line and "retrying in" in line for line in warnings)


def test_json_logs_parse_line_by_line(
    nats_server: NatsServer, node_processes: ProcessGroup, tmp_path: Path
) -> None:
    write_app(tmp_path)
    node = node_processes.spawn_python(
        "-m",
        "cloister",
        "run",
        "shopapp:Shop",
        "--backend",
        nats_server.url,
        "--cluster",
        "logged",
        "--name",
        "j",
        "--log-format",
        "json",
        cwd=tmp_path,
        env=cli_env(),
    )
    node.wait_for_line(r'"message": "manager up workers=', timeout=20)
    assert node.terminate() == 0
    records = []
    for line in node.lines:
        assert line.stream == "stderr", f"JSON mode writes one stream: {line}"
        records.append(json.loads(line.text))
    for record in records:
        assert {"ts", "level", "logger", "message"} <= set(record), record
        datetime.fromisoformat(record["ts"])  # ISO-8601, wall clock
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", record["ts"])
    joined = [r for r in records if r["logger"] == "cloister.cluster" and "joined" in r["message"]]
    assert joined and joined[0]["node"] == "j" and joined[0]["cluster"] == "logged"
    events = {r["event"]: r for r in records if "event" in r}
    assert {"node", "state", "epoch", "sentry", "suspended", "manager"} <= set(events)
    ready = next(r for r in records if r.get("event") == "state" and "-> ready" in r["message"])
    assert ready["epoch"] == 1 and ready["members"] == "j" and ready["level"] == "info"
    up = next(r for r in records if r.get("event") == "manager" and "workers" in r)
    assert up["workers"] == KEYS and up["epoch"] == 1
    assert any(r["message"].startswith("SIGTERM") for r in records)
