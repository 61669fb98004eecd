"""Re-exported from :mod:`cloister.local.processes` (where it lives: the CLI uses it too)."""

from __future__ import annotations

from cloister.local.processes import NodeProcess, OutputLine, ProcessGroup

__all__ = ["NodeProcess", "OutputLine", "ProcessGroup"]
