"""Run ``cloister`` as a user would: a child process with this interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from cloister.cli.options import SETTINGS
from cloister.testing import parse_event

# The variables the CLI reads: a developer's own settings must not leak into the tests.
_CLEAN = tuple(setting.env for setting in SETTINGS)

KEYS = 8
"""Workers of the test application (:func:`write_app`)."""

APP = f"""
from cloister import DynamicManager, Ok


class Shop(DynamicManager):
    def children_specs(self):
        return {{f"key-{{i}}": {{"timeout": 0.5}} for i in range({KEYS})}}

    def perform(self, id, payload):
        return Ok(None)


class Broken(DynamicManager):
    def children_specs(self):
        raise RuntimeError("no specs today")


def helper():
    return None
"""


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without CLOISTER_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _CLEAN}
    env["PYTHONUNBUFFERED"] = "1"
    return {**env, **(extra or {})}


def cloister(
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m cloister ARGS`` (from ``cwd``); its exit code and output."""
    return subprocess.run(
        [sys.executable, "-m", "cloister", *args],
        capture_output=True,
        text=True,
        env=cli_env(env),
        timeout=timeout,
        cwd=cwd,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """The command failed with exactly one stderr line, no traceback, naming ``words``
    (a node's events before it, such as ``node … starting``, are its log, not the error)."""
    assert result.returncode != 0, result
    lines = [line for line in result.stderr.strip().splitlines() if parse_event(line) is None]
    assert len(lines) == 1, f"expected one stderr line, got:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("cloister"), lines[0]
    assert "internal error" not in lines[0], lines[0]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


def write_app(folder: Path, module: str = "shopapp") -> Path:
    """Write the test application (``Shop``: a manager of :data:`KEYS` workers) there."""
    path = folder / f"{module}.py"
    path.write_text(APP)
    return path
