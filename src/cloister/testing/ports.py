"""Re-exported from :mod:`cloister.local.ports` (where it lives: the CLI uses it too)."""

from __future__ import annotations

from cloister.local.ports import free_port

__all__ = ["free_port"]
