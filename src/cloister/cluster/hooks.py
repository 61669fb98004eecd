"""Topology hooks: how components (the DynamicManager) follow ownership.

:class:`Hooks` calls every registered hook through its typed method, one at a time; a
hook that raises is logged and skipped, so a component's bug never stops the node's
control loop.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from cloister.cluster.topology import Topology

log = logging.getLogger("cloister.cluster")


class SuspendReason(StrEnum):
    """Why a node stops processing (``TopologyHook.suspend``)."""

    LEASE_LOST = "lease lost"
    SHORT_OF_CONSENSUS = "short of consensus"
    STOPPING = "stopping"
    MEDIUM_LOST = "medium lost its data"
    """The medium came back without its data (a server restarted with an empty store):
    partition claims, consumers and stored state are gone; settle afresh on a new epoch."""


class TopologyHook(Protocol):
    """How a component (the DynamicManager) follows ownership. Internal contract.

    ``release`` runs before the node acknowledges a new epoch: stop what is no longer
    yours. ``settle`` runs once every member acknowledged (the node becomes ready): start
    what is yours. ``suspend`` runs when the node must stop everything. A node that dies
    calls no hook: its components' tasks die with it (see :attr:`Cluster.supervisor`).
    """

    async def release(self, topology: Topology) -> None: ...

    async def settle(self, topology: Topology) -> None: ...

    async def suspend(self, reason: SuspendReason) -> None: ...


class Hooks:
    """The hooks of one node, called in the order they were added."""

    def __init__(self, node: str) -> None:
        self.node = node
        self._hooks: list[TopologyHook] = []

    def add(self, hook: TopologyHook) -> None:
        """Call ``hook`` from now on."""
        self._hooks.append(hook)

    def remove(self, hook: TopologyHook) -> None:
        """Stop calling ``hook`` (no error if it was not added)."""
        if hook in self._hooks:
            self._hooks.remove(hook)

    async def release(self, topology: Topology) -> None:
        """Every hook's ``release(topology)``."""
        for hook in list(self._hooks):
            try:
                await hook.release(topology)
            except Exception:
                self._failed(hook, "release")

    async def settle(self, topology: Topology) -> None:
        """Every hook's ``settle(topology)``."""
        for hook in list(self._hooks):
            try:
                await hook.settle(topology)
            except Exception:
                self._failed(hook, "settle")

    async def suspend(self, reason: SuspendReason) -> None:
        """Every hook's ``suspend(reason)``."""
        for hook in list(self._hooks):
            try:
                await hook.suspend(reason)
            except Exception:
                self._failed(hook, "suspend")

    def _failed(self, hook: TopologyHook, method: str) -> None:
        log.exception(
            "topology hook %s.%s failed on node %s", type(hook).__name__, method, self.node
        )
