"""Cluster-wide scheduled jobs: every tick of a job runs once in the whole cluster.

``await cluster.schedule("report", 300, send_report)`` on every node (or
``cluster.schedule("nightly", "0 3 * * *", ...)`` with a cron expression) runs
``send_report`` every 5 minutes — once for the cluster, not once per node — while nodes
come and go. What Celery beat or a leader-elected cron gives, without a beat process.

How a tick is run exactly once:

- **Ticks are points of wall-clock time**, the same on every node: an interval of ``s``
  seconds ticks at every whole multiple of ``s`` since the Unix epoch (``300`` ticks at
  :00, :05, ...); a cron expression (5 or 6 fields, UTC, read by ``croniter``) ticks
  where it matches.
- **One node owns a job**: the owner of the job's name on the default partitions
  (``cluster.whois(name)``), like any key of the cluster, and only while it is ``ready``
  and its member lease holds. Owners move with the ring, as keys do.
- **A tick is claimed at the medium before it runs**: the job's record ``job.<name>`` in
  the cluster's ``sched`` bucket holds the last tick claimed; the owner claims the next
  one by compare-and-set on the record's revision, then runs the callback. Two nodes that
  both believe they own the job (one paused past its lease) cannot claim the same tick:
  the medium refuses the second compare-and-set. The claim's revision is the run's
  fencing token (:attr:`Tick.fence`: it grows with every tick), for callbacks that
  fence their own side effects.
- **Runs of a job never overlap on a node**: the next tick is claimed when the callback
  of the previous one has returned. A run must end within the failure timeout to be sure
  never to overlap a run on the job's next owner (a run is not interrupted when the
  lease runs out; fence side effects with :attr:`Tick.fence` when runs may be long).
- **A crash loses at most the tick it was running**: a tick claimed by a node killed
  before its callback finished is not run again (at most once per tick; the ±1 of a
  kill). A graceful stop lets the running callback finish first.

Missed ticks. A tick whose owner could not run it in time (a crash failover, a run that
took longer than the interval) is run late, each missed tick once and in order, as long
as it is at most ``grace`` seconds late (default: twice the failure timeout plus one
heartbeat — what a crash failover takes). Ticks later than that were missed while no node
could run the job (the whole cluster down, or not ready): ``missed="once"`` (default)
runs them as one run, of the latest of them (:attr:`Tick.missed` says how many it
covers); ``missed="skip"`` runs none of them and waits for the next tick. A job seen for
the first time starts with the first tick after now: nothing from before it existed is
run.

Every node reports its jobs (:class:`ScheduleInfo`: next run, last tick, who runs it) in
:attr:`Cluster.info <cloister.cluster.Cluster.info>`, and ``cloister status`` shows them.
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import logging
import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

from cloister import wire
from cloister._tasks import Supervisor
from cloister.backends import Entry, KeyValue
from cloister.errors import (
    BackendError,
    ConfigurationError,
    KeyExistsError,
    RevisionMismatchError,
    WireFormatError,
)

log = logging.getLogger("cloister.cluster.schedules")

__all__ = [
    "Cron",
    "Every",
    "Missed",
    "ScheduleInfo",
    "ScheduledJob",
    "Schedules",
    "Tick",
    "Trigger",
    "trigger_of",
]

Missed = Literal["skip", "once"]
MISSED: Final = ("skip", "once")
BUCKET: Final = "sched"
"""The cluster's bucket of job records (``job.<name>``)."""
JOB_NAME: Final = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
_COUNT_CAP: Final = 100_000  # missed ticks counted one by one at most (a cron every second)
_STOP_WAIT: Final = 10.0  # seconds a graceful stop waits for a running callback


# -- triggers --------------------------------------------------------------------------------


class Trigger(ABC):
    """When a job ticks: points of wall-clock time (Unix seconds), the same on every node."""

    @abstractmethod
    def next_after(self, moment: float) -> float:
        """The first tick strictly after ``moment``."""

    @abstractmethod
    def last_until(self, moment: float) -> float:
        """The last tick at or before ``moment``."""

    def count_between(self, first: float, last: float) -> int:
        """How many ticks lie in ``[first, last]`` (``first`` and ``last`` being ticks)."""
        count, tick = 1, first
        while tick < last and count < _COUNT_CAP:
            tick = self.next_after(tick)
            count += 1
        return count

    @property
    @abstractmethod
    def description(self) -> str:
        """The trigger as a user wrote it (for ``status``)."""


@dataclass(frozen=True, slots=True)
class Every(Trigger):
    """Every ``seconds`` (at least 0.01): at each whole multiple of ``seconds`` since the
    Unix epoch. A tick may start up to a thousandth of a period early."""

    seconds: float

    def __post_init__(self) -> None:
        if (
            isinstance(self.seconds, bool)
            or not isinstance(self.seconds, int | float)
            or not math.isfinite(self.seconds)
            or self.seconds < 0.01
        ):
            raise ConfigurationError(
                f"a schedule interval must be a number of seconds >= 0.01, got {self.seconds!r}"
            )

    def _index(self, moment: float) -> int:
        """The number of the last tick at or before ``moment``, where a moment less than
        a thousandth of a period before a tick counts as that tick: a tick read back from
        a record (``n * seconds``, a Unix time of ~10 digits) divides back to ``n``
        whatever its rounding, so it is never its own successor."""
        return math.floor(moment / self.seconds + 1e-3)

    def next_after(self, moment: float) -> float:
        return (self._index(moment) + 1) * self.seconds

    def last_until(self, moment: float) -> float:
        return self._index(moment) * self.seconds

    def count_between(self, first: float, last: float) -> int:
        return round((last - first) / self.seconds) + 1

    @property
    def description(self) -> str:
        return f"every {self.seconds:g}s"


@dataclass(frozen=True, slots=True)
class Cron(Trigger):
    """A cron expression (5 fields, or 6 with seconds last), in UTC, read by ``croniter``."""

    expression: str

    def __post_init__(self) -> None:
        croniter = _croniter()
        if not isinstance(self.expression, str) or not croniter.is_valid(self.expression):
            raise ConfigurationError(
                f"invalid cron expression {self.expression!r}: use 5 fields (minute hour "
                "day month weekday) or 6 (with seconds last), e.g. '*/5 * * * *'"
            )

    def next_after(self, moment: float) -> float:
        start = datetime.datetime.fromtimestamp(moment, tz=datetime.UTC)
        return float(_croniter()(self.expression, start).get_next(float))

    def last_until(self, moment: float) -> float:
        # get_prev is strictly before its start: start just after ``moment``.
        start = datetime.datetime.fromtimestamp(moment + 1e-3, tz=datetime.UTC)
        return float(_croniter()(self.expression, start).get_prev(float))

    @property
    def description(self) -> str:
        return self.expression


def _croniter() -> Any:
    try:
        from croniter import croniter
    except ImportError:  # an optional dependency: only cron expressions need it
        raise ConfigurationError(
            "cron expressions need the croniter package: pip install 'pycloister[cron]' "
            "(or give an interval in seconds)"
        ) from None
    return croniter


When = float | datetime.timedelta | str | Trigger
"""What :meth:`Cluster.schedule` takes as ``when``: seconds, a timedelta, a cron string."""


def trigger_of(when: When) -> Trigger:
    """A trigger from seconds, a ``timedelta``, a cron expression or a :class:`Trigger`."""
    if isinstance(when, Trigger):
        return when
    if isinstance(when, datetime.timedelta):
        return Every(when.total_seconds())
    if isinstance(when, str):
        return Cron(when)
    return Every(when)


# -- what callbacks and status see -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tick:
    """One run of a job, as its callback receives it."""

    name: str
    scheduled: float
    """The tick's time (Unix seconds): when the run was due."""
    node: str
    """The node running it."""
    fence: int
    """The revision of the tick's claim at the medium: grows with every tick of the job,
    whichever node claims it. Store it with a side effect to refuse older runs' writes."""
    missed: int = 0
    """Ticks this run stands for besides its own (``missed="once"`` after an outage)."""


@dataclass(frozen=True, slots=True)
class ScheduleInfo:
    """A job as one node sees it (in :class:`~cloister.cluster.ClusterInfo`)."""

    name: str
    trigger: str
    next_run: float | None
    """Unix time of the next tick this node would run (None until it read the record)."""
    last_tick: float | None
    """The last tick claimed in the cluster, as this node last read it."""
    runs_here: bool
    """True while this node owns the job (its ticks are claimed and run here)."""
    runs: int = 0
    skipped: int = 0
    errors: int = 0

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-able dict (its fields by name)."""
        return asdict(self)

    @classmethod
    def from_wire(cls, data: Any) -> ScheduleInfo:
        """Parse :meth:`to_wire`'s dict; :class:`WireFormatError` if malformed."""
        what = "schedule info"
        if not isinstance(data, dict):
            raise WireFormatError(f"{what}: expected a map, got {type(data).__name__}")
        times = []
        for name in ("next_run", "last_tick"):
            value = data.get(name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise WireFormatError(f"{what}: field {name!r} should be a number or None")
            times.append(None if value is None else float(value))
        return cls(
            name=wire.field(data, "name", str, what),
            trigger=wire.field(data, "trigger", str, what),
            next_run=times[0],
            last_tick=times[1],
            runs_here=bool(data.get("runs_here")),
            runs=wire.field(data, "runs", int, what),
            skipped=wire.field(data, "skipped", int, what),
            errors=wire.field(data, "errors", int, what),
        )


@dataclass(frozen=True, slots=True)
class _Record:
    """The job's record at the medium: the last tick claimed, by whom, when."""

    tick: float
    node: str
    claimed_at: float

    def encode(self) -> bytes:
        return wire.encode({"tick": self.tick, "node": self.node, "at": self.claimed_at})

    @classmethod
    def decode(cls, data: bytes) -> _Record:
        message = wire.decode_map(data, "job record", ("tick", "node", "at"))
        tick = wire.field(message, "tick", (int, float), "job record")
        node = wire.field(message, "node", str, "job record")
        at = wire.field(message, "at", (int, float), "job record")
        if isinstance(tick, bool) or not math.isfinite(tick):
            raise WireFormatError("job record: tick should be a finite number")
        return cls(float(tick), node, float(at))


Callback = Callable[[Tick], Any]


class ScheduledJob:
    """One job registered on this node (what :meth:`Cluster.schedule` returns)."""

    def __init__(
        self,
        name: str,
        trigger: Trigger,
        callback: Callback,
        missed: Missed,
        grace: float,
    ) -> None:
        self.name = name
        self.trigger = trigger
        self.callback = callback
        self.missed = missed
        self.grace = grace
        self.runs = 0
        self.skipped = 0
        self.errors = 0
        #: Claims the medium refused: another node claimed the tick first (it runs it), or
        #: the record changed since this node read it (it reads again).
        self.lost_claims = 0
        self.next_run: float | None = None
        self.last_tick: float | None = None
        self.runs_here = False
        self._task: asyncio.Task[Any] | None = None
        # The record as this node last read or wrote it, kept while it owns the job: no
        # read per look while it waits for the next tick (a stale one only makes the
        # compare-and-set fail, and the record is read again).
        self._known: Entry | None = None

    @property
    def info(self) -> ScheduleInfo:
        """This job as this node sees it now."""
        return ScheduleInfo(
            self.name,
            self.trigger.description,
            self.next_run,
            self.last_tick,
            self.runs_here,
            self.runs,
            self.skipped,
            self.errors,
        )

    def __repr__(self) -> str:
        return f"<ScheduledJob {self.name!r} {self.trigger.description}>"


class Schedules:
    """The jobs of one node: each one's loop, owned by the node's supervisor.

    Args:
        node: this node's name (recorded with each claim).
        open_kv: opens the cluster's ``sched`` bucket.
        may_run: whether this node may claim and run ``name``'s ticks now (ready, its
            lease holding, the owner of ``name``).
        supervisor: the owner of the jobs' tasks (the node's: they die with it).
        poll: seconds between two looks at ownership while a job waits.
        grace: the default ``grace`` of a job (seconds).
    """

    def __init__(
        self,
        node: str,
        open_kv: Callable[[], Awaitable[KeyValue]],
        may_run: Callable[[str], bool],
        supervisor: Supervisor,
        *,
        poll: float,
        grace: float,
    ) -> None:
        self.node = node
        self._open_kv = open_kv
        self._may_run = may_run
        self._supervisor = supervisor
        self.poll = poll
        self.grace = grace
        self.jobs: dict[str, ScheduledJob] = {}
        self._kv: KeyValue | None = None
        self._warned: set[str] = set()

    async def add(
        self,
        name: str,
        when: When,
        callback: Callback,
        *,
        missed: Missed = "once",
        grace: float | None = None,
    ) -> ScheduledJob:
        """Register ``name`` on this node and start following it (see the module doc)."""
        if not isinstance(name, str) or not JOB_NAME.match(name):
            raise ConfigurationError(
                f"invalid job name {name!r}: use 1-100 characters of [A-Za-z0-9_-]"
            )
        if name in self.jobs:
            raise ConfigurationError(
                f"job {name!r} is already scheduled on node {self.node}; unschedule it first"
            )
        if not callable(callback):
            raise ConfigurationError(f"job {name!r}: callback must be callable, got {callback!r}")
        if missed not in MISSED:
            raise ConfigurationError(
                f"job {name!r}: missed must be one of {MISSED}, got {missed!r}"
            )
        grace = self.grace if grace is None else grace
        if isinstance(grace, bool) or not isinstance(grace, int | float) or grace < 0:
            raise ConfigurationError(f"job {name!r}: grace must be seconds >= 0, got {grace!r}")
        job = ScheduledJob(name, trigger_of(when), callback, missed, float(grace))
        if self._kv is None:
            self._kv = await self._open_kv()
        self.jobs[name] = job
        job._task = self._supervisor.spawn(self._follow(job, self._kv), f"job {name}")
        return job

    async def remove(self, name: str) -> bool:
        """Stop following ``name`` on this node (a running callback finishes first); True
        when it was scheduled here. Other nodes that schedule it go on running it."""
        job = self.jobs.pop(name, None)
        if job is None:
            return False
        if job._task is not None:
            job._task.cancel()
            await asyncio.gather(job._task, return_exceptions=True)
        return True

    @property
    def infos(self) -> tuple[ScheduleInfo, ...]:
        """Every job of this node, by name."""
        return tuple(self.jobs[name].info for name in sorted(self.jobs))

    # -- one job's loop ------------------------------------------------------------------------

    async def _follow(self, job: ScheduledJob, kv: KeyValue) -> None:
        key = f"job.{job.name}"
        while True:
            if not self._may_run(job.name):
                job.runs_here = False
                job._known = None  # another node may claim ticks meanwhile
                await asyncio.sleep(self.poll)
                continue
            try:
                await self._step(job, kv, key)
            except BackendError as exc:  # the medium is away: try again, it is not ours
                job._known = None
                log.warning("job %s: %s; trying again", job.name, exc)
                await asyncio.sleep(self.poll)

    async def _step(self, job: ScheduledJob, kv: KeyValue, key: str) -> None:
        """One look at the job: wait for its next tick, or claim and run one."""
        entry = job._known or await kv.get(key, consistent=True)
        job._known = None
        record = None if entry is None else self._read(key, entry.value)
        now = time.time()
        job.runs_here = True
        trigger = job.trigger
        if record is None:
            # First sight (or a malformed record): start from now, run nothing from before.
            start = _Record(trigger.last_until(now), self.node, now).encode()
            try:
                if entry is None:
                    await kv.create(key, start)
                else:
                    await kv.update(key, start, revision=entry.revision)
            except (KeyExistsError, RevisionMismatchError):
                pass  # another node started it meanwhile: read it again
            return
        job.last_tick = record.tick
        due = trigger.next_after(record.tick)
        job.next_run = due
        if due > now:
            job._known = entry
            await asyncio.sleep(min(due - now, self.poll))
            return
        missed = 0
        if now - due > job.grace:  # missed while no node could run it: the policy says
            latest = trigger.last_until(now)
            missed = trigger.count_between(due, latest) - 1
            due = latest
        if not self._may_run(job.name):
            return  # ownership moved while we read: the next owner runs it
        assert entry is not None
        claim = _Record(due, self.node, now).encode()
        try:
            fence = await kv.update(key, claim, revision=entry.revision)
        except RevisionMismatchError:
            job.lost_claims += 1  # claimed by another node (it runs it), or read stale
            return
        job._known = Entry(key, claim, fence)
        job.last_tick = due
        job.next_run = trigger.next_after(due)
        if missed and job.missed == "skip":
            job.skipped += missed + 1
            log.warning(
                "job %s: %d tick(s) up to %s missed while no node could run them: skipped",
                job.name,
                missed + 1,
                _when(due),
            )
            return
        if missed:
            log.warning(
                "job %s: %d tick(s) missed while no node could run them: run once, as %s",
                job.name,
                missed + 1,
                _when(due),
            )
        await self._run(job, Tick(job.name, due, self.node, fence, missed))

    async def _run(self, job: ScheduledJob, tick: Tick) -> None:
        """Run the callback to its end; a cancellation (a graceful stop) waits for it."""
        run = asyncio.ensure_future(self._call(job, tick))
        try:
            await asyncio.shield(run)
        except asyncio.CancelledError:
            # The node stops: let the run finish (bounded), so its tick is not half done.
            done, _ = await asyncio.wait({run}, timeout=_STOP_WAIT)
            if not done:
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
                log.warning(
                    "job %s: tick %s cut short by the stop", job.name, _when(tick.scheduled)
                )
            raise

    async def _call(self, job: ScheduledJob, tick: Tick) -> None:
        callback = job.callback
        try:
            if inspect.iscoroutinefunction(callback):
                await callback(tick)
            else:  # sync callbacks run off the event loop: they may block
                result = await asyncio.to_thread(callback, tick)
                if inspect.isawaitable(result):
                    await result
            job.runs += 1
        except Exception:
            job.errors += 1
            log.exception("job %s: the callback of tick %s raised", job.name, _when(tick.scheduled))

    def _read(self, key: str, data: bytes) -> _Record | None:
        try:
            return _Record.decode(data)
        except WireFormatError as exc:
            if key not in self._warned:
                self._warned.add(key)
                log.warning("malformed job record %s (%s): starting the job afresh", key, exc)
            return None


def _when(moment: float) -> str:
    return datetime.datetime.fromtimestamp(moment, tz=datetime.UTC).isoformat(timespec="seconds")
