"""NodeProcess and ProcessGroup: output capture, waits, kills, and never an orphan."""

from __future__ import annotations

import re
import signal
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from cloister.testing import HarnessError, LineNotFoundError, NodeProcess, ProcessGroup
from cloister.testing.pytest_plugin import require_nats_server

SPAWNS_A_GRANDCHILD = textwrap.dedent(
    """
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print(f"grandchild={child.pid}", flush=True)
    print("ready", flush=True)
    time.sleep(60)
    """
)


def gone(pid: int, within: float = 3.0) -> bool:
    """True once ``pid`` no longer exists (or is a zombie nobody reaps yet)."""
    deadline = time.monotonic() + within
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def test_kill_takes_the_whole_process_group(node_processes: ProcessGroup) -> None:
    node = node_processes.spawn_python("-c", SPAWNS_A_GRANDCHILD, name="parent")
    grandchild = int(node.wait_for_line(r"grandchild=(\d+)", timeout=10).group(1))
    node.wait_for_line("^ready$")
    assert node.is_running
    assert psutil.Process(grandchild).is_running()
    assert node.pid is not None and psutil.Process(grandchild).ppid() == node.pid

    assert node.kill() == -signal.SIGKILL
    assert node.returncode == -signal.SIGKILL
    assert gone(node.pid)
    assert gone(grandchild)


def test_terminate_lets_the_child_say_goodbye(node_processes: ProcessGroup) -> None:
    code = textwrap.dedent(
        """
        import signal, sys, time
        def bye(*_):
            print("bye", flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, bye)
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    node = node_processes.spawn_python("-c", code)
    node.wait_for_line("ready")
    assert node.terminate(timeout=5) == 0
    assert node.lines[-1].text == "bye"


def test_terminate_escalates_to_sigkill(node_processes: ProcessGroup) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "print('ready', flush=True); time.sleep(60)"
    node = node_processes.spawn_python("-c", code)
    node.wait_for_line("ready")
    began = time.monotonic()
    assert node.terminate(timeout=0.3) == -signal.SIGKILL
    assert time.monotonic() - began < 3


def test_streams_marks_and_log_file(node_processes: ProcessGroup, tmp_path: Path) -> None:
    code = "import sys\nprint('out 1'); print('err 1', file=sys.stderr)\n"
    code += "sys.stdout.flush(); sys.stderr.flush(); import time; time.sleep(60)"
    node = node_processes.spawn_python("-c", code, name="talker")
    assert node.wait_for_line(r"err (\d)", stream="stderr").group(1) == "1"
    with pytest.raises(LineNotFoundError):
        node.wait_for_line("err", stream="stdout", timeout=0.2)
    mark = node.mark()
    with pytest.raises(LineNotFoundError, match=r"within 0\.2s"):
        node.wait_for_line("out 1", since=mark, timeout=0.2)
    node.kill()
    log_text = (tmp_path / "nodes" / "talker.log").read_text()
    assert "out 1" in log_text and "err 1" in log_text
    assert {line.stream for line in node.lines} == {"stdout", "stderr"}


def test_a_child_that_exits_fails_the_wait_at_once(node_processes: ProcessGroup) -> None:
    node = node_processes.spawn_python("-c", "print('starting'); raise SystemExit(3)")
    began = time.monotonic()
    with pytest.raises(LineNotFoundError, match=r"exited with code 3(.|\n)*starting"):
        node.wait_for_line("never", timeout=10)
    assert time.monotonic() - began < 5
    assert node.returncode == 3


def test_restart_waits_for_lines_of_the_new_run(node_processes: ProcessGroup) -> None:
    code = "import os, time; print(f'pid={os.getpid()}', flush=True); time.sleep(60)"
    node = node_processes.spawn_python("-c", code)
    first = node.wait_for_line(r"pid=(\d+)").group(1)
    node.kill()
    node.restart()
    second = node.wait_for_line(r"pid=(\d+)").group(1)
    assert first != second
    assert str(node.pid) == second


async def test_wait_for_line_async(node_processes: ProcessGroup) -> None:
    code = "import time; time.sleep(0.2); print('late', flush=True); time.sleep(60)"
    node = node_processes.spawn_python("-c", code)
    found = await node.wait_for_line_async(re.compile("la(te)"), timeout=10)
    assert found.group(1) == "te"
    with pytest.raises(LineNotFoundError):
        await node.wait_for_line_async("nope", timeout=0.1)


def test_group_stop_leaves_no_process_behind() -> None:
    with ProcessGroup() as group:
        nodes = [group.spawn_python("-c", SPAWNS_A_GRANDCHILD) for _ in range(3)]
        grandchildren = [int(n.wait_for_line(r"grandchild=(\d+)").group(1)) for n in nodes]
        pids = [n.pid for n in nodes]
    assert all(pid is not None and gone(pid) for pid in pids)
    assert all(gone(pid) for pid in grandchildren)
    assert all(n.returncode == -signal.SIGKILL for n in nodes)


def test_terminate_all_signals_everyone_at_once(node_processes: ProcessGroup) -> None:
    code = "import time; print('up', flush=True); time.sleep(60)"
    nodes = [node_processes.spawn_python("-c", code) for _ in range(3)]
    for node in nodes:
        node.wait_for_line("up")
    began = time.monotonic()
    node_processes.terminate_all(timeout=5)
    assert time.monotonic() - began < 3
    assert [n.returncode for n in nodes] == [-signal.SIGTERM] * 3


def test_children_die_with_a_killed_parent(node_processes: ProcessGroup) -> None:
    """The runner itself SIGKILLed (no teardown runs): its servers and nodes die too."""
    require_nats_server()
    code = textwrap.dedent(
        """
        import sys, time
        from cloister.testing import NatsServer, ProcessGroup
        server = NatsServer().start()
        group = ProcessGroup()
        node = group.spawn([sys.executable, "-c", "import time; time.sleep(60)"])
        print(f"server={server.pid} node={node.pid}", flush=True)
        time.sleep(60)
        """
    )
    runner = node_processes.spawn_python("-c", code, name="runner")
    found = runner.wait_for_line(r"server=(\d+) node=(\d+)", timeout=15)
    server, node = int(found.group(1)), int(found.group(2))
    assert psutil.pid_exists(server) and psutil.pid_exists(node)
    runner.kill()
    assert gone(server), "nats-server outlived its killed parent"
    assert gone(node), "node process outlived its killed parent"


def test_empty_argv_is_refused() -> None:
    with pytest.raises(HarnessError, match="non-empty argv"):
        NodeProcess([])


def test_python_children_use_this_interpreter(node_processes: ProcessGroup) -> None:
    node = node_processes.spawn_python("-c", "import sys, cloister; print(sys.executable)")
    assert node.wait_for_line(".+").group(0) == sys.executable
