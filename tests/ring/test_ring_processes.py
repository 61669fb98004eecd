"""Determinism across processes, hash seeds and implementations; the fallback's warning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from cloister import HashRing

MEMBERS = {"alpha": 1, "beta": 1, "gamma": 2, "delta": 0.5, "épsilon": 1}
PROBE = """
import json, sys
from cloister import HashRing
from cloister.ring import NATIVE
members = json.loads(sys.argv[1])
keys = [f"foo_{i}" for i in range(3000)] + list(range(-500, 500)) + [b"k%d" % i for i in range(300)]
keys += [("user", i, b"x") for i in range(300)] + ["\\u00e9t\\u00e9", "\\U0001f600", 2**100]
rings = [HashRing(members), HashRing(list(members))]
out = {
    "native": NATIVE,
    "owners": [[r.key_to_node(k) for k in keys] for r in rings],
    "top3": [r.key_to_nodes(k, 3) for r in rings for k in keys[:200]],
    "fingerprints": [r.fingerprint for r in rings],
}
json.dump(out, sys.stdout)
"""


def run_probe(**env: str) -> dict[str, Any]:
    environ = {**os.environ, **env}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(MEMBERS)],
        env=environ,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture(scope="module")
def here() -> dict[str, Any]:
    """The probe's answers computed in this process."""
    return run_probe()


@pytest.mark.parametrize(
    "env",
    [
        {"PYTHONHASHSEED": "0"},
        {"PYTHONHASHSEED": "12345"},
        {"PYTHONHASHSEED": "random"},
        {"CLOISTER_PURE_RING": "1", "PYTHONHASHSEED": "777"},
    ],
    ids=["seed0", "seed12345", "random", "pure"],
)
def test_every_process_computes_the_same_owners(here: dict[str, Any], env: dict[str, str]) -> None:
    there = run_probe(**env)
    assert there["owners"] == here["owners"]
    assert there["top3"] == here["top3"]
    assert there["fingerprints"] == here["fingerprints"]
    if env.get("CLOISTER_PURE_RING"):
        assert there["native"] is False


def test_this_process_agrees_with_the_probe(here: dict[str, Any]) -> None:
    ring = HashRing(MEMBERS)
    assert [ring.key_to_node(f"foo_{i}") for i in range(3000)] == here["owners"][0][:3000]


def test_missing_accelerator_falls_back_with_one_warning() -> None:
    code = (
        "import sys; sys.modules['cloister.ring._native'] = None\n"
        "import cloister.ring, cloister\n"
        "from cloister import HashRing\n"
        "assert not cloister.ring.NATIVE\n"
        "r = HashRing(['a', 'b']).add_node('c')\n"
        "print(r.key_to_node('foo_1'), r.fingerprint)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    ring = HashRing(["a", "b", "c"])
    assert done.stdout.split() == [ring.key_to_node("foo_1"), ring.fingerprint]
    assert done.stderr.count("C accelerator of the hash ring is not built") == 1
