"""Crash detection ahead of the member TTL: probing members for "no responders".

When a process dies (``kill -9``, a crash), the medium sees its connection close at once:
a request to the subject only that process served fails with "no responders"
(:class:`~cloister.errors.NoSuchNodeError`) right away, long before its member record's
TTL runs out. The :class:`Prober` asks ``cloister.ping`` of the members it watches every
``interval`` seconds; a member that has no responder on two probes in a row is reported
*unreachable*, with the revision of its member record then. The second probe comes
:data:`CONFIRM_AFTER` seconds, ``interval / 2`` or the medium's move time after the first,
whichever is longest (``Backend.reconnect_spread``: a connection that moves to another
server, its own being lost, has no responder for that long). For a while after the
prober's own connection came back (the return spread: the others may be returning to
a restarted server, up to the longest reconnect delay apart), no probe counts.
:func:`~cloister.cluster.control.decide` turns that fact into deleting the record by
compare-and-set — an early version of what the TTL would do — so that the sentry
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
        self.return_spread = 0.0
        """How long after our own reconnect no probe counts."""
        self._counts_from = 0.0  # time.monotonic() from which probes count again
        self.unreachable: dict[str, int] = {}
        """Members found gone: node -> the revision of its member record when probed."""
        self.probes = 0
        self._ping = ping
        self._targets = targets
        self._wake = wake

    def allow_for(self, spread: tuple[float, float]) -> None:
        """Allow for the medium's ``Backend.reconnect_spread`` (move, return)."""
        move, self.return_spread = spread
        self.confirm_after = max(CONFIRM_AFTER, self.interval / 2, move)

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
            gone = await self._gone(gone)  # twice in a row: not a connection on the move
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
