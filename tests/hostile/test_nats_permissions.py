"""The NATS permissions template (deploy/nats/), against a real nats-server started from
the wheel with it: the member user runs cluster nodes (with a cluster secret); the
producer user appends inbox records (sealed with the secret: an unsealed one is refused
and counted) and nothing else — it cannot write the members or control buckets, call a
node's handlers, listen to the cluster, or delete or purge streams."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js import api

from cloister import schema
from cloister.backends import _names
from cloister.cluster.control import EPOCH_KEY
from cloister.cluster.rpc import encode_request
from cloister.schema import Keyring
from cloister.testing import NatsServer, eventually
from tests._support.nodes import ClusterNodes
from tests._support.timing import NATS
from tests.manager.test_fencing import IDS, Tally

CLUSTER = "perm"
TEMPLATE = Path(__file__).parents[2] / "deploy" / "nats" / "cloister-accounts.conf.template"
SECRET = "s3cret shared by the nodes and the producer"
PASSWORDS = {"member": secrets.token_hex(8), "producer": secrets.token_hex(8)}


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsServer]:
    """A nats-server with the template rendered for cluster ``perm`` (the passwords come
    from the server's environment, as the template documents)."""
    monkeypatch.setenv("CLOISTER_MEMBER_PASSWORD", PASSWORDS["member"])
    monkeypatch.setenv("CLOISTER_PRODUCER_PASSWORD", PASSWORDS["producer"])
    config = TEMPLATE.read_text().replace("{{cluster}}", CLUSTER)
    with NatsServer(extra_config=config) as started:
        yield started


def url(server: NatsServer, user: str) -> str:
    return f"nats://{user}:{PASSWORDS[user]}@127.0.0.1:{server.port}"


@pytest.fixture
async def members(server: NatsServer) -> AsyncIterator[ClusterNodes]:
    async with AsyncExitStack() as stack:
        yield ClusterNodes(stack, url(server, "member"), cluster=CLUSTER, timing=NATS)


class Producer:
    """A plain NATS client logged in as the producer user; collects the server's errors."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: Any = None

    async def connect(self, server: NatsServer) -> None:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        self.nc = await nats.connect(
            url(server, "producer"), error_cb=on_error, allow_reconnect=False
        )

    async def refused(self, what: str) -> None:
        """Wait until the server has reported a permissions violation naming ``what``
        (nats-py reports the subject in lower case)."""
        await eventually(
            lambda: any(f"permissions violation for {what}".lower() in e for e in self.errors),
            timeout=5,
            what=f"the server refused {what}",
        )


async def test_the_member_user_runs_nodes_and_the_producer_only_appends(
    server: NatsServer, members: ClusterNodes
) -> None:
    a = await members.start_manager("a", Tally, consensus=2, secret=SECRET)
    await members.start_manager("b", Tally, consensus=2, secret=SECRET)
    await eventually(lambda: members.agreed({"a", "b"}), timeout=20, what="a and b agree")
    await a.cast(IDS[0], "from a member")

    producer = Producer()
    await producer.connect(server)
    try:
        js = producer.nc.jetstream()
        # what an outside producer needs: append an inbox record to its partition, sealed
        # with the cluster's secret (one without the tag is parked, not handled)
        subject = f"{_names.log_subjects(CLUSTER, 'inbox-tally')}.{a.inbox.partition_of(IDS[0])}"
        keyring = Keyring([SECRET])
        for text, sealed_with in (("from the producer", keyring), ("unsealed", schema.UNSIGNED)):
            record = schema.encode(schema.INBOX, [IDS[0], text, None], sealed_with)
            ack = await js.publish(subject, record, timeout=5)
            assert ack.seq >= 1

        def handled() -> bool:
            worker = members.managers[a.cluster.whois(IDS[0], manager=Tally)].get(IDS[0])
            return worker is not None and {"from a member", "from the producer"} <= set(
                worker.payload
            )

        await eventually(handled, timeout=20, what="both casts handled")
        await eventually(
            lambda: sum(c.counters.unauthenticated.get("inbox", 0) for c in members.live()) == 1,
            timeout=20,
            what="the unsealed record refused",
        )
        worker = members.managers[a.cluster.whois(IDS[0], manager=Tally)].get(IDS[0])
        assert "unsealed" not in worker.payload

        nc = producer.nc
        members_kv = _names.bucket_name(CLUSTER, "members")
        control_kv = _names.bucket_name(CLUSTER, "control")
        inbox_stream = _names.log_stream(CLUSTER, "inbox-tally")
        await nc.publish(f"$KV.{members_kv}.mallory", b"a member record")
        await producer.refused(f'publish to "$KV.{members_kv}.mallory')
        await nc.publish(f"$KV.{control_kv}.{EPOCH_KEY}", b"an epoch record")
        await producer.refused(f'publish to "$KV.{control_kv}.{EPOCH_KEY}')
        for call in (f"STREAM.DELETE.{inbox_stream}", f"STREAM.PURGE.{inbox_stream}"):
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await nc.request(f"$JS.API.{call}", b"", timeout=1)
            await producer.refused(f'publish to "$JS.API.{call}')
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await nc.request(
                _names.node_subject(CLUSTER, "a"),
                encode_request("cloister.manager.tally.put", [IDS[1], {}], "mallory"),
                timeout=1,
            )
        await producer.refused(f'publish to "{_names.node_subject(CLUSTER, "a")}')
        await nc.subscribe(f"{_names.subject_base(CLUSTER)}.>")
        await producer.refused(f'subscription to "{_names.subject_base(CLUSTER)}.>')
    finally:
        await producer.nc.close()

    # none of it had an effect: the buckets hold members only, the inbox stream is intact
    check = await nats.connect(url(server, "member"))
    try:
        jsm = check.jetstream()
        info = await jsm.stream_info(inbox_stream)
        assert info.config.retention == api.RetentionPolicy.WORK_QUEUE
        kv = await jsm.key_value(members_kv.removeprefix("KV_"))
        assert sorted(await kv.keys()) == ["a", "b"]
    finally:
        await check.close()
    assert members.agreed({"a", "b"})


async def test_without_credentials_nothing_connects(server: NatsServer) -> None:
    with pytest.raises(Exception, match=r"(?i)authorization"):
        await nats.connect(f"nats://127.0.0.1:{server.port}", allow_reconnect=False)
