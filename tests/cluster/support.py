"""The cluster tests' helpers, which live in :mod:`tests._support` (shared by every suite)."""

from __future__ import annotations

from cloister.testing import eventually
from tests._support.nodes import Harness, Recorder
from tests._support.timing import FAST_FAILURE_TIMEOUT as FAILURE_TIMEOUT
from tests._support.timing import FAST_HEARTBEAT as HEARTBEAT

__all__ = ["FAILURE_TIMEOUT", "HEARTBEAT", "Harness", "Recorder", "eventually"]
