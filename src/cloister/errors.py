"""The one exception hierarchy of pycloister.

Every error the library raises on purpose derives from :class:`CloisterError`, so an
application can catch them all in one place. Messages say what was wrong and what to do.
"""

from __future__ import annotations

from collections.abc import Mapping


class CloisterError(Exception):
    """Root of every error raised by pycloister."""


class ConfigurationError(CloisterError, ValueError):
    """An argument or setting is invalid (bad consensus, unknown URL scheme, ...)."""


class EmptyRingError(CloisterError, LookupError):
    """A key was looked up on a ring that has no nodes."""


class BackendError(CloisterError):
    """The backend (memory world, NATS, ...) failed or refused an operation."""


class BackendUnavailableError(BackendError):
    """The backend cannot be reached right now (connection lost, node partitioned)."""


class KeyExistsError(BackendError):
    """``create`` found the key already present."""


class RevisionMismatchError(BackendError):
    """A compare-and-set lost: the key changed since the revision given."""


class NodeNameTakenError(CloisterError):
    """Another live member of the cluster already uses this node name."""


class NotRunningError(CloisterError):
    """An operation needs a started cluster or manager."""


class ClusterNotReadyError(CloisterError, TimeoutError):
    """The cluster did not become ready in time."""


class RemoteError(CloisterError):
    """A remote node answered a request with an error."""


class FencedError(CloisterError):
    """This node lost its right to work (its lease ran out): the write or result was
    refused, and the key's new owner does the work instead. Never retried blindly."""


class LeaseLapsedError(CloisterError):
    """This node's lease ran out (its renewals fail: the medium may be electing a leader)
    and was not renewed yet. Writes that depend on owning keys wait: the node pauses, and
    they go out once a renewal lands on its record — or never, when the record expired and
    the keys went to their next owners."""


class HandlerTimeoutError(CloisterError):
    """A callback ran longer than the manager's ``handler_timeout`` and was abandoned
    (``on_handler_timeout="abandon"``): its message is retried, then parked after
    ``max_attempts``; whatever the callback returns later is discarded."""


class FencedWriteError(FencedError):
    """The medium refused a guarded write: a guard key is no longer at the revision the
    writer holds (another node claimed it since). Nothing of the write was stored.

    Not a :class:`BackendError`: retrying cannot succeed, the writer lost the right to
    write what those guards cover. ``failed`` maps each guard key that failed to the
    revision the writer held and the one the medium has (None when it did not say).
    """

    def __init__(
        self, bucket: str, failed: Mapping[str, tuple[int, int | None]], what: str
    ) -> None:
        def state(actual: int | None) -> str:
            return "absent" if actual == 0 else "moved on" if actual is None else f"at {actual}"

        named = "; ".join(
            f"guard {key!r} is {state(actual)}, not at {held}"
            for key, (held, actual) in sorted(failed.items())
        )
        super().__init__(
            f"{what}: refused by the medium ({named} in bucket {bucket!r}): another node "
            "claimed it since, and this node may no longer write what it guards; nothing "
            "was stored, do not retry"
        )
        self.bucket = bucket
        self.failed = dict(failed)


class NotOwnerError(CloisterError):
    """The node asked to handle a key does not own it (the topology moved); retry.

    It crosses the wire as itself (error kind ``not_owner``), so a caller tells "ask the
    new owner" apart from a handler that failed.
    """


class UnknownWorkerError(CloisterError, KeyError):
    """A call or cast named an id that has no worker (add it with ``manager.put``).

    It crosses the wire as itself (error kind ``unknown_worker``), so a caller outside
    the node tells "no such worker" apart from a handler that failed.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown worker"


class UnknownManagerError(CloisterError, LookupError):
    """A client named a manager the cluster does not know: no node ever opened its inbox
    (check the name, or name the manager by its class)."""


class RequestTimeoutError(CloisterError, TimeoutError):
    """A request to another node got no answer in time."""


class NodeBusyError(RemoteError):
    """The node already runs as many requests as it takes at once
    (``Cluster(max_concurrent_requests=...)``) and refused this one at once, without
    running it. Retry after a pause, spread the load, or raise the node's limit."""


class NoSuchNodeError(CloisterError, LookupError):
    """A request was addressed to a node that is not a member (or not reachable)."""


class WireFormatError(CloisterError, ValueError):
    """A message from the wire could not be decoded or does not match its schema."""


class UnknownHandlerError(RemoteError):
    """A request named a handler the remote node has not registered."""


class NodeDiedError(CloisterError):
    """A node stopped on its own: its connection to the medium closed for good, or a task
    it cannot live without (heartbeat, control loop, watches) ended. Its records expire
    on their TTL; restart the process (``cloister node``/``run`` exit non-zero with it)."""


class InvalidIdError(ConfigurationError, TypeError):
    """A worker id the cluster cannot carry: of a type the ring cannot place (anything but
    str, bytes, int and tuples of them), not encodable, or longer than
    :data:`cloister.store.inbox.MAX_ID_BYTES` once encoded. A ``TypeError`` too, as the
    type check always raised."""


class MessageTooLargeError(ConfigurationError):
    """A message or record is larger than the medium stores in one message (the server's
    ``max_payload``, headers included): refused before it was sent."""
