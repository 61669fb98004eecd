"""Child specs: the per-worker settings ``children_specs()`` and ``put()`` give.

A spec's fields come, field by field, from the first of: the spec itself (what
``children_specs()`` or ``put()`` gives), ``start(..., defaults=...)``, the manager class's
``defaults`` attribute, and the library defaults of :class:`Spec` (``timeout`` 1.0 s,
``lull`` 1.1, ``instant_perform`` False, ``payload`` None) — Tarearbol's
``use DynamicManager, defaults: [...]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cloister.errors import ConfigurationError
from cloister.store.inbox import check_worker_id

FIELDS = ("payload", "timeout", "lull", "instant_perform")


@dataclass(frozen=True, slots=True)
class Spec:
    """One worker's settings. ``timeout`` 0 means: never perform periodically.

    ``instant_perform``: ``True`` performs at once when the worker starts; a whole number
    of milliseconds (Tarearbol's integer form) performs first after that delay; ``False``
    (the default) performs first at a point of its first period fixed by the worker's id,
    so that workers started together spread over the period instead of firing at once.
    """

    payload: Any = None
    timeout: float = 1.0
    lull: float = 1.1
    instant_perform: bool | int = False

    @property
    def first_delay(self) -> float | None:
        """Seconds to the first perform when ``instant_perform`` is a delay, else None."""
        delay = self.instant_perform
        return None if isinstance(delay, bool) else delay / 1000

    def to_wire(self) -> dict[str, Any]:
        return {
            "payload": self.payload,
            "timeout": self.timeout,
            "lull": self.lull,
            "instant_perform": self.instant_perform,
        }


DEFAULT = Spec()
# Equal specs are shared: a million workers with the same settings hold one Spec object.
_SHARED: dict[tuple[Any, ...], Spec] = {}
_SHARED_MAX = 4096


def check_defaults(defaults: Any, where: str) -> dict[str, Any]:
    """``defaults`` checked as spec fields (a dict of :data:`FIELDS`), as a new dict."""
    if not isinstance(defaults, Mapping):
        raise ConfigurationError(
            f"{where} must be a dict of {', '.join(FIELDS)}, got {type(defaults).__name__}"
        )
    checked = dict(defaults)
    _validate(f"<{where}>", checked)
    return checked


def make_spec(worker_id: Any, fields: Any, defaults: Mapping[str, Any] | None = None) -> Spec:
    """Validate ``fields`` (a mapping, a :class:`Spec` or None) for ``worker_id``.

    ``defaults`` (checked by :func:`check_defaults`) fill the fields ``fields`` leaves out.
    """
    if isinstance(fields, Spec):
        return fields
    if defaults:
        if fields is None or (type(fields) is dict and not fields):
            fields = defaults
        elif type(fields) is dict:
            fields = {**defaults, **fields}
    if not fields and (fields is None or isinstance(fields, dict)):
        return DEFAULT
    if type(fields) is dict:
        try:
            key: tuple[Any, ...] | None = tuple((k, type(v), v) for k, v in fields.items())
            shared = _SHARED.get(key)  # type: ignore[arg-type]
        except TypeError:  # an unhashable payload: not shareable
            key = shared = None
        if shared is not None:
            return shared
        spec = _validate(worker_id, fields)
        if key is not None and len(_SHARED) < _SHARED_MAX:
            _SHARED[key] = spec
        return spec
    return _validate(worker_id, fields)


def _validate(worker_id: Any, fields: Any) -> Spec:
    if not isinstance(fields, dict):
        raise ConfigurationError(
            f"spec of worker {worker_id!r} must be a dict of {', '.join(FIELDS)}, "
            f"got {type(fields).__name__}"
        )
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ConfigurationError(
            f"spec of worker {worker_id!r} has unknown field(s) "
            f"{', '.join(sorted(map(str, unknown)))}; known fields: {', '.join(FIELDS)}"
        )
    timeout = fields.get("timeout", DEFAULT.timeout)
    lull = fields.get("lull", DEFAULT.lull)
    for name, value in (("timeout", timeout), ("lull", lull)):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ConfigurationError(
                f"spec of worker {worker_id!r}: {name} must be a number, got {value!r}"
            )
    if timeout < 0:
        raise ConfigurationError(
            f"spec of worker {worker_id!r}: timeout must be >= 0 seconds "
            f"(0 = never periodic), got {timeout!r}"
        )
    if lull < 1:
        raise ConfigurationError(f"spec of worker {worker_id!r}: lull must be >= 1, got {lull!r}")
    instant = fields.get("instant_perform", False)
    if not isinstance(instant, bool) and (not isinstance(instant, int) or instant < 0):
        raise ConfigurationError(
            f"spec of worker {worker_id!r}: instant_perform must be True, False or a delay "
            f"in whole milliseconds >= 0, got {instant!r}"
        )
    return Spec(
        payload=fields.get("payload"),
        timeout=float(timeout),
        lull=float(lull),
        instant_perform=True if instant == 0 and not isinstance(instant, bool) else instant,
    )


def check_id(worker_id: Any) -> Any:
    """Refuse ids the cluster cannot carry: anything but str, bytes, int and tuples of
    them, or longer than ``MAX_ID_BYTES`` encoded (:class:`InvalidIdError`, a
    ``TypeError`` and a ``ConfigurationError``)."""
    return check_worker_id(worker_id)
