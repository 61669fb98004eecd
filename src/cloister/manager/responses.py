"""What a callback returns: typed values in place of Tarearbol's tagged tuples.

=========================  ==================================================================
``Ok(result)``             keep the payload; remember ``result`` as the worker's last result
``Replace(payload)``       the worker's payload becomes ``payload``
``Replace(p, id=new)``     ... and the worker is re-keyed to ``new``
``Halt()``                 remove the worker (``terminate("halt", ...)`` is called)
``Timeout(seconds, r)``    next perform in ``seconds`` (instead of the spec's timeout)
``Timeout(s, r, permanent=True)``  the period becomes ``s`` for good (0: no more performs);
                           stored with the worker, so it survives handoff and takeover
any other value ``v``      treated as ``Ok(v)``
=========================  ==================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class Ok:
    """Keep the payload; store ``result`` as the last result."""

    result: Any = None


@dataclass(frozen=True, slots=True)
class Replace:
    """Replace the payload (and re-key the worker when ``id`` is given)."""

    payload: Any
    id: Any = _MISSING

    @property
    def rekeys(self) -> bool:
        """True when the worker must move to another id."""
        return self.id is not _MISSING


@dataclass(frozen=True, slots=True)
class Halt:
    """Remove the worker."""

    reason: str = "halt"


@dataclass(frozen=True, slots=True)
class Timeout:
    """Reschedule the next perform ``seconds`` from now; store ``result``.

    With ``permanent=True`` (Tarearbol's ``{{:timeout, t}, result}``) the worker's period
    becomes ``seconds`` from then on, not only for the next perform; ``0`` stops its
    periodic performs. The new period is part of the worker's spec: it is stored with its
    state and shipped on handoff, so the worker keeps it on its next owner.
    """

    seconds: float
    result: Any = None
    permanent: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, int | float):
            raise TypeError(f"Timeout seconds must be a number, got {self.seconds!r}")
        if self.seconds < 0:
            raise ValueError(f"Timeout seconds must be >= 0, got {self.seconds!r}")


Response = Ok | Replace | Halt | Timeout


def reply_of(response: Any) -> Any:
    """What ``manager.call`` returns to its caller for a ``handle_call`` response."""
    if isinstance(response, Ok | Timeout):
        return response.result
    if isinstance(response, Replace):
        return response.payload
    if isinstance(response, Halt):
        return None
    return response
