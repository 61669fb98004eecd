"""``Client``: cast to and call a cluster's workers from outside it, without joining.

A client opens its own connection to the cluster's medium under a reserved name
(``_client-<random>``) through an :class:`~cloister.observer.Observer`: it writes no
member record, never takes part in an epoch and never claims the sentry — a web server
or a script that sends to the cluster changes nothing in its topology.

- :meth:`Client.cast` appends to the manager's durable inbox — the very record a node's
  ``manager.cast`` writes — and returns once the medium stored it. Every cast carries a
  message id (generated when none is given) that is kept across every retry, so a cast
  is stored once even when an acknowledgement was lost and the publish repeated.
- :meth:`Client.call` asks the owner of an id, found from the published epoch exactly as
  the nodes place keys (``Topology.placement``); an owner that answers "not mine" (a
  handoff under way) or is gone makes the client read the epoch again and retry, until
  ``timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from cloister._backoff import Backoff
from cloister.client.targets import ManagerRef, ManagerTarget
from cloister.cluster.membership import MemberRecord
from cloister.cluster.placement import Placement
from cloister.cluster.topology import EpochRecord, Topology
from cloister.errors import (
    BackendUnavailableError,
    CloisterError,
    ClusterNotReadyError,
    ConfigurationError,
    EmptyRingError,
    NoSuchNodeError,
    NotOwnerError,
    NotRunningError,
    RequestTimeoutError,
    UnknownHandlerError,
    UnknownManagerError,
)
from cloister.observer import ClusterStatus, Observer
from cloister.store.inbox import Inbox, check_worker_id

__all__ = ["CLIENT_PREFIX", "Client"]

log = logging.getLogger("cloister.client")

T = TypeVar("T")

CLIENT_PREFIX = "_client-"
"""Clients connect under ``_client-<random>``: a name no member is given by default."""

# Between two attempts of a call whose owner moved: short first, the epoch changes fast.
_RETRY = Backoff(0.01, 0.25)
# A refresh of the epoch at most this often, however many calls ask for one at once.
_REFRESH_EVERY = 0.02


class Client:
    """A connection to cluster ``cluster`` on ``backend`` that casts and calls; not a member.

    Args:
        cluster: the cluster's name.
        backend: its backend URL (``nats://host:port[,host:port]``; ``memory://NAME`` for a
            cluster in the same process and event loop, in tests).
        call_timeout: the default ``timeout`` of :meth:`call`, in seconds.
        cast_timeout: the default ``timeout`` of :meth:`cast` and :meth:`cast_many`: how
            long the medium may stay unavailable before a cast fails.
        partitions: the partition count of managers named by name (else it is read from
            the manager's inbox on the medium); a manager named by its class is read from
            the class.
        max_in_flight: casts awaiting the medium's acknowledgement at once (beyond it a
            cast waits for room).
        secret: the cluster secret, as for :class:`~cloister.cluster.Cluster` (None reads
            ``CLOISTER_SECRET``): a cluster that has one ignores unsealed casts and calls.
        backend_options: passed to the backend (``user``, ``password``, ``token``,
            ``creds``, ``tls_ca``, ...), as for a node.

    Use it as ``async with Client("shop", backend=url) as client:`` or call
    :meth:`start` and :meth:`close`.
    """

    def __init__(
        self,
        cluster: str,
        backend: str = "memory://default",
        *,
        call_timeout: float = 5.0,
        cast_timeout: float = 30.0,
        partitions: Mapping[str, int] | None = None,
        max_in_flight: int = 4096,
        secret: str | bytes | Iterable[str | bytes] | None = None,
        **backend_options: Any,
    ) -> None:
        for what, value in (("call_timeout", call_timeout), ("cast_timeout", cast_timeout)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigurationError(f"{what} must be a number of seconds > 0, got {value!r}")
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int):
            raise ConfigurationError(f"max_in_flight must be an int >= 1, got {max_in_flight!r}")
        if max_in_flight < 1:
            raise ConfigurationError(f"max_in_flight must be an int >= 1, got {max_in_flight!r}")
        self.cluster = cluster
        self.name = f"{CLIENT_PREFIX}{secrets.token_hex(4)}"
        self.call_timeout = float(call_timeout)
        self.cast_timeout = float(cast_timeout)
        self.max_in_flight = max_in_flight
        self._given_partitions = dict(partitions or {})
        self._observer = Observer(
            cluster,
            backend,
            request_timeout=self.call_timeout,
            backend_options=backend_options,
            secret=secret,
            name=self.name,
        )
        self._targets: dict[ManagerRef, ManagerTarget] = {}
        self._inboxes: dict[str, Inbox] = {}
        self._opening = asyncio.Lock()
        self._topology: Topology | None = None
        self._read_at = -1.0
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect; :class:`~cloister.errors.BackendError` with the reason if it can't."""
        await self._observer.start()
        self._started = True

    async def close(self) -> None:
        """Disconnect (casts and calls under way fail). Safe to call twice."""
        self._started = False
        self._inboxes.clear()
        await self._observer.close()

    @property
    def backend_url(self) -> str:
        """The backend URL the client was given."""
        return self._observer.backend_url

    # -- casts -------------------------------------------------------------------------

    async def cast(
        self,
        manager: ManagerRef,
        id: Any,
        message: Any,
        msg_id: str | None = None,
        *,
        timeout: float | None = None,
    ) -> str:
        """Store ``message`` for worker ``id`` of ``manager`` in its durable inbox.

        Returns the cast's message id (``msg_id``, or the one generated; empty for a
        manager with ``durable = False``, whose casts go straight to the owner and are
        not stored) once the medium stored it. A cast with the id of one stored within
        the dedup window (120 s) is dropped, so repeating a cast with the id it returned
        never doubles it. The
        message reaches the worker's ``handle_cast`` in order with the other casts to
        ``id``. Raises :class:`~cloister.errors.InvalidIdError` and
        :class:`~cloister.errors.MessageTooLargeError` as ``manager.cast`` does, and the
        backend's error when the medium stays unavailable for ``timeout`` seconds.
        """
        target = self._target(manager)
        if not target.durable:
            await self._route(target, id, "cast", message, timeout)
            return ""
        inbox = await self._inbox(target)
        # Fixed before the first attempt, so every retry carries the same id.
        fixed = inbox.new_msg_id() if msg_id is None else msg_id
        budget = self.cast_timeout if timeout is None else timeout
        await self._while_unavailable(
            lambda: inbox.put(id, message, msg_id=fixed, timeout=budget), budget
        )
        return fixed

    async def cast_many(
        self,
        manager: ManagerRef,
        messages: Iterable[tuple[Any, Any] | tuple[Any, Any, str | None]],
        *,
        timeout: float | None = None,
    ) -> list[str]:
        """Cast every ``(id, message)`` or ``(id, message, msg_id)``, pipelined.

        Every message is checked before any is sent; returns their message ids, in order,
        once the medium stored them all. Messages to one id keep their order.
        """
        target = self._target(manager)
        batch = [_triple(item) for item in messages]
        if not target.durable:
            for worker_id, message, _ in batch:
                await self._route(target, worker_id, "cast", message, timeout)
            return ["" for _ in batch]
        inbox = await self._inbox(target)
        # The ids are fixed before the first attempt, so every retry carries the same ones.
        fixed = [
            (key, message, inbox.new_msg_id() if msg_id is None else msg_id)
            for key, message, msg_id in batch
        ]
        budget = self.cast_timeout if timeout is None else timeout
        await self._while_unavailable(lambda: inbox.put_many(fixed, timeout=budget), budget)
        return [msg_id for _, _, msg_id in fixed]

    async def _inbox(self, target: ManagerTarget) -> Inbox:
        inbox = self._inboxes.get(target.name)
        if inbox is not None:
            return inbox
        async with self._opening:
            inbox = self._inboxes.get(target.name)
            if inbox is None:
                inbox = await self._open_inbox(target)
                self._inboxes[target.name] = inbox
        return inbox

    async def _open_inbox(self, target: ManagerTarget) -> Inbox:
        backend = self._observer.backend
        if target.partitions is None:  # named by name: never create a log for a typo
            found = await Inbox.attach(backend, target.name, max_in_flight=self.max_in_flight)
            if found is None:
                raise UnknownManagerError(
                    f"cluster {self.cluster!r} has no manager {target.name!r}: no node has "
                    "opened its inbox. Check the name (it is the class's `name`, else the "
                    "class name), start a node that runs it, or name it by its class"
                )
            return found
        inbox = Inbox(
            backend, target.name, partitions=target.partitions, max_in_flight=self.max_in_flight
        )
        await inbox.open()
        return inbox

    async def _partitions(self, target: ManagerTarget) -> int:
        if target.partitions is not None:
            return target.partitions
        return (await self._inbox(target)).partitions

    async def _while_unavailable(self, op: Callable[[], Awaitable[T]], budget: float) -> T:
        """``op()``, again while the medium is unavailable, for up to ``budget`` seconds
        (``op`` must be safe to repeat: a cast carries its message id every time)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        delays = _RETRY.delays()
        while True:
            try:
                return await op()
            except BackendUnavailableError as exc:
                delay = next(delays)
                if not self._started or loop.time() + delay > deadline:
                    raise
                log.debug("client %s: medium unavailable, casting again: %s", self.name, exc)
                await asyncio.sleep(delay)

    # -- calls -------------------------------------------------------------------------

    async def call(
        self, manager: ManagerRef, id: Any, message: Any, *, timeout: float | None = None
    ) -> Any:
        """Ask worker ``id`` of ``manager`` (its ``handle_call``) and return its reply.

        Raises :class:`~cloister.errors.UnknownWorkerError` when the owner has no such
        worker, :class:`~cloister.errors.ClusterNotReadyError` when the cluster has
        published no epoch (or nobody to place ``id`` on) within ``timeout``,
        :class:`~cloister.errors.RequestTimeoutError` when the owner did not answer in
        time or ownership kept moving, :class:`~cloister.errors.UnknownManagerError` for
        a manager named by a name no node ever started,
        :class:`~cloister.errors.UnknownHandlerError` when no node answers for
        ``manager``, and :class:`~cloister.errors.RemoteError` when the handler failed.
        """
        return await self._route(self._target(manager), id, "call", message, timeout)

    async def _route(
        self, target: ManagerTarget, worker_id: Any, verb: str, message: Any, timeout: float | None
    ) -> Any:
        check_worker_id(worker_id)
        self._require_started()
        budget = self.call_timeout if timeout is None else timeout
        handler = f"cloister.manager.{target.name}.{verb}"
        body = {"id": worker_id, "m": message}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        delays = _RETRY.delays()
        refresh = False
        partitions = await self._partitions(target)
        while True:
            placement = await self._placement(target, partitions, refresh)
            try:
                if placement is None:
                    raise ClusterNotReadyError(
                        f"cluster {self.cluster!r} has published no epoch yet: no node to "
                        f"send the {verb} to"
                    )
                owner = placement.owner_of(worker_id)
                remaining = max(deadline - loop.time(), 0.001)
                return await self._observer.ask(owner, handler, body, timeout=remaining)
            except RequestTimeoutError as exc:
                raise RequestTimeoutError(
                    f"worker {worker_id!r:.80} of manager {target.name}: {exc} (the {verb} "
                    f"took longer than {budget:g}s; it may still run)"
                ) from None
            except (NotOwnerError, NoSuchNodeError, UnknownHandlerError) as exc:
                last: CloisterError = exc  # the owner moved, is gone, or is still starting
            except (ClusterNotReadyError, EmptyRingError) as exc:
                last = exc
            delay = next(delays)
            if loop.time() + delay > deadline:
                raise _gave_up(target, worker_id, verb, budget, last) from last
            refresh = True
            await asyncio.sleep(delay)

    async def _placement(
        self, target: ManagerTarget, partitions: int, refresh: bool
    ) -> Placement | None:
        """Where ``target``'s keys live in the published epoch (read again on ``refresh``)."""
        topology = self._topology
        now = asyncio.get_running_loop().time()
        if topology is None or (refresh and now - self._read_at >= _REFRESH_EVERY):
            self._read_at = now
            record = await self._observer.epoch()
            if record is not None and (topology is None or topology.epoch != record.epoch):
                topology = self._topology = Topology.from_record(record)
        if topology is None:
            return None
        return topology.placement(self.name, partitions, target.group, strict=False)

    # -- the cluster -------------------------------------------------------------------

    async def status(self) -> ClusterStatus:
        """What ``cloister status --json`` shows (``status().to_json()`` is that document)."""
        self._require_started()
        return await self._observer.status()

    async def members(self) -> dict[str, MemberRecord]:
        """The member records by node name (this client is never one of them)."""
        self._require_started()
        return await self._observer.members()

    async def epoch(self) -> EpochRecord | None:
        """The published epoch record, or None before the first one."""
        self._require_started()
        return await self._observer.epoch()

    # -- internals ---------------------------------------------------------------------

    def _target(self, manager: ManagerRef) -> ManagerTarget:
        found = self._targets.get(manager)
        if found is None:
            found = self._targets[manager] = ManagerTarget.of(manager, self._given_partitions)
        return found

    def _require_started(self) -> None:
        if not self._started:
            raise NotRunningError(
                f"client of cluster {self.cluster!r} is not connected: use "
                "`async with Client(...)` or await client.start()"
            )


def _triple(item: Sequence[Any]) -> tuple[Any, Any, str | None]:
    if isinstance(item, tuple) and len(item) == 3:
        return item[0], item[1], item[2]
    if isinstance(item, tuple) and len(item) == 2:
        return item[0], item[1], None
    raise ConfigurationError(
        f"cast_many takes (id, message) or (id, message, msg_id) tuples, got {item!r:.80}"
    )


def _gave_up(
    target: ManagerTarget, worker_id: Any, verb: str, budget: float, last: CloisterError
) -> CloisterError:
    """The error a call raises once its time ran out, typed by what kept it from an answer."""
    where = f"worker {worker_id!r:.80} of manager {target.name}"
    if isinstance(last, ClusterNotReadyError | EmptyRingError):
        return ClusterNotReadyError(
            f"{where}: the cluster had no node to run it for {budget:g}s ({last}); start "
            "the nodes, or check the cluster name"
        )
    if isinstance(last, UnknownHandlerError):
        return UnknownHandlerError(
            f"{where}: no node answered for manager {target.name!r} within {budget:g}s "
            f"({last}); check the manager's name and that the nodes run it"
        )
    return RequestTimeoutError(
        f"{where}: ownership kept moving; no owner accepted the {verb} within {budget:g}s "
        f"(last: {last})"
    )
