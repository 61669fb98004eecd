"""The manager layer: ``DynamicManager`` and the responses its callbacks return.

- :mod:`.core` — :class:`DynamicManager` (lifecycle, routing, distribution).
- :mod:`.worker` — compact worker records and the eager callback runner.
- :mod:`.scheduler` — the timer wheel behind periodic performs.
- :mod:`.spec` — child spec validation.
- :mod:`.responses` — ``Ok``, ``Replace``, ``Halt``, ``Timeout``.
- :mod:`.state` — the replicated table of runtime specs and replaced payloads.
"""

from cloister.errors import NotOwnerError
from cloister.manager.core import DynamicManager, UnknownWorkerError
from cloister.manager.responses import Halt, Ok, Replace, Timeout
from cloister.manager.spec import Spec
from cloister.manager.worker import WorkerInfo

__all__ = [
    "DynamicManager",
    "Halt",
    "NotOwnerError",
    "Ok",
    "Replace",
    "Spec",
    "Timeout",
    "UnknownWorkerError",
    "WorkerInfo",
]
