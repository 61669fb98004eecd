"""Look at a cluster from the outside, without joining it.

An :class:`Observer` opens the cluster's backend under a reserved name (``_observer-...``)
and never writes: it reads the member records (``members`` bucket), the published epoch
and the sentry lease (``control`` bucket), and asks every member for its own view through
the built-in ``cloister.info`` handler, and for its manager's figures through
``cloister.manager.status`` (answered by nodes that ``cloister run`` an application; see
:class:`ManagerStatus`). A member that does not answer (dead, partitioned,
slow) is reported with the error instead of failing the whole picture. ``cloister status``
is built on it::

    async with Observer("shop", "nats://127.0.0.1:4222") as observer:
        status = await observer.status()
        print(status.to_json())
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from cloister import wire
from cloister._tasks import Supervisor
from cloister.backends import Backend, KeyValue, KVOp, open_backend
from cloister.cluster.control import read_control, read_members
from cloister.cluster.info import ClusterInfo, DataLoss
from cloister.cluster.membership import MemberRecord
from cloister.cluster.rpc import decode_reply, encode_request, failed
from cloister.cluster.topology import EpochRecord, Topology
from cloister.errors import (
    BackendError,
    CloisterError,
    NotRunningError,
    UnknownHandlerError,
    WireFormatError,
)
from cloister.schema import Keyring

__all__ = [
    "MANAGER_STATUS_HANDLER",
    "OBSERVER_PREFIX",
    "ClusterStatus",
    "ManagerStatus",
    "MemberStatus",
    "Observer",
]

log = logging.getLogger("cloister.observer")

OBSERVER_PREFIX = "_observer-"
"""Observers connect under ``_observer-<random>``: a name no member is given by default."""

MANAGER_STATUS_HANDLER = "cloister.manager.status"
"""The handler a node running an application answers with its :class:`ManagerStatus`."""


@dataclass(frozen=True, slots=True)
class ManagerStatus:
    """What a node's manager reports: its live workers, counters and inbox depth.

    ``workers`` counts the workers live on that node (the ids it owns); ``inbox_depth``
    is the number of inbox messages stored and not yet handled — the manager's whole
    inbox, over every node — or None when the manager has no inbox (standalone, or
    ``durable = False``) or it could not be read.
    """

    manager: str
    state: str
    workers: int
    counters: dict[str, int]
    inbox_depth: int | None

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict with stable keys (the same as :meth:`to_wire`)."""
        return self.to_wire()

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-able dict (the handler's answer)."""
        return {
            "manager": self.manager,
            "state": self.state,
            "workers": self.workers,
            "counters": dict(self.counters),
            "inbox_depth": self.inbox_depth,
        }

    @classmethod
    def from_wire(cls, data: Any) -> ManagerStatus:
        """Parse :meth:`to_wire`'s dict; :class:`WireFormatError` if malformed."""
        what = "manager status"
        if not isinstance(data, dict):
            raise WireFormatError(f"{what}: expected a map, got {type(data).__name__}")
        counters = wire.field(data, "counters", dict, what)
        depth = data.get("inbox_depth")
        if depth is not None and not isinstance(depth, int):
            raise WireFormatError(f"{what}: field 'inbox_depth' should be int or None")
        return cls(
            manager=wire.field(data, "manager", str, what),
            state=wire.field(data, "state", str, what),
            workers=wire.field(data, "workers", int, what),
            counters={str(k): int(v) for k, v in counters.items() if isinstance(v, int)},
            inbox_depth=depth,
        )


@dataclass(frozen=True, slots=True)
class MemberStatus:
    """One member as the observer sees it: its record, its own answer, its ring share.

    ``record`` is None for a member that the published epoch still lists but whose record
    is gone (it crashed or left and the sentry has not published the change yet); ``info``
    is None when the member did not answer (``error`` says why).
    """

    node: str
    record: MemberRecord | None
    info: ClusterInfo | None
    error: str | None
    share: float
    in_epoch: bool
    heartbeat_age: float | None
    manager: ManagerStatus | None = None
    """The node's manager, if it runs one and answered (``cloister run``); else None."""

    @property
    def state(self) -> str:
        """The state the member answered with; ``unreachable`` if it did not answer (its
        record still stands), ``gone`` if its record is gone too."""
        if self.info is not None:
            return str(self.info.state)
        return "unreachable" if self.record is not None else "gone"

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict with stable keys (``None`` where unknown)."""
        info, record = self.info, self.record
        return {
            "node": self.node,
            "state": self.state,
            "reachable": info is not None,
            "epoch": None if info is None else info.epoch,
            "acked": None if record is None else record.acked,
            "recorded_state": None if record is None else record.state,
            "sentry": None if info is None else info.is_sentry,
            "share": round(self.share, 6),
            "in_epoch": self.in_epoch,
            "fingerprint": None if info is None else info.fingerprint,
            "members": None if info is None else list(info.members),
            "consensus": None if info is None else info.consensus,
            "weight": None if record is None else record.weight,
            "groups": None if record is None else list(record.groups),
            "started_at": None if record is None else record.started_at,
            "heartbeat_age": None if self.heartbeat_age is None else round(self.heartbeat_age, 3),
            "error": self.error,
            "workers": None if self.manager is None else self.manager.workers,
            "inbox_depth": None if self.manager is None else self.manager.inbox_depth,
            "manager": None if self.manager is None else self.manager.to_json(),
            "data_losses": None if info is None else info.data_losses,
            "last_data_loss": (
                None
                if info is None or info.last_data_loss is None
                else info.last_data_loss.to_wire()
            ),
            "rebuilding": None if info is None else info.rebuilding,
            "schedules": None if info is None else [job.to_wire() for job in info.schedules],
        }


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    """A snapshot of a cluster: the published epoch, the lease, every member."""

    cluster: str
    backend: str
    epoch: EpochRecord | None
    sentry_lease: str | None
    members: tuple[MemberStatus, ...]
    taken_at: float
    problems: tuple[str, ...] = field(default=())

    @property
    def fingerprint(self) -> str | None:
        """The ring fingerprint of the published epoch."""
        return None if self.epoch is None else Topology.from_record(self.epoch).ring.fingerprint

    @property
    def live(self) -> tuple[MemberStatus, ...]:
        """The members with a record (the others are gone but still in the epoch)."""
        return tuple(m for m in self.members if m.record is not None)

    @property
    def data_loss(self) -> DataLoss | None:
        """The latest time a member found the medium had lost its data (None: never)."""
        losses = [m.info.last_data_loss for m in self.members if m.info is not None]
        known = [loss for loss in losses if loss is not None]
        return max(known, key=lambda loss: loss.at) if known else None

    @property
    def schedules(self) -> list[dict[str, Any]]:
        """Every cluster-wide job the members follow, by name: its trigger, next run and
        last tick (Unix seconds) as its owner reports them, and the owner (``node``; None
        while no member runs it — no owner ready, or none answered)."""
        found: dict[str, dict[str, Any]] = {}
        for member in self.members:
            for job in () if member.info is None else member.info.schedules:
                seen = found.get(job.name)
                if seen is None or (job.runs_here and seen["node"] is None):
                    found[job.name] = {
                        "name": job.name,
                        "trigger": job.trigger,
                        "next_run": job.next_run,
                        "last_tick": job.last_tick,
                        "node": member.node if job.runs_here else None,
                    }
        return [found[name] for name in sorted(found)]

    def to_json(self) -> dict[str, Any]:
        """A JSON-able document with stable keys: what ``cloister status --json`` prints."""
        loss = self.data_loss
        return {
            "data_loss": None if loss is None else loss.to_wire(),
            "cluster": self.cluster,
            "backend": self.backend,
            "epoch": None if self.epoch is None else self.epoch.epoch,
            "sentry": None if self.epoch is None else self.epoch.sentry,
            "sentry_lease": self.sentry_lease,
            "fingerprint": self.fingerprint,
            "epoch_members": None if self.epoch is None else sorted(self.epoch.members),
            "members": [member.to_json() for member in self.members],
            "schedules": self.schedules,
            "taken_at": self.taken_at,
            "problems": list(self.problems),
        }


class Observer:
    """A read-only view of cluster ``cluster`` on ``backend``; not a member.

    Args:
        cluster: the cluster's name.
        backend: its backend URL (``nats://...``; ``memory://NAME`` in the same process).
        request_timeout: how long each member may take to answer ``cloister.info``.
        backend_options: passed to the backend (credentials, TLS, ...).
        secret: the cluster secret, as for :class:`~cloister.cluster.Cluster` (None reads
            ``CLOISTER_SECRET``): needed to read the records of a cluster that has one.
        name: the connection's name on the medium (default ``_observer-<random>``); it
            must not be a member's name — it serves nothing and writes no record.
    """

    def __init__(
        self,
        cluster: str,
        backend: str = "memory://default",
        *,
        request_timeout: float = 2.0,
        backend_options: dict[str, Any] | None = None,
        secret: str | bytes | Iterable[str | bytes] | None = None,
        name: str | None = None,
    ) -> None:
        self.cluster = cluster
        self.keyring = Keyring.resolve(secret)
        self.backend_url = backend
        self.name = name or f"{OBSERVER_PREFIX}{secrets.token_hex(4)}"
        self.request_timeout = request_timeout
        self._backend_options = dict(backend_options or {})
        self._backend: Backend | None = None
        self._members: KeyValue | None = None
        self._control: KeyValue | None = None
        self._supervisor = Supervisor(f"observer {cluster}")
        self._last_beat: dict[str, float] = {}

    async def __aenter__(self) -> Observer:
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
        """Connect and open the cluster's buckets; raises :class:`BackendError` if it can't."""
        backend = open_backend(self.backend_url, self.cluster, self.name, **self._backend_options)
        self._backend = backend
        backend.keyring = self.keyring
        try:
            await backend.connect()
            # Same bucket settings as the members use, so that opening never conflicts.
            self._members = await backend.kv("members", ttl_keys=True)
            self._control = await backend.kv("control", ttl_keys=True)
            watching = asyncio.Event()
            self._supervisor.spawn(self._watch_heartbeats(watching), "heartbeat watch")
            await watching.wait()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Disconnect. Safe to call twice."""
        await self._supervisor.close()
        if self._backend is not None:
            await self._backend.close()
            self._backend = None

    async def members(self) -> dict[str, MemberRecord]:
        """Every member record, by node name (malformed ones are skipped and logged)."""
        records, _ = await self._read_members()
        return records

    async def epoch(self) -> EpochRecord | None:
        """The published epoch record, or None before the first one."""
        epoch, _, _ = await self._read_control()
        return epoch

    async def sentry_lease(self) -> str | None:
        """The node holding the sentry lease right now, or None."""
        _, holder, _ = await self._read_control()
        return holder

    async def info(self, node: str, *, timeout: float | None = None) -> ClusterInfo:
        """``node``'s own view (its ``cloister.info``); raises the error it produced."""
        return ClusterInfo.from_wire(await self.ask(node, "cloister.info", timeout=timeout))

    async def manager_status(
        self, node: str, *, timeout: float | None = None, depth: bool = True
    ) -> ManagerStatus | None:
        """``node``'s manager (``cloister.manager.status``); None if it runs none.

        With ``depth=False`` its ``inbox_depth`` is left out (None): finding it asks the
        medium about every partition the node consumes, too much for a poll of the
        counters several times a second.

        Raises the error the node produced (unreachable, timeout, malformed answer).
        """
        try:
            answer = await self.ask(
                node, MANAGER_STATUS_HANDLER, None if depth else {"depth": False}, timeout=timeout
            )
        except UnknownHandlerError:
            return None
        return ManagerStatus.from_wire(answer)

    async def ask(
        self, node: str, handler: str, payload: Any = None, *, timeout: float | None = None
    ) -> Any:
        """Run the named ``handler`` on ``node`` with ``payload`` and return its answer.

        Raises what the node answered, typed (:class:`NotOwnerError`,
        :class:`UnknownHandlerError`, ``UnknownWorkerError``, :class:`RemoteError` ...), or
        why it could not be asked (:class:`NoSuchNodeError`, :class:`RequestTimeoutError`).
        ``timeout`` defaults to ``request_timeout``.
        """
        backend = self.backend
        timeout = self.request_timeout if timeout is None else timeout
        try:
            reply = await backend.request(
                node,
                encode_request(handler, payload, self.name, timeout=timeout, keyring=self.keyring),
                timeout=timeout,
            )
        except Exception as exc:
            result = failed(node, exc)
        else:
            result = decode_reply(node, reply, self.keyring)
        return result.unwrap()

    async def infos(self, nodes: list[str]) -> dict[str, ClusterInfo | CloisterError]:
        """``info`` of every node in ``nodes`` at once; an error in place of a failed one."""

        async def one(node: str) -> ClusterInfo | CloisterError:
            try:
                return await self.info(node)
            except CloisterError as exc:
                return exc

        answers = await asyncio.gather(*(one(node) for node in nodes))
        return dict(zip(nodes, answers, strict=True))

    async def managers(
        self, nodes: list[str], *, depth: bool = True
    ) -> dict[str, ManagerStatus | None]:
        """``manager_status`` of every node at once (with or without ``depth``); None for
        no manager or no answer."""

        async def one(node: str) -> ManagerStatus | None:
            try:
                return await self.manager_status(node, depth=depth)
            except CloisterError as exc:
                log.debug("no manager status from %s: %s", node, exc)
                return None

        answers = await asyncio.gather(*(one(node) for node in nodes))
        return dict(zip(nodes, answers, strict=True))

    async def status(self) -> ClusterStatus:
        """Everything at once: records, epoch, lease, and every member's own answer."""
        (records, problems), (epoch, holder, control_problems) = await asyncio.gather(
            self._read_members(), self._read_control()
        )
        in_epoch = set() if epoch is None else set(epoch.members)
        names = sorted(set(records) | in_epoch)
        live = [n for n in names if n in records]
        answers, managers = await asyncio.gather(self.infos(live), self.managers(live))
        shares = {} if epoch is None else Topology.from_record(epoch).ring.shares()
        now = time.monotonic()
        members = []
        for name in names:
            answer = answers.get(name)
            error = str(answer) if isinstance(answer, CloisterError) else None
            if name not in records:
                error = "member record gone (crashed or left); not yet out of the epoch"
            beat = self._last_beat.get(name)
            members.append(
                MemberStatus(
                    node=name,
                    record=records.get(name),
                    info=answer if isinstance(answer, ClusterInfo) else None,
                    error=error,
                    share=shares.get(name, 0.0),
                    in_epoch=name in in_epoch,
                    heartbeat_age=None if beat is None else now - beat,
                    manager=managers.get(name),
                )
            )
        return ClusterStatus(
            cluster=self.cluster,
            backend=self.backend.url,
            epoch=epoch,
            sentry_lease=holder,
            members=tuple(members),
            taken_at=time.time(),
            problems=tuple(problems + control_problems),
        )

    # -- internals ----------------------------------------------------------------------------

    @property
    def backend(self) -> Backend:
        """The connected backend (the observer's own connection; it is no member's).

        :class:`NotRunningError` before :meth:`start` and after :meth:`close`.
        """
        if self._backend is None:
            raise NotRunningError("the observer is not connected; await observer.start() first")
        return self._backend

    async def _read_members(self) -> tuple[dict[str, MemberRecord], list[str]]:
        assert self._members is not None
        records, errors = await read_members(self._members, self.keyring)
        problems: list[str] = []
        for name, exc in errors.items():
            log.warning("ignoring the malformed member record %r: %s", name, exc)
            problems.append(f"malformed member record {name!r}: {exc}")
        return records, problems

    async def _read_control(self) -> tuple[EpochRecord | None, str | None, list[str]]:
        assert self._control is not None
        snapshot = await read_control(self._control, self.keyring)
        problems: list[str] = []
        for exc in (snapshot.epoch_error, snapshot.sentry_error):
            if exc is not None:
                log.warning("malformed control record: %s", exc)
                problems.append(str(exc))
        return snapshot.epoch, snapshot.sentry, problems

    async def _watch_heartbeats(self, watching: asyncio.Event) -> None:
        """Note when each member last renewed its record (for ``heartbeat_age``)."""
        assert self._members is not None
        while True:
            try:
                async with self._members.watch() as events:
                    watching.set()
                    async for event in events:
                        if event.op is KVOp.PUT:
                            self._last_beat[event.key] = time.monotonic()
                        else:
                            self._last_beat.pop(event.key, None)
            except BackendError as exc:
                log.debug("observer's members watch interrupted: %s", exc)
                watching.set()
                await asyncio.sleep(0.5)
