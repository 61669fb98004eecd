"""A snapshot of one node's view of the cluster, as listeners and ``states()`` see it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from cloister import wire
from cloister.cluster.schedules import ScheduleInfo
from cloister.cluster.states import State
from cloister.errors import WireFormatError


@dataclass(frozen=True, slots=True)
class DataLoss:
    """The last time a node found that the medium had lost its data."""

    why: str
    """The sign it was found by (streams re-created, a record gone, a revision gone back)."""
    at: float
    """When (``time.time()``)."""
    epoch: int
    """The epoch the node had adopted then; it settles again on a later one."""

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-able dict."""
        return {"why": self.why, "at": self.at, "epoch": self.epoch}

    @classmethod
    def from_wire(cls, data: Any) -> DataLoss:
        """Parse :meth:`to_wire`'s output; :class:`WireFormatError` if malformed."""
        what = "data loss"
        if not isinstance(data, dict):
            raise WireFormatError(f"{what}: expected a map, got {type(data).__name__}")
        return cls(
            why=wire.field(data, "why", str, what),
            at=float(wire.field(data, "at", (int, float), what)),
            epoch=wire.field(data, "epoch", int, what),
        )


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    """One node's view: who it is, its state, and the topology it has adopted."""

    cluster: str
    node: str
    state: State
    members: tuple[str, ...]
    epoch: int
    consensus: int
    sentry: str | None
    is_sentry: bool
    started_at: float
    fingerprint: str
    groups: tuple[str, ...] = ()
    data_losses: int = 0
    """Times this node found the medium had lost its data."""
    last_data_loss: DataLoss | None = None
    rebuilding: bool = False
    """True from a data loss until the node settled on an epoch published after it."""
    schedules: tuple[ScheduleInfo, ...] = ()
    """The cluster-wide jobs this node follows (``cluster.schedule``), with next runs."""

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-able dict (for ``states()`` and ``cloister status``)."""
        data = asdict(self)
        data["state"] = str(self.state)
        data["members"] = list(self.members)
        data["groups"] = list(self.groups)
        data["last_data_loss"] = (
            None if self.last_data_loss is None else self.last_data_loss.to_wire()
        )
        data["schedules"] = [job.to_wire() for job in self.schedules]
        return data

    @classmethod
    def from_wire(cls, data: Any) -> ClusterInfo:
        """Parse what :meth:`to_wire` produced; :class:`WireFormatError` if malformed."""
        if not isinstance(data, dict):
            raise WireFormatError(f"cluster info: expected a map, got {type(data).__name__}")
        what = "cluster info"
        try:
            state = State(wire.field(data, "state", str, what))
        except ValueError as exc:
            raise WireFormatError(f"{what}: unknown state {data.get('state')!r}") from exc
        loss = data.get("last_data_loss")
        sentry = data.get("sentry")
        if sentry is not None and not isinstance(sentry, str):
            raise WireFormatError(f"{what}: field 'sentry' should be str or None")
        return cls(
            cluster=wire.field(data, "cluster", str, what),
            node=wire.field(data, "node", str, what),
            state=state,
            members=tuple(str(m) for m in wire.field(data, "members", list, what)),
            epoch=wire.field(data, "epoch", int, what),
            consensus=wire.field(data, "consensus", int, what),
            sentry=sentry,
            is_sentry=bool(data.get("is_sentry")),
            started_at=float(wire.field(data, "started_at", (int, float), what)),
            fingerprint=wire.field(data, "fingerprint", str, what),
            groups=tuple(str(g) for g in data.get("groups", ())),
            # Absent from nodes of older versions: none seen.
            data_losses=wire.field(data, "data_losses", int, what) if "data_losses" in data else 0,
            last_data_loss=None if loss is None else DataLoss.from_wire(loss),
            rebuilding=bool(data.get("rebuilding")),
            schedules=tuple(ScheduleInfo.from_wire(job) for job in data.get("schedules", ())),
        )
