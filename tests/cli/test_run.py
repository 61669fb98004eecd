"""``cloister run APP`` as a user runs it: a real local NATS, real node processes."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from cloister.observer import ManagerStatus, Observer
from cloister.testing import (
    NatsServer,
    ProcessGroup,
    events_in_output,
    free_port,
    node_events,
    wait_for_event,
)
from tests.cli.support import KEYS, assert_one_line_error, cli_env, cloister, write_app

# Never go through an HTTP proxy to reach a loopback port.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _status(server: NatsServer, cluster: str) -> tuple[int, dict[str, dict[str, object]]]:
    result = cloister("status", "--json", "--backend", server.url, "--cluster", cluster)
    if result.returncode != 0:
        return result.returncode, {}
    return 0, {m["node"]: m for m in json.loads(result.stdout)["members"]}


async def _manager_statuses(url: str, cluster: str, node: str) -> list[ManagerStatus]:
    """``node``'s manager status, with its inbox depth and without."""
    async with Observer(cluster, backend=url) as observer:
        answers = [await observer.manager_status(node, depth=depth) for depth in (True, False)]
    assert None not in answers, answers
    return [answer for answer in answers if answer is not None]


def _scrape(port: int) -> str:
    with _HTTP.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
    return text


def _value(metrics: str, name: str, **labels: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels} in:\n{metrics}")


def test_run_serves_status_and_metrics_then_leaves_on_sigterm(
    nats_server: NatsServer, node_processes: ProcessGroup, tmp_path: Path
) -> None:
    write_app(tmp_path)
    port = free_port()
    node = node_processes.spawn_python(
        "-m",
        "cloister",
        "run",
        "shopapp:Shop",
        "--backend",
        nats_server.url,
        "--cluster",
        "shop",
        "--name",
        "a",
        "--metrics-port",
        str(port),
        cwd=tmp_path,
        env=cli_env(),
    )
    found = wait_for_event(node, r"^manager up workers=(\d+) epoch=1 ", timeout=20)
    assert int(found.group(1)) == KEYS  # alone: it owns every key
    wait_for_event(node, r"^manager Shop started class=shopapp:Shop ")
    # INFO logs by default: one line per topology change.
    node.wait_for_line(r"INFO cloister\.cluster: node a adopted epoch 1", stream="stderr")

    code, members = _status(nats_server, "shop")
    assert code == 0 and list(members) == ["a"]
    member = members["a"]
    assert member["state"] == "ready" and member["workers"] == KEYS
    assert member["inbox_depth"] == 0
    manager = member["manager"]
    assert isinstance(manager, dict) and manager["manager"] == "Shop" and manager["state"] == "up"
    with_depth, without = asyncio.run(_manager_statuses(nats_server.url, "shop", "a"))
    assert with_depth.inbox_depth == 0 and without.inbox_depth is None  # a cheap poll
    assert without.workers == KEYS and without.counters.keys() == with_depth.counters.keys()

    metrics = _scrape(port)
    assert _value(metrics, "cloister_node_state", node="a", state="ready") == 1.0
    assert _value(metrics, "cloister_node_state", node="a", state="rehashing") == 0.0
    assert _value(metrics, "cloister_epoch", cluster="shop", node="a") == 1.0
    assert _value(metrics, "cloister_members", node="a") == 1.0
    assert _value(metrics, "cloister_manager_workers", manager="Shop") == KEYS
    assert _value(metrics, "cloister_manager_performs_total", manager="Shop") >= 0
    assert _value(metrics, "cloister_rehash_seconds_count", node="a") == 1.0  # to ready once
    assert 0 < _value(metrics, "cloister_last_rehash_seconds", node="a") < 10
    for name in ("handed_off", "taken_over", "duplicates", "retries", "dead_letters", "errors"):
        assert f"cloister_manager_{name}_total{{" in metrics

    assert node.terminate() == 0
    wait_for_event(node, r"^manager stopped handed_off=0 ")
    wait_for_event(node, r"^node a pid=\d+ stopped ")
    code, _ = _status(nats_server, "shop")
    assert code == 1  # it left at once: no member record remains


ECHO_APP = """
from cloister import DynamicManager, Ok, Replace


class Echo(DynamicManager):
    def children_specs(self):
        return {"k": {}}

    def perform(self, id, payload):
        return Ok(None)

    def handle_cast(self, message, id, payload):
        print(f"app handled {id} {message}", flush=True)
        return Replace(payload)
"""

_LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00 (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
    r"cloister(\.\w+)*: \S"
)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_stdout_is_the_apps_and_stderr_one_log_format(
    log_format: str, nats_server: NatsServer, node_processes: ProcessGroup, tmp_path: Path
) -> None:
    (tmp_path / "echoapp.py").write_text(ECHO_APP)
    target = ("--backend", nats_server.url, "--cluster", f"echo-{log_format}")
    node = node_processes.spawn_python(
        "-m", "cloister", "run", "echoapp:Echo", *target, "--name", "e",
        "--log-format", log_format, cwd=tmp_path, env=cli_env(),
    )  # fmt: skip
    wait_for_event(node, r"^manager up workers=1 ", timeout=20)
    sent = cloister("cast", "Echo", "k", '"hello"', *target)
    assert sent.returncode == 0 and sent.stderr == "", sent
    assert len(sent.stdout.split()) == 1  # cast's output is its product: the message id
    node.wait_for_line(r"^app handled k hello$", stream="stdout", timeout=20)
    assert node.terminate() == 0

    out = [line.text for line in node.lines if line.stream == "stdout"]
    assert out == ["app handled k hello"], out  # nothing of the node's own on stdout
    err = [line.text for line in node.lines if line.stream == "stderr"]
    for line in err:
        if log_format == "json":
            record = json.loads(line)
            assert record["logger"].startswith("cloister"), record
        else:
            assert _LOG_LINE.match(line), f"not a timestamped log line: {line!r}"
    kinds = {event.kind for event in node_events(node)}
    assert {"node", "state", "epoch", "manager"} <= kinds, err


def test_run_reads_the_environment_next_to_a_bare_node(
    nats_server: NatsServer, node_processes: ProcessGroup, tmp_path: Path
) -> None:
    (tmp_path / "apps").mkdir()
    app = write_app(tmp_path / "apps")
    env = cli_env(
        {
            "CLOISTER_APP": f"{app}:Shop",  # the path form
            "CLOISTER_BACKEND": nats_server.url,
            "CLOISTER_CLUSTER": "mixed",
            "CLOISTER_NODE": "worker",
        }
    )
    runner = node_processes.spawn_python("-m", "cloister", "run", env=env, name="runner")
    bare = node_processes.spawn_python(
        "-m", "cloister", "node", "--name", "bare", env=env, name="bare"
    )
    wait_for_event(runner, r"^manager up workers=\d+ epoch=\d+ .*", timeout=20)
    wait_for_event(bare, r"^state \S+ -> ready epoch=\d+ members=bare,worker ", timeout=20)
    wait_for_event(runner, r"^state \S+ -> ready epoch=\d+ members=bare,worker ", timeout=20)
    code, members = _status(nats_server, "mixed")
    assert code == 0 and sorted(members) == ["bare", "worker"]
    assert members["bare"]["workers"] is None and members["bare"]["manager"] is None
    assert isinstance(members["worker"]["workers"], int)
    table = cloister("status", env=env)
    assert table.returncode == 0 and "workers" in table.stdout and "inbox" in table.stdout
    row = next(line for line in table.stdout.splitlines() if line.startswith("bare "))
    assert re.search(r"\s-\s+-\s*$", row), row  # no manager: "-" for workers and inbox
    runner.send_signal(signal.SIGINT)
    assert runner.wait(15) == 0
    assert bare.terminate() == 0


@pytest.mark.parametrize(
    ("app", "words"),
    [
        ("nosuchmodule:Shop", ["no module named 'nosuchmodule'"]),
        ("shopapp:Nope", ["has no attribute 'Nope'", "subclasses there: Broken, Shop"]),
        ("shopapp:helper", ["function", "not a DynamicManager subclass"]),
        ("shopapp", ["expected module:Class"]),
        ("missing.py:Shop", ["no such file 'missing.py'"]),
    ],
)
def test_a_wrong_app_is_a_one_line_usage_error(app: str, words: list[str], tmp_path: Path) -> None:
    write_app(tmp_path)
    result = cloister("run", app, "--cluster", "s", "--backend", "nats://x:1", cwd=tmp_path)
    assert result.returncode == 2, result
    assert_one_line_error(result, "cloister run: error:", *words)


def test_an_app_that_fails_is_a_one_line_failure(nats_server: NatsServer, tmp_path: Path) -> None:
    write_app(tmp_path)
    (tmp_path / "badimport.py").write_text("raise ImportError('the app is broken')\n")
    result = cloister("run", "badimport:X", "--cluster", "s", "--backend", "x://", cwd=tmp_path)
    assert result.returncode == 1, result
    assert_one_line_error(result, "importing 'badimport' failed", "the app is broken")
    target = ("--cluster", "broken", "--backend", nats_server.url)
    result = cloister("run", "shopapp:Broken", *target, cwd=tmp_path)
    assert result.returncode == 1, result
    started = [e for e in events_in_output(result) if e.kind == "node" and "started" in e.words]
    assert started and started[0].fields["cluster"] == "broken", result.stderr
    # The node tries to leave on its way out; a warning may say it could not (then its
    # record expires), but the failure itself is one line, without a traceback.
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("cloister run: error: shopapp:Broken failed to start"), last
    assert "RuntimeError: no specs today" in last


def test_run_on_an_unreachable_backend_fails_with_one_line(tmp_path: Path) -> None:
    app = write_app(tmp_path)
    url = f"nats://127.0.0.1:{free_port()}"
    result = cloister(
        "run",
        f"{app}:Shop",
        "--cluster",
        "shop",
        "--backend",
        url,
        "--connect-timeout",
        "0",
        timeout=30,
    )
    assert result.returncode == 1, result
    assert_one_line_error(result, "cloister run: error:")


def test_metrics_port_without_prometheus_client_says_what_to_install(tmp_path: Path) -> None:
    app = write_app(tmp_path)
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "from cloister.cli import main\n"
        f"sys.exit(main(['run', {str(app) + ':Shop'!r}, '--cluster', 's', "
        "'--backend', 'nats://127.0.0.1:1', '--metrics-port', '0']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result
    assert_one_line_error(result, "--metrics-port", "prometheus_client", "pycloister[metrics]")
