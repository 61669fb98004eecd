"""``cloister cast`` and ``cloister call`` as an operator runs them: subprocesses against a
cluster of real ``cloister run`` nodes on a real nats-server."""

from __future__ import annotations

import json

from cloister.testing import NatsServer, ProcessGroup, wait_for
from tests.cli.support import assert_one_line_error, cloister
from tests.client.processes import spawn_node


def _epoch_and_members(server: NatsServer, cluster: str) -> tuple[int, list[str]]:
    result = cloister("status", "--json", "--backend", server.url, "--cluster", cluster)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    return status["epoch"], sorted(m["node"] for m in status["members"])


def test_cast_and_call_from_the_command_line(
    nats_server: NatsServer, node_processes: ProcessGroup
) -> None:
    for name in ("a", "b"):
        spawn_node(node_processes, nats_server, "cli", name)

    def both() -> tuple[int, list[str]] | None:
        found = _epoch_and_members(nats_server, "cli")
        return found if found[1] == ["a", "b"] else None

    before = wait_for(both, 30, "both nodes in the cluster")
    flags = ("--backend", nats_server.url, "--cluster", "cli")
    env = {"CLOISTER_BACKEND": nats_server.url, "CLOISTER_CLUSTER": "cli"}

    first = cloister("cast", "orders", "key-3", "1", *flags)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip()  # the generated message id
    for _ in range(2):  # the same --msg-id twice: stored once
        again = cloister("cast", "orders", "key-3", "2", "--msg-id", "op-2", env=env)
        assert again.returncode == 0 and again.stdout.strip() == "op-2", again.stderr

    def history() -> dict[str, object] | None:
        result = cloister("call", "orders", "key-3", '"history"', env=env)
        assert result.returncode == 0, result.stderr
        found: dict[str, object] = json.loads(result.stdout)
        return found if found["seqs"] == [1, 2] else None

    assert wait_for(history, 20, "both casts handled, once each")["violations"] == 0
    echo = cloister("call", "orders", "key-5", '{"x": [1, 2]}', *flags)
    assert echo.returncode == 0 and json.loads(echo.stdout) == ["key-5", {"x": [1, 2]}]

    unknown = cloister("call", "orders", "nobody", '"history"', *flags)
    assert unknown.returncode == 1
    assert_one_line_error(unknown, "cloister call", "nobody")
    missing = cloister("cast", "Ordres", "key-1", "1", *flags)
    assert missing.returncode == 1
    assert_one_line_error(missing, "cloister cast", "'Ordres'", "no manager")
    bad = cloister("cast", "orders", "key-1", "{not json", *flags)
    assert bad.returncode == 2
    assert_one_line_error(bad, "JSON")
    float_id = cloister("cast", "orders", "8.5", "1", "--json-id", *flags)
    assert float_id.returncode == 2
    assert_one_line_error(float_id, "worker id")

    # Neither command ever joined: same members, same epoch.
    assert _epoch_and_members(nats_server, "cli") == before
