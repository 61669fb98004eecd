"""``cloister`` as a user runs it: help, exit codes, one-line errors, environment, demo."""

from __future__ import annotations

import signal
import time

import pytest

from cloister.testing import ProcessGroup, free_port, node_events, wait_for_event
from tests.cli.support import assert_one_line_error, cli_env, cloister

COMMANDS = [(), ("run",), ("dev",), ("node",), ("status",), ("demo",), ("bench",)]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "cloister")
def test_help_for_every_command(command: tuple[str, ...]) -> None:
    result = cloister(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: cloister {' '.join(command)}".rstrip())
    assert result.stderr == ""


def test_no_command_is_a_usage_error() -> None:
    result = cloister()
    assert result.returncode == 2
    assert "usage: cloister" in result.stderr


def test_version() -> None:
    result = cloister("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("cloister ")


@pytest.mark.parametrize("command", ["node", "status"])
def test_bad_backend_url_is_a_one_line_usage_error(command: str) -> None:
    result = cloister(command, "--cluster", "shop", "--backend", "redis+nope://x")
    assert result.returncode == 2
    assert_one_line_error(result, f"cloister {command}: error:", "unknown backend URL")


def test_invalid_values_are_usage_errors() -> None:
    assert (
        cloister("node", "--cluster", "s", "--backend", "memory://x", "--consensus", "0").returncode
        == 2
    )
    result = cloister("node", "--cluster", "bad name", "--backend", "memory://x")
    assert result.returncode == 2
    assert_one_line_error(result, "invalid cluster name")
    result = cloister("node", "--backend", "memory://x")
    assert result.returncode == 2
    assert_one_line_error(result, "--cluster is required", "CLOISTER_CLUSTER")


def test_invalid_environment_variable_is_named() -> None:
    result = cloister(
        "node",
        env={
            "CLOISTER_BACKEND": "memory://x",
            "CLOISTER_CLUSTER": "s",
            "CLOISTER_CONSENSUS": "three",
        },
    )
    assert result.returncode == 2
    assert_one_line_error(result, "$CLOISTER_CONSENSUS")


def test_debug_shows_the_traceback() -> None:
    result = cloister("--debug", "node", "--cluster", "s", "--backend", "nope://x")
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("cloister node: error:")


def test_status_refuses_an_in_process_backend() -> None:
    result = cloister("status", "--cluster", "s", "--backend", "memory://x")
    assert result.returncode == 2
    assert_one_line_error(result, "memory://")


def test_node_reads_the_environment_and_flags_win(node_processes: ProcessGroup) -> None:
    env = cli_env(
        {
            "CLOISTER_BACKEND": "memory://env",
            "CLOISTER_CLUSTER": "shop",
            "CLOISTER_NODE": "from-env",
            "CLOISTER_CONSENSUS": "1",
            "CLOISTER_GROUPS": "eu, us",
        }
    )
    node = node_processes.spawn_python(
        "-m",
        "cloister",
        "--log-level",
        "info",
        "node",
        "--consensus",
        "1",
        "--heartbeat",
        "0.2",
        env=env,
        name="env-node",
    )
    wait_for_event(node, r"^node (\S+) pid=\d+ starting (.*)", timeout=20)
    event = node_events(node, "node")[0]
    assert event.words[0] == "from-env"
    assert event.fields["cluster"] == "shop" and event.fields["groups"] == "eu,us"
    wait_for_event(node, r"^state rehashing -> ready epoch=1 members=from-env ", timeout=10)
    assert node.terminate() == 0
    wait_for_event(node, r"^node from-env pid=\d+ stopped")
    flagged = node_processes.spawn_python(
        "-m",
        "cloister",
        "node",
        "--name",
        "from-flag",
        "--cluster",
        "other",
        env=env,
        name="flag-node",
    )
    wait_for_event(flagged, r"^node \S+ pid=\d+ starting .*", timeout=20)
    event = node_events(flagged, "node")[0]
    assert event.words[0] == "from-flag"
    assert event.fields["cluster"] == "other"
    flagged.send_signal(signal.SIGINT)
    assert flagged.wait(10) == 0


def test_node_event_lines_parse(node_processes: ProcessGroup) -> None:
    node = node_processes.spawn_python(
        "-m",
        "cloister",
        "node",
        "--cluster",
        "s",
        "--backend",
        "memory://x",
        "--name",
        "a",
        "--heartbeat",
        "0.2",
        env=cli_env(),
    )
    wait_for_event(node, "^state rehashing -> ready", timeout=20)
    assert node.terminate() == 0
    events = node_events(node)
    kinds = [e.kind for e in events]
    assert kinds[0] == "node" and kinds[-1] == "node"
    states = [e.change for e in events if e.kind == "state"]
    assert states == [
        ("down", "assembling"),
        ("assembling", "rehashing"),
        ("rehashing", "ready"),
        ("ready", "stopping"),
        ("stopping", "stopped"),
    ]
    epochs = [e for e in events if e.kind == "epoch"]
    assert [(e.epoch, e.members, e.fields["sentry"]) for e in epochs] == [(1, ("a",), "a")]
    assert any(e.kind == "lease" and e.words == ("acquired",) for e in events)
    times = [e.t for e in events]
    assert times == sorted(times)


def test_unreachable_nats_fails_fast_with_one_line() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    # A node waits for the medium up to --connect-timeout (30 s by default): 0 tries once.
    for command in ("node", "status"):
        began = time.monotonic()
        wait = ("--connect-timeout", "0") if command == "node" else ()
        result = cloister(command, "--cluster", "shop", "--backend", url, *wait, timeout=30)
        took = time.monotonic() - began
        assert result.returncode == 1, result
        assert_one_line_error(result, f"cloister {command}: error:")
        assert took < 10, f"{command} took {took:.1f}s to give up"


def test_bench_names() -> None:
    listed = cloister("bench", "--list")
    assert listed.returncode == 0 and "ring" in listed.stdout.split()
    missing = cloister("bench", "no-such-bench")
    assert missing.returncode == 1
    assert_one_line_error(missing, "no_such_bench.py")
    assert cloister("bench").returncode == 2


def test_demo_finishes() -> None:
    result = cloister("demo", "--no-progress", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lost" in result.stdout and "order" in result.stdout
    assert result.stderr == ""
