"""Crash detection ahead of the member TTL: probing members for "no responders".

When a process dies (``kill -9``, a crash), the medium sees its connection close at once:
a request to the subject only that process served fails with "no responders"
(:class:`~cloister.errors.NoSuchNodeError`) right away, long before its member record's
TTL runs out. The :class:`Prober` asks ``cloister.ping`` of the members it watches every
``interval`` seconds; a member that has no responder on two probes in a row,
:data:`CONFIRM_AFTER` seconds (or ``interval / 2``) apart, is reported *unreachable*,
with the revision of its member record then. Two cases of a live process without a
responder are allowed for (``Backend.reconnect_spread``):

- its server died and its connection is moving to another one: when the medium lost a
  server a moment ago (``Backend.server_lost_at``), a silent member is probed once more
  after the move time has passed since;
- the prober's own connection just came back, maybe to a restarted server the others are
  still returning to, up to the longest reconnect delay apart: for that long no probe
  counts.

:func:`~cloister.cluster.control.decide` turns an unreachable member into deleting its
record by compare-and-set — an early version of what the TTL would do — so that the sentry
publishes an epoch without the dead node.

Safe, not only fast: a node wrongly reported (a live process between two connections)
finds its record gone when it renews, suspends and rejoins, as after an expiry; and
every state write of the keys it held is fenced at the medium (the claims of
``cloister.manager.claims``), so nothing it does meanwhile is stored. A node that is
alive but unreachable answers nothing at all (a timeout, not "no responders"): the
prober leaves it to the TTL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from cloister.errors import CloisterError, NoSuchNodeError

log = logging.getLogger("cloister.cluster.probe")

#: The least time between the two probes that find a member gone.
CONFIRM_AFTER = 0.1

Ping = Callable[[str, float], Awaitable[object]]
"""Sends one probe to a node, with a timeout (seconds); raises what the request raised."""


class Prober:
    """Probes the members ``targets()`` names (node -> revision of its member record) and
    keeps :attr:`unreachable`: those with no responder on two probes in a row."""

    def __init__(
        self,
        ping: Ping,
        targets: Callable[[], Mapping[str, int]],
        wake: Callable[[], None],
        *,
        interval: float,
    ) -> None:
        self.interval = interval
        self.confirm_after = max(CONFIRM_AFTER, interval / 2)
        """How long after a probe without a responder the second one goes."""
        self.move_time = 0.0
        """How long after the medium lost a server its clients may still be moving."""
        self.return_spread = 0.0
        """How long after our own reconnect no probe counts."""
        self._server_lost_at: Callable[[], float | None] = lambda: None
        self._counts_from = 0.0  # time.monotonic() from which probes count again
        self.unreachable: dict[str, int] = {}
        """Members found gone: node -> the revision of its member record when probed."""
        self.probes = 0
        self._ping = ping
        self._targets = targets
        self._wake = wake

    def allow_for(
        self, spread: tuple[float, float], server_lost_at: Callable[[], float | None]
    ) -> None:
        """Allow for the medium's ``Backend.reconnect_spread`` (move, return) and its
        servers' losses (``Backend.server_lost_at``)."""
        self.move_time, self.return_spread = spread
        self._server_lost_at = server_lost_at

    def reconnected(self) -> None:
        """Our own connection came back: for the return spread, no probe counts (the
        others may still be on their way back to a restarted server)."""
        self._counts_from = time.monotonic() + self.return_spread

    async def run(self) -> None:
        """Probe every ``interval`` seconds, for good."""
        while True:
            await asyncio.sleep(self.interval)
            await self.probe_once()

    async def probe_once(self) -> None:
        """One round: probe every target (at once), confirm the silent ones."""
        targets = dict(self._targets())
        for node in self.unreachable.keys() - targets.keys():
            del self.unreachable[node]  # its record is gone (or renewed): nothing to report
        if not targets:
            return
        gone = await self._gone(list(targets))
        if gone:
            await asyncio.sleep(self.confirm_after)
            gone = await self._gone(gone)  # twice in a row: not a client between two calls
        moved_by = self._moves_until()
        if gone and moved_by is not None:
            # A server was lost a moment ago: these may be its clients, moving.
            await asyncio.sleep(max(0.0, moved_by - time.monotonic()))
            gone = await self._gone(gone)
        if gone and time.monotonic() < self._counts_from:
            log.debug("probes of %s inconclusive: we just reconnected ourselves", gone)
            gone = []
        found = False
        for node, revision in targets.items():
            if node in gone:
                if self.unreachable.get(node) != revision:
                    log.info(
                        "member %s has no responder: its process is gone (record revision %d)",
                        node,
                        revision,
                    )
                    self.unreachable[node] = revision
                    found = True
            else:
                self.unreachable.pop(node, None)
        if found:
            self._wake()

    def _moves_until(self) -> float | None:
        """Until when the clients of a server the medium just lost may be moving (None: no
        server was lost within the move time)."""
        lost_at = self._server_lost_at()
        if lost_at is None or time.monotonic() - lost_at >= self.move_time:
            return None
        return lost_at + self.move_time

    async def _gone(self, nodes: list[str]) -> list[str]:
        """The ``nodes`` that have no responder now."""
        results = await asyncio.gather(
            *(self._ping(node, self.interval) for node in nodes), return_exceptions=True
        )
        self.probes += len(nodes)
        gone = []
        for node, result in zip(nodes, results, strict=True):
            if isinstance(result, NoSuchNodeError):
                gone.append(node)
            elif isinstance(result, CloisterError):
                # A timeout (alive but slow, or cut off), or our own medium away: the TTL
                # decides those, never a probe.
                log.debug("probe of %s inconclusive: %s", node, result)
            elif isinstance(result, BaseException):
                raise result
        return gone
