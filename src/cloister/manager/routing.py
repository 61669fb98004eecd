"""Routing: a call, cast, put or delete goes to the node that owns its id.

Locally it reaches the :class:`~cloister.manager.engine.Engine`; remotely it is an RPC to
the owner's handler (``cloister.manager.<name>.<verb>``). An owner that answers
:class:`NotOwnerError` (typed across the wire) or a node that is gone means our view of
the ring is behind: the router retries with the ring it has adopted by then.
"""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING, Any

from cloister import wire
from cloister._backoff import Backoff
from cloister.errors import NoSuchNodeError, NotOwnerError, RequestTimeoutError
from cloister.manager.engine import Engine, UnknownWorkerError
from cloister.manager.lifecycle import Lifecycle
from cloister.manager.ownership import ShardRegion
from cloister.manager.spec import Spec, make_spec
from cloister.manager.state import Stored
from cloister.manager.types import Key, Pickup
from cloister.manager.worker import Message, Worker
from cloister.ring import key_hash

if TYPE_CHECKING:
    from cloister.cluster import Cluster

VERBS = ("call", "cast", "put", "delete")


class Router:
    """Sends each request to its id's owner; serves the requests other nodes send here."""

    def __init__(
        self,
        engine: Engine,
        lifecycle: Lifecycle,
        name: str,
        pickup: Pickup,
        cluster: Cluster | None = None,
        region: ShardRegion | None = None,
    ) -> None:
        self.engine = engine
        self.lifecycle = lifecycle
        self.name = name
        self.pickup = pickup
        self.cluster = cluster
        self.region = region

    def register(self) -> None:
        """Serve this manager's verbs (and the handoff) on the cluster's RPC."""
        cluster, region = self.cluster, self.region
        assert cluster is not None and region is not None
        prefix = f"cloister.manager.{self.name}."
        for verb in VERBS:
            cluster.register_handler(prefix + verb, self._handler(verb), internal=True)
        cluster.register_handler(prefix + "handoff", region.receive_handoff, internal=True)

    def _handler(self, verb: str) -> Any:
        async def handle(body: Any) -> Any:
            return await self.local(verb, body, None)

        handle.__name__ = f"remote_{verb}"
        return handle

    async def route(
        self, worker_id: Key, verb: str, body: dict[str, Any], timeout: float | None
    ) -> Any:
        """Run ``verb`` on the owner of ``worker_id``, here or on another node."""
        cluster, region = self.cluster, self.region
        if cluster is None or region is None:
            return await self.local(verb, body, timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else 10.0)
        delays = Backoff(0.01, 0.2).delays()
        delay = next(delays)
        if verb in ("put", "delete") and region.table is not None:
            await self._record_spec(region, verb, body)
        if cluster.topology is None:
            await cluster.wait_ready(max(deadline - loop.time(), 0.0))
        while True:
            owner = region.placement_now().owner_of(worker_id)
            remaining = deadline - loop.time()
            try:
                if owner == cluster.node:
                    return await self.local(verb, body, remaining)
                return await cluster.call(
                    owner,
                    f"cloister.manager.{self.name}.{verb}",
                    body,
                    timeout=max(remaining, 0.01),
                )
            except (NotOwnerError, NoSuchNodeError) as exc:
                # The owner moved, is leaving, or is gone: our view of the ring is behind.
                # Retry with the ring we will have adopted by then, until the deadline.
                if loop.time() + delay > deadline:
                    raise RequestTimeoutError(
                        f"worker {worker_id!r}: ownership kept moving; "
                        f"no owner accepted the {verb} in time"
                    ) from exc
                await asyncio.sleep(delay)
                delay = next(delays)

    @staticmethod
    async def _record_spec(region: ShardRegion, verb: str, body: dict[str, Any]) -> None:
        assert region.table is not None
        worker_id = body["id"]
        # Written by the caller, whichever node it is (not the owner): not fenced.
        if verb == "put":
            record = Stored(worker_id, body["spec"], None, False)
        else:
            record = Stored(worker_id, None, None, False, deleted=True)
        await region.table.write(record, guarded=False)

    async def local(self, verb: str, body: dict[str, Any], timeout: float | None) -> Any:
        """Run ``verb`` here (the caller found this node to be the owner)."""
        worker_id = body["id"]
        if verb == "call":
            return await self.local_call(worker_id, body["m"], timeout)
        if verb == "cast":
            self.local_cast(worker_id, body["m"])
            return None
        if verb == "put":
            return await self.local_put(worker_id, make_spec(worker_id, body["spec"]))
        return await self.engine.delete(worker_id)

    def check_owner(self, worker_id: Key) -> None:
        """:class:`NotOwnerError` unless this node works ``worker_id`` now."""
        cluster, region = self.cluster, self.region
        if (
            cluster is not None
            and region is not None
            and (self.lifecycle.leaving or not region.placement_now().mine(worker_id))
        ):
            raise NotOwnerError(
                f"node {cluster.node} does not own worker {worker_id!r} (epoch {cluster.epoch})"
            )

    async def local_call(self, worker_id: Key, message: Any, timeout: float | None) -> Any:
        """Ask a local worker and wait for its reply."""
        self.check_owner(worker_id)
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.engine.deliver(worker_id, Message("call", message, reply))
        async with asyncio.timeout(timeout):
            return await reply

    def local_cast(self, worker_id: Key, message: Any) -> None:
        """Queue a message for a local worker."""
        self.check_owner(worker_id)
        self.engine.deliver(worker_id, Message("cast", message))

    async def local_put(self, worker_id: Key, spec: Spec) -> None:
        """Add or replace a worker here."""
        self.check_owner(worker_id)
        await self.engine.put(worker_id, spec, known=self.cluster is not None)

    def pick(self, message: Any) -> Key:
        """Pool mode: the id of a local worker, chosen by ``pickup``."""
        workers = self.engine.workers
        if not workers:
            raise UnknownWorkerError("pool mode: no live worker on this node")
        if self.pickup == "hash":
            try:
                digest = key_hash(message)
            except TypeError:
                digest = key_hash(wire.encode(message))
            ids = list(workers)
            return ids[digest % len(ids)]
        free = (
            worker_id
            for worker_id, w in workers.items()
            if not isinstance(w, Worker) or (not w.busy_since and not w.mailbox)
        )
        if self.pickup == "first_free":
            chosen = next(free, None)
            if chosen is None:
                chosen = next(iter(workers))
        else:
            chosen = random.choice(list(free) or list(workers))
        return chosen
