"""Fixtures of the ring tests: every property runs against both implementations."""

from __future__ import annotations

import pytest
from ring_impls import NativeRing, PureRing

from cloister.testing import unavailable


@pytest.fixture(scope="session", params=["native", "pure"])
def ring_cls(request: pytest.FixtureRequest) -> type:
    """The ring class under test: the C core, then the pure-Python core."""
    if request.param == "pure":
        return PureRing
    if NativeRing is None:
        unavailable("the C accelerator cloister.ring._native is not built")
    return NativeRing


@pytest.fixture(scope="session")
def native_cls() -> type:
    """The C-backed ring class (fails under CI=true when the extension is missing)."""
    if NativeRing is None:
        unavailable("the C accelerator cloister.ring._native is not built")
    return NativeRing
