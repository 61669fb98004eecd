"""What the test suites share: waiting, CI detection, timings and node harnesses.

- :func:`eventually` / :func:`wait_for` and :func:`in_ci` / :func:`unavailable` come from
  :mod:`cloister.testing` (users' tests want them too).
- :mod:`tests._support.timing`: every heartbeat / failure timeout (``FAST``, ``MEMORY``,
  ``NATS``).
- :mod:`tests._support.nodes`: :class:`ClusterNodes`, in-process nodes of one cluster on
  one backend, with or without managers (:class:`Harness` adds a listener recorder).
"""

from __future__ import annotations

from cloister.testing import eventually, in_ci, unavailable, wait_for
from tests._support.nodes import ClusterNodes, Harness, Recorder
from tests._support.timing import FAST, MEMORY, NATS, Timing

__all__ = [
    "FAST",
    "MEMORY",
    "NATS",
    "ClusterNodes",
    "Harness",
    "Recorder",
    "Timing",
    "eventually",
    "in_ci",
    "unavailable",
    "wait_for",
]
