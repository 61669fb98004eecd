"""``cloister bench NAME``: run ``bench/NAME.py`` of the source checkout with this Python.

Benchmarks live next to the package in a source checkout (``bench/`` beside ``src/``);
they print a table and write ``bench/results/NAME.json``. Arguments after ``NAME`` go to
the benchmark; its exit code is ours.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from cloister.cli.options import EXIT_FAILURE, EXIT_OK, add_common

KNOWN = ("ring", "cluster", "nats_cluster", "manager", "inbox", "seed_flow", "client")
"""The project's benchmarks (some may not be written yet in a given checkout)."""

BENCH_DIR = Path(__file__).resolve().parents[3] / "bench"


def add_parser(commands: Any) -> None:
    """Register ``cloister bench``."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "bench",
        help="run a benchmark of the source checkout (bench/NAME.py)",
        description="Run bench/NAME.py of the source checkout with this Python interpreter. "
        f"Benchmarks: {', '.join(KNOWN)} (`-` and `_` are the same). Arguments after NAME "
        "are passed to the benchmark.",
    )
    parser.add_argument("name", nargs="?", metavar="NAME", help="the benchmark to run")
    parser.add_argument(
        "bench_args", nargs=argparse.REMAINDER, metavar="ARGS", help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--list", action="store_true", help="list the benchmarks this checkout has and exit"
    )
    add_common(parser)
    parser.set_defaults(run=run, parser=parser)


def available() -> list[str]:
    """The benchmarks present in :data:`BENCH_DIR`, sorted."""
    if not BENCH_DIR.is_dir():
        return []
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))


def run(args: argparse.Namespace) -> int:
    """Run the benchmark as a child process; its exit code, or 1 if it is missing."""
    if args.list or args.name is None:
        if args.name is None and not args.list:
            args.parser.error("give the NAME of a benchmark (or --list)")
        for name in available():
            print(name)
        return EXIT_OK
    name = args.name.replace("-", "_")
    script = BENCH_DIR / f"{name}.py"
    if not script.is_file():
        have = ", ".join(available()) or "none"
        where = (
            f"{BENCH_DIR} has {have}"
            if BENCH_DIR.is_dir()
            else f"no bench/ directory at {BENCH_DIR}: benchmarks run from a source checkout"
        )
        print(f"cloister bench: error: no benchmark {script.name} ({where})", file=sys.stderr)
        return EXIT_FAILURE
    return subprocess.call([sys.executable, str(script), *args.bench_args], cwd=BENCH_DIR.parent)
