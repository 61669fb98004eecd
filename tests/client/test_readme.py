"""The README's "Sending from outside the cluster" is real: its application runs on two
``cloister run`` nodes over a real nats-server, and its sync and async senders run as a
user runs them; the framework handlers are shown as text, and compiled here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from cloister.testing import NatsServer, ProcessGroup, wait_for_event
from tests.cli.support import cli_env

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Sending from outside the cluster"


def blocks() -> list[str]:
    text = README.read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def named(name: str) -> str:
    found = [code for code in blocks() if code.startswith(f"# {name}")]
    assert len(found) == 1, f"the README section has no single block starting # {name}"
    return found[0]


def test_the_framework_handlers_compile() -> None:
    codes = blocks()
    fastapi = [code for code in codes if "FastAPI(" in code]
    django = [code for code in codes if "django" in code]
    assert len(fastapi) == 1 and len(django) == 1
    for code in codes:
        compile(code, "README", "exec")


def test_the_senders_run_against_a_cluster(
    nats_server: NatsServer, node_processes: ProcessGroup, tmp_path: Path
) -> None:
    for name in ("wallet.py", "send.py", "send_async.py"):
        (tmp_path / name).write_text(named(name))
    env = cli_env({"CLOISTER_BACKEND": nats_server.url, "CLOISTER_CLUSTER": "shop"})
    nodes = [
        node_processes.spawn_python(
            "-m", "cloister", "run", "wallet:Wallet", "--name", name, cwd=tmp_path, env=env
        )
        for name in ("a", "b")
    ]
    for node in nodes:
        wait_for_event(node, r"^state \S+ -> ready epoch=\d+ members=a,b ", timeout=30)
        wait_for_event(node, r"^manager up workers=\d+ epoch=\d+", timeout=30)

    def run(script: str) -> str:
        result = subprocess.run(
            [sys.executable, script],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        return result.stdout

    # 10 deposits of 5 and one retried deposit that is stored once: 50.
    assert run("send.py").strip() == "user-7 balance 50 members ['a', 'b']"
    assert re.fullmatch(r"user-8 balance 55 epoch \d+\n", run("send_async.py"))
