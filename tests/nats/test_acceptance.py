"""Issue 4 acceptance: real ``cloister node`` processes on a real nats-server.

Heartbeat 0.5 s, failure timeout 2 s (NATS TTLs are whole seconds). Times are measured
from just before the signal (the test's ``time.monotonic()``) to the survivors' event
lines (their ``time.monotonic()``: the same clock).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest

from cloister.testing import NatsServer, ProcessGroup
from cloister.testing.pytest_plugin import Factory
from tests.cli.support import assert_one_line_error, cli_env, cloister
from tests.nats.support import (
    FAILURE_TIMEOUT,
    HEARTBEAT,
    TTL_SLACK,
    Nodes,
    assert_one_sentry_at_a_time,
    wait_for,
)

ABC = ("a", "b", "c")


@pytest.fixture
def nodes(nats_server: NatsServer, node_processes: ProcessGroup) -> Nodes:
    """Three nodes, consensus 3, all ready."""
    nodes = Nodes(node_processes, nats_server.url, "shop")
    nodes.start(*ABC)
    nodes.wait_ready(ABC)
    return nodes


def test_three_nodes_ready_on_one_epoch_and_fingerprint(nodes: Nodes) -> None:
    agreed = nodes.wait_ready(ABC)
    for name in ABC:
        ready = nodes.last(name, "state")
        assert ready is not None and ready.change == ("rehashing", "ready")
        assert ready.epoch == agreed.epoch and ready.members == ABC
        assert ready.fields["fingerprint"] == agreed.fields["fingerprint"]
    status = nodes.status()
    assert status["epoch"] == agreed.epoch
    assert status["fingerprint"] == agreed.fields["fingerprint"]
    assert status["epoch_members"] == list(ABC)
    assert [m["node"] for m in status["members"]] == list(ABC)
    for member in status["members"]:
        assert member["state"] == "ready" and member["reachable"]
        assert member["epoch"] == agreed.epoch and member["acked"] == agreed.epoch
        assert member["fingerprint"] == agreed.fields["fingerprint"]
        assert member["share"] == pytest.approx(1 / 3, abs=0.05)
    assert sum(m["sentry"] for m in status["members"]) == 1
    assert status["sentry_lease"] == status["sentry"]
    table = cloister("status", "--backend", nodes.backend, "--cluster", nodes.cluster)
    assert table.returncode == 0, table.stderr
    for name in ABC:
        assert re.search(
            rf"^{name}\s+ready\s+{agreed.epoch}\s+{agreed.epoch}\s", table.stdout, re.M
        )


def test_status_watch_refreshes_until_ctrl_c(nodes: Nodes) -> None:
    watch = subprocess.Popen(
        [sys.executable, "-m", "cloister", "status", "--backend", nodes.backend,
         "--cluster", nodes.cluster, "--json", "--watch", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
    )  # fmt: skip
    time.sleep(2.0)
    watch.send_signal(signal.SIGINT)
    out, err = watch.communicate(timeout=10)
    assert watch.returncode == 0, err
    docs = [json.loads(line) for line in out.splitlines()]
    assert len(docs) >= 3
    assert all([m["node"] for m in doc["members"]] == list(ABC) for doc in docs)
    ages = [m["heartbeat_age"] for m in docs[-1]["members"]]
    assert all(age is not None and age < 2 * HEARTBEAT for age in ages), ages


def test_kill_9_is_noticed_within_the_failure_timeout_and_the_node_rejoins(nodes: Nodes) -> None:
    killed = nodes.kill("c")
    noticed = nodes.noticed(("a", "b"), ("a", "b"), since=killed, timeout=FAILURE_TIMEOUT + 5)
    took = max(noticed.values()) - killed
    print(f"kill -9 noticed by every survivor after {took:.3f}s")
    assert took <= FAILURE_TIMEOUT + HEARTBEAT + TTL_SLACK
    for name in ("a", "b"):  # consensus 3: two members are not enough
        wait_for(lambda n=name: nodes.state(n) == "rehashing" or None, 5, f"{name} rehashing")
    nodes.restart("c")
    nodes.wait_ready(ABC)


def test_sigterm_is_seen_at_once(nodes: Nodes) -> None:
    left = nodes.terminate("c")
    noticed = nodes.noticed(("a", "b"), ("a", "b"), since=left, timeout=FAILURE_TIMEOUT)
    took = max(noticed.values()) - left
    print(f"graceful leave seen by every survivor after {took:.3f}s")
    assert took < FAILURE_TIMEOUT / 2
    stopped = nodes.last("c", "node")
    assert stopped is not None and "stopped" in stopped.words


def test_kill_9_of_the_sentry_hands_over_to_exactly_one(nodes: Nodes) -> None:
    epoch = nodes.last("a", "epoch")
    assert epoch is not None
    sentry = epoch.fields["sentry"]
    survivors = sorted(set(ABC) - {sentry})
    killed = nodes.kill(sentry)

    def new_sentry() -> tuple[str, float] | None:
        for name in survivors:
            for event in nodes.events(name, "lease"):
                if event.words == ("acquired",) and event.t >= killed:
                    return name, event.t
        return None

    holder, at = wait_for(new_sentry, FAILURE_TIMEOUT + 5, "a survivor takes the lease")
    print(f"new sentry {holder} {at - killed:.3f}s after kill -9 of {sentry}")
    assert at - killed <= FAILURE_TIMEOUT + 1.0  # the lease's TTL + 1 s
    nodes.noticed(survivors, survivors, since=killed, timeout=5)
    for name in survivors:
        last = nodes.last(name, "epoch")
        assert last is not None and last.fields["sentry"] == holder
    assert_one_sentry_at_a_time(nodes, ended={sentry: killed})


def test_wrong_credentials_fail_fast_and_clusters_stay_apart(
    nats_server_factory: Factory[NatsServer], node_processes: ProcessGroup
) -> None:
    server = nats_server_factory(user="app", password="s3cret")
    wrong = cloister(
        "node", "--cluster", "a", "--backend", server.url, "--user", "app", "--password", "nope",
        timeout=30,
    )  # fmt: skip
    assert wrong.returncode == 1
    line = assert_one_line_error(wrong, "cloister node: error:")
    assert "authoriz" in line.lower() or "credential" in line.lower(), line
    login = ("--user", "app", "--password", "s3cret")
    first = Nodes(node_processes, server.url, "a", consensus=2, extra=login)
    second = Nodes(node_processes, server.url, "b", consensus=1, extra=login)
    first.start("a1", "a2")
    second.start("b1")
    first.wait_ready(("a1", "a2"))
    second.wait_ready(("b1",))
    assert [m["node"] for m in first.status(*login)["members"]] == ["a1", "a2"]
    assert [m["node"] for m in second.status(*login)["members"]] == ["b1"]
    empty = cloister("status", "--backend", server.url, "--cluster", "c", *login)
    assert empty.returncode == 1
    assert_one_line_error(empty, "no members")
