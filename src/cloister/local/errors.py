"""Errors raised by local servers and processes (:mod:`cloister.local`, also
re-exported by the test harness :mod:`cloister.testing`).

They derive from :class:`cloister.CloisterError` like every other error of the library.
"""

from __future__ import annotations

from cloister.errors import CloisterError


class HarnessError(CloisterError):
    """Root of the errors raised by :mod:`cloister.local` (and so :mod:`cloister.testing`)."""


class NatsServerNotFoundError(HarnessError, FileNotFoundError):
    """No ``nats-server`` binary (2.11 or newer) could be found."""


class ServerStartError(HarnessError, RuntimeError):
    """A ``nats-server`` exited or did not become ready in time.

    The message ends with the tail of the server's log file. ``address_in_use`` tells
    that a port was taken by someone else (starting again on other ports may work).
    """

    def __init__(self, message: str, *, address_in_use: bool = False) -> None:
        super().__init__(message)
        self.address_in_use = address_in_use


class ClusterFormationError(HarnessError, TimeoutError):
    """A NATS cluster did not elect a JetStream meta leader with all peers current in time."""


class LineNotFoundError(HarnessError, TimeoutError):
    """A child process did not print the awaited line (timed out or exited first).

    The message ends with the last lines the process printed.
    """
