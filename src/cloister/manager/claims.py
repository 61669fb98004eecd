"""Partition claims: the fencing tokens the medium checks on every state write.

A manager's inbox partition ``p`` has a claim record ``c.<p>`` in the manager's state
bucket (``mgr-<name>``: the same bucket, so that one guarded write checks it, on NATS
inside one stream). Its value names the node that claimed the partition and the epoch it
claimed it in. A node that settles an epoch claims every partition the epoch gives it and
for which it holds no token, by compare-and-set; the claim's revision is then the
partition's fencing token, and every state write of a worker in that partition carries it
as a :class:`~cloister.backends.Guard`. When another node claims the partition, the
revision moves on and the medium refuses the old holder's writes — however long that node
was paused, whatever its lease says.

The rule a claim follows is :func:`decide` (pure, tested with hypothesis): never
overwrite a claim of a newer epoch, nor another node's claim of the same epoch; overwrite
anything older, and a malformed record. Claim keys never collide with worker keys
(``w`` + base64url: no dots).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from cloister import schema
from cloister.backends import Entry, Guard, KeyValue
from cloister.errors import FencedError, KeyExistsError, RevisionMismatchError, WireFormatError
from cloister.schema import UNSIGNED, Keyring

log = logging.getLogger("cloister.manager.claims")

CLAIM_PREFIX = "c."
_ATTEMPTS = 5  # compare-and-set races lost in a row before a claim is given up for now


def claim_key(partition: int) -> str:
    """The bucket key of ``partition``'s claim."""
    return f"{CLAIM_PREFIX}{partition}"


def is_claim_key(key: str) -> bool:
    """True for a claim record's key (not a worker's)."""
    return key.startswith(CLAIM_PREFIX)


@dataclass(frozen=True, slots=True)
class Claim:
    """Who claimed a partition, in which epoch."""

    node: str
    epoch: int

    def encode(self, keyring: Keyring = UNSIGNED) -> bytes:
        """The record's bytes (msgpack, sealed when ``keyring`` has a secret)."""
        return schema.encode(schema.CLAIM, {"node": self.node, "epoch": self.epoch}, keyring)

    @classmethod
    def decode(cls, data: bytes, keyring: Keyring = UNSIGNED) -> Claim:
        """The claim in ``data``; :class:`WireFormatError` for anything else."""
        record = schema.decode(schema.CLAIM, data, keyring)
        return cls(record.node, record.epoch)


@dataclass(frozen=True, slots=True)
class Malformed:
    """A claim record that does not decode (anyone at a newer epoch may overwrite it)."""

    reason: str


class Verdict(enum.Enum):
    """What a node does with a partition's claim record."""

    CREATE = "create"  # no record: create it
    OVERWRITE = "overwrite"  # older (or malformed, or our own stale one): update it
    STALE = "stale"  # a newer epoch, or another node in ours: do not take the partition


def decide(current: Claim | Malformed | None, node: str, epoch: int) -> Verdict:
    """What ``node``, settling ``epoch``, does with a partition whose record is ``current``.

    Our own record of the same epoch is overwritten too: a token we no longer hold (a
    settle retried, a fence) may still be in a flush of ours, and a new revision ends it.
    """
    if current is None:
        return Verdict.CREATE
    if isinstance(current, Malformed):
        return Verdict.OVERWRITE
    if current.epoch > epoch or (current.epoch == epoch and current.node != node):
        return Verdict.STALE
    return Verdict.OVERWRITE


class PartitionsFencedError(FencedError):
    """The medium refused the state writes of ``partitions`` (another node claimed them).

    Their records were dropped, never retried. ``unavailable`` is the error of the other
    partitions' writes when the medium failed them for a reason that may pass (they stay
    queued), None when those were stored.
    """

    def __init__(
        self, partitions: Collection[int], cause: FencedError, unavailable: Exception | None
    ) -> None:
        super().__init__(f"state of partition(s) {sorted(partitions)} refused: {cause}")
        self.partitions = frozenset(partitions)
        self.unavailable = unavailable


class Claims:
    """This node's claims on a manager's partitions, and their fencing tokens."""

    def __init__(self, kv: KeyValue, node: str, keyring: Keyring = UNSIGNED) -> None:
        self.kv = kv
        self.node = node
        self.keyring = keyring
        self._tokens: dict[int, Guard] = {}  # partition -> the guard of our claim
        self._warned: set[str] = set()  # malformed records logged already

    @property
    def tokens(self) -> dict[int, int]:
        """Partition -> fencing token (the revision of our claim)."""
        return {partition: guard.revision for partition, guard in self._tokens.items()}

    def guard(self, partition: int) -> Guard | None:
        """The guard of a write in ``partition``; None when we hold no claim on it."""
        return self._tokens.get(partition)  # one object per claim: no allocation per write

    def keep_only(self, partitions: Collection[int]) -> None:
        """Forget the tokens of every partition not in ``partitions`` (they moved away)."""
        for partition in [p for p in self._tokens if p not in partitions]:
            del self._tokens[partition]

    def clear(self) -> None:
        """Forget every token (suspended: we claim afresh when we settle again)."""
        self._tokens.clear()

    def drop(self, partition: int, token: int) -> bool:
        """Forget ``partition``'s token if it is still ``token`` (it was refused);
        False when it is gone or newer already (claimed again meanwhile)."""
        held = self._tokens.get(partition)
        if held is None or held.revision != token:
            return False
        del self._tokens[partition]
        return True

    async def claim(self, partitions: Iterable[int], epoch: int) -> set[int]:
        """Claim, concurrently, each of ``partitions`` we hold no token for, as ``epoch``.

        Returns the partitions we may not take (claimed at a newer epoch, or by another
        node in ours). A medium that fails raises (some claims may have been made: their
        tokens are kept and valid); a compare-and-set lost too often raises
        :class:`~cloister.errors.RevisionMismatchError`.
        """
        wanted = sorted(p for p in partitions if p not in self._tokens)
        results = await asyncio.gather(
            *(self._claim(p, epoch) for p in wanted), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        return {p for p, won in zip(wanted, results, strict=True) if won is False}

    async def _claim(self, partition: int, epoch: int) -> bool:
        key = claim_key(partition)
        record = Claim(self.node, epoch).encode(self.keyring)
        for _ in range(_ATTEMPTS):
            entry = await self.kv.get(key, consistent=True)
            current = None if entry is None else self._read(entry)
            verdict = decide(current, self.node, epoch)
            try:
                if verdict is Verdict.STALE:
                    assert isinstance(current, Claim)
                    log.warning(
                        "partition %d is claimed by %s at epoch %d, newer than ours (%s at "
                        "%d): not taking it; this node is behind",
                        partition,
                        current.node,
                        current.epoch,
                        self.node,
                        epoch,
                    )
                    return False
                if verdict is Verdict.CREATE:
                    revision = await self.kv.create(key, record)
                else:
                    assert entry is not None
                    revision = await self.kv.update(key, record, revision=entry.revision)
                self._tokens[partition] = Guard(key, revision)
                return True
            except (KeyExistsError, RevisionMismatchError):
                continue  # somebody claimed it meanwhile: read again, decide again
        raise RevisionMismatchError(
            f"partition {partition}: the claim kept changing under {self.node} "
            f"({_ATTEMPTS} compare-and-set races lost); settling again will retry"
        )

    def _read(self, entry: Entry) -> Claim | Malformed:
        try:
            return Claim.decode(entry.value, self.keyring)
        except WireFormatError as exc:
            if entry.key not in self._warned:  # logged once: every settle reads it again
                self._warned.add(entry.key)
                log.warning("malformed claim %s (%s): overwriting it", entry.key, exc)
            return Malformed(str(exc))
