"""Which manager a client talks to: its name, partitions, placement group and inbox mode.

A manager is named by its class (everything is read from it, as a node would) or by its
name; for a name alone the partition count is read from the manager's inbox on the
medium (it must exist: a node started the manager), unless the client was told it
(``Client(..., partitions={name: n})``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cloister.errors import ConfigurationError
from cloister.manager import DynamicManager

__all__ = ["ManagerRef", "ManagerTarget"]

ManagerRef = str | type[DynamicManager]
"""A manager as a client names it: ``"Processor"`` or the class ``Processor``."""


@dataclass(frozen=True, slots=True)
class ManagerTarget:
    """What a client needs to know of a manager to reach its inbox and its workers."""

    name: str
    partitions: int | None
    """None: read from the manager's inbox on the medium."""
    group: str
    durable: bool

    @classmethod
    def of(cls, manager: ManagerRef, partitions: Mapping[str, int]) -> ManagerTarget:
        """The target of ``manager``; :class:`ConfigurationError` for anything else."""
        if isinstance(manager, type) and issubclass(manager, DynamicManager):
            name = manager.name or manager.__name__
            return cls(
                name=name,
                partitions=partitions.get(name, manager.partitions),
                group=manager.placement_group(),
                durable=manager.durable,
            )
        if isinstance(manager, str) and manager:
            return cls(
                name=manager,
                partitions=partitions.get(manager),
                # the group DynamicManager.placement_group() names for this manager
                group=f"manager.{manager}",
                durable=True,
            )
        raise ConfigurationError(
            f"a manager is named by its name (a non-empty str) or its DynamicManager "
            f"class, got {manager!r:.80}"
        )
