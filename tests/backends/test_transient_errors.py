"""JetStream refusals that pass on their own are "unavailable" (retried), not failures."""

from __future__ import annotations

import nats.js.errors
import pytest

from cloister.backends.nats._errors import translate
from cloister.errors import BackendError, BackendUnavailableError


def _api_error(code: int, description: str) -> nats.js.errors.APIError:
    return nats.js.errors.APIError(code=503, err_code=code, description=description)


@pytest.mark.parametrize(
    ("code", "description"),
    [(10005, "no suitable peers for placement"), (10008, "jetstream temporarily unavailable")],
)
def test_forming_cluster_refusals_are_unavailable(code: int, description: str) -> None:
    error = translate(_api_error(code, description), "create stream", "nats://n:4222")
    assert isinstance(error, BackendUnavailableError)
    assert f"code {code}" in str(error) and "retrying may help" in str(error)


def test_other_refusals_stay_failures() -> None:
    error = translate(_api_error(10058, "stream name already in use"), "create", "nats://n")
    assert isinstance(error, BackendError) and not isinstance(error, BackendUnavailableError)
