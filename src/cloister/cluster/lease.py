"""Leases: this node's member record and, when it holds it, the sentry lease.

Both are TTL keys renewed every heartbeat by compare-and-set on the revision we hold. A
node counts its leases from when it *sent* a renewal, with a margin
(:attr:`Lease.fence_after`): it stops claiming anything before the others can see its
record expire, so ring ownership is never shared (self-fencing).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cloister.backends import Backend, KeyValue
from cloister.cluster.control import SENTRY_KEY, ClusterCounters, decode_sentry, encode_sentry
from cloister.cluster.membership import MemberRecord
from cloister.cluster.rpc import encode_request
from cloister.cluster.states import StateMachine
from cloister.errors import (
    BackendError,
    BackendUnavailableError,
    CloisterError,
    KeyExistsError,
    NodeNameTakenError,
    RevisionMismatchError,
    WireFormatError,
)
from cloister.schema import UNSIGNED, Keyring

log = logging.getLogger("cloister.cluster")


async def _within(seconds: float, renewal: Callable[[], Awaitable[None]]) -> None:
    """Run ``renewal()``; give it up after ``seconds`` as the medium being unavailable.

    Takes the function, not a coroutine: one cancelled before it started then leaves no
    coroutine behind that was never awaited.
    """
    try:
        async with asyncio.timeout(seconds):
            await renewal()
    except TimeoutError:
        raise BackendUnavailableError(
            f"renewal unanswered for {seconds:.2f}s; sending it again"
        ) from None


class Lease:
    """This node's member record and sentry lease: join, renew, rejoin, leave."""

    def __init__(
        self,
        cluster: str,
        node: str,
        *,
        heartbeat: float,
        failure_timeout: float,
        machine: StateMachine,
        counters: ClusterCounters,
        wake: Callable[[], None],
        keyring: Keyring = UNSIGNED,
    ) -> None:
        self.cluster = cluster
        self.node = node
        self.keyring = keyring
        self.heartbeat = heartbeat
        self.failure_timeout = failure_timeout
        self._machine = machine
        self._counters = counters
        self._wake = wake
        self.record: MemberRecord | None = None
        self.record_revision: int | None = None
        self.renewed_until = 0.0  # what the last renewal (or join) earned
        self._held_at: float | None = None  # paused at this lapse (see hold)
        self._expired = False  # our record expired and we wrote it anew: a fence all the same
        # The medium lost its data (see medium_lost): our record is written anew, no expiry.
        self._medium_lost = False
        self.on_data_loss: Callable[[str], None] = lambda _why: None
        """Told (synchronously) when our record comes back at a lower revision."""
        self.sentry_revision: int | None = None
        self.sentry_until = 0.0
        self._record_lock = asyncio.Lock()
        self._members_kv: KeyValue | None = None
        self._control_kv: KeyValue | None = None

    @property
    def lease_until(self) -> float:
        """The right to work (the engine's permit): valid until this ``time.monotonic()``.

        While the node is held (a lapse it waits out, see :meth:`hold`) it stays at the
        moment of the lapse even when a renewal lands: work starts again only once the
        control loop resumes the node, after it said so."""
        held = self._held_at
        return self.renewed_until if held is None else held

    def hold(self) -> None:
        """Keep the permit run out (at the lapse) until :meth:`release_hold`."""
        self._held_at = min(self.renewed_until, time.monotonic())

    def release_hold(self) -> None:
        """The node resumed: the permit is the renewals' again."""
        self._held_at = None

    def attach(self, members: KeyValue, control: KeyValue) -> None:
        """The buckets the leases live in (opened by the node on start)."""
        self._members_kv, self._control_kv = members, control

    @property
    def fence_after(self) -> float:
        """How long a renewal keeps a lease valid, counted from when it was sent."""
        # Others expire us failure_timeout after the medium *received* our last renewal; we
        # count from when we *sent* it and stop one heartbeat earlier than that.
        return self.failure_timeout - self.heartbeat

    def sentry_valid(self, now: float) -> bool:
        """True while we hold the sentry lease and it has not run out at ``now``."""
        return self.sentry_revision is not None and now < self.sentry_until

    # -- member record ------------------------------------------------------------------

    async def check_name_free(self, backend: Backend) -> int | None:
        """Refuse a name a live member uses; return the revision of a dead one's record."""
        assert self._members_kv is not None
        existing = await self._members_kv.get(self.node)
        if existing is None:
            return None
        timeout = min(1.0, self.heartbeat)
        try:
            ping = encode_request(
                "cloister.ping", None, self.node, timeout=timeout, keyring=self.keyring
            )
            await backend.request(self.node, ping, timeout=timeout)
        except BackendError:
            raise
        except CloisterError:
            log.info("node %s takes over the record of its crashed predecessor", self.node)
            return existing.revision
        raise NodeNameTakenError(
            f"node name {self.node!r} is already used by a live member of cluster "
            f"{self.cluster!r}; choose another name (or omit it to get a generated one)"
        )

    async def join(self, record: MemberRecord, previous_revision: int | None) -> None:
        """Write our first record (over a crashed predecessor's at ``previous_revision``)."""
        assert self._members_kv is not None
        sent = time.monotonic()
        if previous_revision is None:
            revision = await self._members_kv.create(
                self.node, record.encode(self.keyring), ttl=self.failure_timeout
            )
        else:
            revision = await self._members_kv.update(
                self.node,
                record.encode(self.keyring),
                revision=previous_revision,
                ttl=self.failure_timeout,
            )
        self.record, self.record_revision = record, revision
        self.renewed_until = sent + self.fence_after

    async def write_record(self, **changes: Any) -> None:
        """Renew (and optionally change) our member record; refreshes the lease."""
        assert self._members_kv is not None
        async with self._record_lock:
            assert self.record is not None
            record = self.record.with_(state=str(self._machine.state), **changes)
            sent = time.monotonic()
            try:
                if self.record_revision is None:
                    raise RevisionMismatchError("no record")
                revision = await self._members_kv.update(
                    self.node,
                    record.encode(self.keyring),
                    revision=self.record_revision,
                    ttl=self.failure_timeout,
                )
            except RevisionMismatchError:
                revision = await self._rejoin(record)
            self._medium_lost = False
            self.record, self.record_revision = record, revision
            if not self._expired:  # after an expiry the node fences first (take_expiry)
                self.renewed_until = sent + self.fence_after

    async def _rejoin(self, record: MemberRecord) -> int:
        """Our record vanished (we were expired) or was taken over by another process."""
        assert self._members_kv is not None
        current = await self._members_kv.get(self.node)
        if current is not None:
            try:
                other = MemberRecord.decode(current.value, None, self.keyring)
            except WireFormatError:
                other = None
            if other is not None and other.incarnation != record.incarnation:
                raise NodeNameTakenError(
                    f"another process took over node name {self.node!r} while this one "
                    "was presumed dead (paused or cut off past its lease); this one stops, "
                    "its keys are the new process's now"
                )
            return await self._members_kv.update(
                self.node,
                record.encode(self.keyring),
                revision=current.revision,
                ttl=self.failure_timeout,
            )
        old = self.record_revision
        if self._medium_lost:
            log.info("node %s writes its member record anew: the medium lost it", self.node)
        else:
            log.warning("node %s lost its membership (expired); fencing, then rejoining", self.node)
            # The others dropped us and may have given our keys away meanwhile: whatever
            # we hold in memory is stale even though the new record makes the lease valid.
            self._expired = True
            self._wake()
        revision = await self._members_kv.create(
            self.node, record.encode(self.keyring), ttl=self.failure_timeout
        )
        self._medium_lost = False
        if old is not None and revision < old:
            # Revisions only grow: the bucket was re-created empty (the data loss also
            # suspends the node, so the expiry above changes nothing).
            self.on_data_loss(
                f"the member record of {self.node} came back at revision {revision}, "
                f"below its last one ({old})"
            )
        return revision

    def medium_lost(self) -> None:
        """The medium lost its data: the sentry lease we held is gone with it, and our
        member record is written anew by the next renewal (no expiry is reported)."""
        self._medium_lost = True
        self.sentry_revision = None
        self.sentry_until = 0.0
        self._wake()

    def take_expiry(self) -> bool:
        """True once after our record expired and was written anew (see :meth:`write_record`):
        the control loop treats the step as a lost lease, so the node suspends and settles
        afresh from stored state."""
        expired, self._expired = self._expired, False
        return expired

    async def heartbeat_loop(self) -> None:
        """Renew the leases every heartbeat (sooner again after a failed renewal)."""
        # A renewal stuck on a medium that lost its leader is given up after this long and
        # sent again, so that one reaches the new leader soon after it takes over: records
        # it does not hear of within their TTL from then on expire (measured on R3 NATS).
        patience = self.failure_timeout / 2 - self.heartbeat / 4
        while True:
            # Membership and sentry lease live in different streams, which fail over
            # separately: one renewal never waits for the other.
            renewals = [_within(patience, self.write_record)]
            if self.sentry_revision is not None:
                renewals.append(_within(patience, self.renew_sentry))
            delay = self.heartbeat
            for outcome in await asyncio.gather(*renewals, return_exceptions=True):
                if isinstance(outcome, NodeNameTakenError):
                    self.renewed_until = 0.0
                    raise outcome  # replaced: the node stops (a critical task ended)
                if isinstance(outcome, BackendError):
                    self._counters.heartbeat_failures += 1
                    log.warning("node %s failed to renew its lease: %s", self.node, outcome)
                    delay = self.heartbeat / 4
                elif isinstance(outcome, BaseException):
                    raise outcome  # a bug of ours: the supervisor reports it
            if time.monotonic() >= self.lease_until:
                self._wake()
            await asyncio.sleep(delay)

    # -- sentry lease -------------------------------------------------------------------

    async def claim_sentry(
        self, now: float, over: int | None = None, *, why: str = "a malformed one"
    ) -> bool:
        """Try to win the free sentry lease — or, with ``over``, the one at that revision
        that nobody holds: undecodable (it names nobody), or its holder's process is gone
        (``why`` says which); True if we did."""
        assert self._control_kv is not None
        value = encode_sentry(self.node, self.keyring)
        try:
            if over is None:
                revision = await self._control_kv.create(
                    SENTRY_KEY, value, ttl=self.failure_timeout
                )
            else:
                revision = await self._control_kv.update(
                    SENTRY_KEY, value, revision=over, ttl=self.failure_timeout
                )
                log.warning("node %s claimed the sentry lease over %s", self.node, why)
        except (KeyExistsError, RevisionMismatchError):
            return False
        self.sentry_revision = revision
        self.sentry_until = now + self.fence_after
        log.info("node %s won the sentry lease", self.node)
        return True

    async def renew_sentry(self) -> None:
        """Renew the sentry lease (compare-and-set on the revision we hold)."""
        assert self._control_kv is not None
        if self.sentry_revision is None:
            return  # given up since this renewal was scheduled (see medium_lost)
        sent = time.monotonic()
        try:
            self.sentry_revision = await self._control_kv.update(
                SENTRY_KEY,
                encode_sentry(self.node, self.keyring),
                revision=self.sentry_revision,
                ttl=self.failure_timeout,
            )
            self.sentry_until = sent + self.fence_after
        except RevisionMismatchError:
            current = await self._control_kv.get(SENTRY_KEY, consistent=True)
            if current is not None and current.value == encode_sentry(self.node, self.keyring):
                # A renewal we gave up on landed after all: the lease is still ours.
                self.sentry_revision = await self._control_kv.update(
                    SENTRY_KEY, current.value, revision=current.revision, ttl=self.failure_timeout
                )
                self.sentry_until = sent + self.fence_after
                return
            log.warning("node %s lost the sentry lease", self.node)
            self.sentry_revision = None
            self.sentry_until = 0.0
            self._wake()

    # -- leaving ------------------------------------------------------------------------

    async def leave(self) -> None:
        """Hand the sentry lease over and delete our record, so the others see it at once."""
        assert self._members_kv is not None and self._control_kv is not None
        try:
            if self.sentry_revision is not None:
                await self._delete_if_ours(self._control_kv, SENTRY_KEY, self.sentry_revision)
            await self._delete_if_ours(self._members_kv, self.node, self.record_revision)
        except BackendError as exc:
            log.warning(
                "node %s could not leave cleanly (%s); it will expire instead", self.node, exc
            )

    async def _delete_if_ours(self, kv: KeyValue, key: str, revision: int | None) -> None:
        """Delete our key. A renewal cancelled in flight may have moved its revision on:
        then delete it at its current revision, if it still holds our incarnation."""
        try:
            await kv.delete(key, revision=revision)
            return
        except RevisionMismatchError:
            current = await kv.get(key)
        if current is None:
            return
        try:
            if key == SENTRY_KEY:
                ours = decode_sentry(current.value, self.keyring) == self.node
            else:
                other = MemberRecord.decode(current.value, key, self.keyring)
                ours = self.record is not None and other.incarnation == self.record.incarnation
        except WireFormatError:
            return
        if ours:
            await kv.delete(key, revision=current.revision)
