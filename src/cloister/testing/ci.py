"""Whether the tests run under CI: there, a missing service is a failure, never a skip."""

from __future__ import annotations

import os
from typing import NoReturn

__all__ = ["in_ci", "unavailable"]


def in_ci() -> bool:
    """``CI`` is set to true (``true``, ``1`` or ``yes``, any case)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> NoReturn:
    """Skip the calling test for a missing service; under CI fail it instead."""
    import pytest  # only tests call this: the package itself does not need pytest

    if in_ci():
        pytest.fail(f"CI=true, so this is a failure: {reason}", pytrace=False)
    pytest.skip(reason)
