"""The README's example is real: extract it and run it as a user would."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def example() -> str:
    text = README.read_text()
    section = text.split("## Example", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's Example section has no python block"
    return match.group(1)


def test_example_is_short() -> None:
    code = [line for line in example().splitlines() if line.strip()]
    assert len(code) <= 22, len(code)


def test_example_runs(tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(example())
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    # The balance printed is the one the program read back from the worker (100 casts of 1,
    # each applied once), and the owner is the node the ring placed user-7 on.
    assert re.search(r"user-7 lives on node-\d balance 100$", result.stdout, re.M), result.stdout
    assert "Traceback" not in result.stderr


def test_benchmark_table_is_written_from_the_results() -> None:
    # The README's figures come from bench/results/*.json through bench/readme_table.py;
    # a hand edit of the table, or a result file committed without it, fails here.
    script = README.parent / "bench" / "readme_table.py"
    result = subprocess.run(
        [sys.executable, str(script), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
