"""``/healthz`` and ``/readyz`` as an orchestrator sees them: a real HTTP client against
real ``cloister run`` processes on a real nats-server."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from cloister import Cluster
from cloister.health import Health, ProbeServer
from cloister.testing import (
    NatsServer,
    NodeProcess,
    ProcessGroup,
    free_port,
    wait_for,
    wait_for_event,
)
from tests.cli.support import assert_one_line_error, cli_env, cloister, write_app

# Never go through an HTTP proxy to reach a loopback port.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(port: int, path: str) -> tuple[int, str]:
    """``GET http://127.0.0.1:port/path``: the status and body (errors included)."""
    try:
        with _HTTP.open(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode()


def _status_is(port: int, path: str, code: int) -> dict[str, object] | None:
    found, body = get(port, path)
    return json.loads(body) if found == code else None


def _run(
    group: ProcessGroup, server: NatsServer, folder: Path, name: str, *flags: str
) -> NodeProcess:
    return group.spawn_python(
        "-m",
        "cloister",
        "run",
        "shopapp:Shop",
        "--backend",
        server.url,
        "--cluster",
        "probed",
        "--name",
        name,
        "--consensus",
        "2",
        "--heartbeat",
        "0.5",
        *flags,
        cwd=folder,
        env=cli_env(),
        name=name,
    )


def test_readyz_follows_the_cluster_and_healthz_the_process(
    nats_server: NatsServer, node_processes: ProcessGroup, tmp_path: Path
) -> None:
    write_app(tmp_path)
    metrics_port, health_port = free_port(), free_port()
    a = _run(node_processes, nats_server, tmp_path, "a", "--metrics-port", str(metrics_port))
    wait_for_event(a, r"^node a pid=\d+ started ", timeout=20)

    # Alone with consensus 2: alive, connected, not ready.
    live = wait_for(lambda: _status_is(metrics_port, "/healthz", 200), 10, "a alive")
    assert live["medium"] == "connected" and live["state"] == "assembling"
    waiting = wait_for(lambda: _status_is(metrics_port, "/readyz", 503), 10, "a not ready")
    assert waiting["status"] == "fail" and waiting["state"] == "assembling"

    b = _run(node_processes, nats_server, tmp_path, "b", "--health-port", str(health_port))
    for port in (metrics_port, health_port):
        ready = wait_for(lambda port=port: _status_is(port, "/readyz", 200), 30, "ready")
        assert ready["state"] == "ready" and ready["managers"] == {"Shop": "settled"}
    assert get(health_port, "/healthz")[0] == 200

    # The metrics port also serves the metrics; anything else is a 404.
    code, metrics = get(metrics_port, "/metrics")
    assert code == 200 and 'cloister_node_state{cluster="probed",node="a",state="ready"} 1.0' in (
        metrics
    )
    assert get(metrics_port, "/")[0] == 404
    assert get(metrics_port, "/nope")[0] == 404
    assert get(health_port, "/metrics")[0] == 404  # probes only: no metrics there

    # b crashes: a falls short of consensus and suspends: not ready, still alive.
    b.kill()
    suspended = wait_for(lambda: _status_is(metrics_port, "/readyz", 503), 20, "a suspended")
    assert suspended["state"] != "ready"
    assert get(metrics_port, "/healthz")[0] == 200
    a.terminate()


def test_a_taken_port_is_named_with_what_to_do(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flag in ("--metrics-port", "--health-port"):
            result = cloister(
                "node",
                "--backend",
                "nats://127.0.0.1:1",
                "--cluster",
                "s",
                "--metrics-host",
                "127.0.0.1",
                flag,
                str(port),
                cwd=tmp_path,
            )
            assert result.returncode == 1, result
            assert_one_line_error(result, f"port {port} on 127.0.0.1 is already in use", flag)


async def test_liveness_fails_when_the_event_loop_does_not_answer() -> None:
    """The probe runs in the server's thread and asks the loop with a deadline: a loop
    held by blocking code fails it (and does not hang it)."""
    async with Cluster("held", "a", backend="memory://probe-held") as cluster:
        await cluster.wait_ready(5)
        server = ProbeServer(Health(cluster, loop_deadline=0.3), host="127.0.0.1", port=0)
        server.start()
        try:
            answered = await asyncio.to_thread(get, server.port, "/healthz")
            assert answered[0] == 200 and json.loads(answered[1])["loop"] == "ok"
            result: list[tuple[int, str]] = []
            probe = threading.Thread(target=lambda: result.append(get(server.port, "/healthz")))
            probe.start()
            time.sleep(1.0)  # noqa: ASYNC251 - on purpose: the loop is held
            probe.join(5)
            code, body = result[0]
            assert code == 503 and "did not answer within 0.3s" in json.loads(body)["loop"]
            assert json.loads(body)["status"] == "fail"

            # Cut off from the medium: not alive either (the backend says it is not connected).
            cluster.backend.world.partition([cluster.node])  # type: ignore[attr-defined]
            code, body = await asyncio.to_thread(get, server.port, "/healthz")
            assert code == 503 and json.loads(body)["medium"] == "disconnected"
            cluster.backend.world.heal()  # type: ignore[attr-defined]
            code, body = await asyncio.to_thread(get, server.port, "/healthz")
            assert code == 200 and json.loads(body)["medium"] == "connected"
        finally:
            await server.close()
