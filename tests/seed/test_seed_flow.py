"""The seed's scenario, shortened: real node processes, a 3-server NATS cluster, RabbitMQ.

kill -9 at 30%, a new node at 60%, SIGTERM at 80% — and nothing lost, order kept, no
duplicates (msg_id), no key on two nodes at once. The full-size run is bench/seed_flow.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cloister.testing import unavailable

BENCH = Path(__file__).resolve().parents[2] / "bench" / "seed_flow.py"


def rabbitmq_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.timeout(300)
def test_seed_flow_short(tmp_path: Path) -> None:
    if not rabbitmq_up():
        unavailable("RabbitMQ is not reachable on 127.0.0.1:5672")
    out = tmp_path / "result.json"
    run = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--messages",
            "3000",
            "--keys",
            "300",
            "--rate",
            "300",
            "--drain-timeout",
            "60",
            "--json-out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["lost"] == 0, result
    assert result["out_of_order"] == 0, result
    assert result["overlaps"] == 0, result
    # effectively once: the state every message produced is there exactly once, in order
    assert result["state_duplicates"] == 0, result
    assert result["state_missing"] == 0, result
    assert result["state_out_of_order"] == 0, result
    assert result["keys_that_moved"] > 0, result
    assert run.returncode == 0, run.stderr[-3000:]
