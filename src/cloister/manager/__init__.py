"""The manager layer: ``DynamicManager`` and the responses its callbacks return.

- :mod:`.core` — :class:`DynamicManager`: the facade (user callbacks, public API).
- :mod:`.routing` — :class:`~.routing.Router`: calls, casts, puts and deletes to the owner.
- :mod:`.ownership` — :class:`~.ownership.ShardRegion`: topology hooks, handoff, partitions.
- :mod:`.engine` — :class:`~.engine.Engine`: worker table, timers, dispatcher, responses;
  :mod:`.recovery` its cold paths, :mod:`.ports` its seams.
- :mod:`.lifecycle` — the manager's phases and ``ManagerState``.
- :mod:`.types` — ``Key``, ``Reason``, ``ManagerCounters``, option literals.
- :mod:`.consumer` — partition consumers of the durable inbox.
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
