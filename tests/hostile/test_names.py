"""Names that cannot collide: what a backend names after a cluster is never another's.

Joined with ``_``, cluster ``iso``'s table ``x_members`` (bucket ``tbl-x_members``) was
cluster ``iso_tbl-x``'s members bucket: one ``table.put`` made a stranger a member of
another cluster. The names are now length-prefixed (:mod:`cloister.backends._names`);
the properties below check that no two (cluster, kind, name) share a stream, bucket or
subject, and the regression tests replay the collision on both backends.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import nats
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloister.backends import Backend, open_backend
from cloister.backends._names import (
    MAX_COMPONENT,
    MAX_SUBJECT_TOKEN,
    bucket_name,
    bucket_stream,
    check_cluster,
    decode_storage_name,
    log_stream,
    log_subjects,
    node_subject,
    storage_name,
    topic_subject,
)
from cloister.backends.nats._log_admin import consumer_name, parse_consumer_name
from cloister.errors import ConfigurationError
from cloister.store import open_table
from cloister.testing import NatsServer

# Mostly separators and digits: the characters an ambiguous encoding trips over.
_CHARS = st.sampled_from("_-0123456789ab_-_")
NAMES = st.text(_CHARS, min_size=1, max_size=MAX_COMPONENT) | st.text(
    st.sampled_from("abcxyzAZ019_-"), min_size=1, max_size=12
)
KINDS = st.sampled_from(["kv", "log"])
TRIPLES = st.tuples(NAMES, KINDS, NAMES)


@given(TRIPLES)
def test_storage_names_decode_back(triple: tuple[str, str, str]) -> None:
    encoded = storage_name(*triple)  # type: ignore[arg-type]
    assert decode_storage_name(encoded) == triple
    assert set(encoded) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
    assert len("KV_" + encoded) <= 255


@settings(max_examples=500)
@given(TRIPLES, TRIPLES)
def test_different_triples_never_share_a_stream(
    a: tuple[str, str, str], b: tuple[str, str, str]
) -> None:
    if a != b:
        assert storage_name(*a) != storage_name(*b)  # type: ignore[arg-type]
        streams = {
            "kv": lambda c, n: bucket_stream(c, n),
            "log": lambda c, n: log_stream(c, n),
        }
        assert streams[a[1]](a[0], a[2]) != streams[b[1]](b[0], b[2])


def _subject(kind: str, cluster: str, name: str, partition: int) -> str:
    if kind == "node":
        return node_subject(cluster, name)
    if kind == "topic":
        return topic_subject(cluster, name)
    return f"{log_subjects(cluster, name)}.{partition}"


SUBJECT_NAMES = NAMES | st.lists(NAMES, min_size=2, max_size=3).map(".".join)
SUBJECTS = st.tuples(
    st.sampled_from(["node", "topic", "log"]), NAMES, SUBJECT_NAMES, st.integers(0, 99)
).map(
    # a log name has no dots and at most MAX_COMPONENT characters
    lambda t: t if t[0] != "log" else (t[0], t[1], t[2].replace(".", "-")[:MAX_COMPONENT], t[3])
)


@settings(max_examples=500)
@given(SUBJECTS, SUBJECTS)
def test_different_targets_never_share_a_subject(
    a: tuple[str, str, str, int], b: tuple[str, str, str, int]
) -> None:
    def target(t: tuple[str, str, str, int]) -> tuple[object, ...]:
        return t if t[0] == "log" else t[:3]  # only logs have partitions

    if target(a) != target(b):
        assert _subject(*a) != _subject(*b)


@given(st.integers(0, 10_000), st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_consumer_names_are_injective_and_decode_back(partition: int, a: str, b: str) -> None:
    assert parse_consumer_name(consumer_name(partition, a)) == (partition, a)
    if a != b:
        assert consumer_name(partition, a) != consumer_name(partition, b)
    assert consumer_name(partition, a) != consumer_name(partition + 1, a)


def test_the_reported_collision_is_gone() -> None:
    assert bucket_name("iso", "tbl-x_members") != bucket_name("iso_tbl-x", "members")
    assert bucket_name("iso", "tbl-x_members") == "cloister_3_iso_2_kv_13_tbl-x_members"
    assert bucket_name("iso_tbl-x", "members") == "cloister_9_iso_tbl-x_2_kv_7_members"
    # and the older flavour of the same trap: a log name against a bucket name
    assert bucket_stream("a", "log_b") != "KV_" + log_stream("a", "b")
    assert log_stream("a_log", "b") != log_stream("a", "log_b")


@pytest.mark.parametrize(
    "bad", ["", "a.b", "a b", "a*", "a>", "ä", "x" * (MAX_COMPONENT + 1), None, 3, b"abc"]
)
def test_invalid_names_are_refused_with_what_is_allowed(bad: object) -> None:
    with pytest.raises(ConfigurationError, match=r"1-64 characters of \[A-Za-z0-9_-\]"):
        check_cluster(bad)
    with pytest.raises(ConfigurationError, match="bucket name"):
        bucket_name("c", bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="log name"):
        log_stream("c", bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad", ["", "a..b", ".a", "a.", "a b", "a*", "a>", None, "x" * (MAX_SUBJECT_TOKEN + 1)]
)
def test_invalid_node_names_and_topics_are_refused(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="node name"):
        node_subject("c", bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="topic"):
        topic_subject("c", bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "foreign",
    [
        "KV_cloister_iso_members",
        "cloister_iso_members",
        "cloister_3_iso_2_kv",
        "cloister_3_iso_2_kv_7_member",
        "cloister_3_iso_2_kv_07_members",
        "cloister_3_iso_2_xx_7_members",
        "cloister_3_iso_2_kv_7_members_1_x",
    ],
)
def test_foreign_names_do_not_decode(foreign: str) -> None:
    with pytest.raises(ConfigurationError, match="not a pycloister name"):
        decode_storage_name(foreign)


# -- the collision, replayed on both backends ---------------------------------------------


@asynccontextmanager
async def _backend(url: str, cluster: str, node: str) -> AsyncIterator[Backend]:
    backend = open_backend(url, cluster, node)
    await backend.connect()
    try:
        yield backend
    finally:
        await backend.close()


async def _replay_the_collision(url: str) -> None:
    async with (
        _backend(url, "iso", "attacker") as attacker,
        _backend(url, "iso_tbl-x", "victim") as victim,
    ):
        members = await victim.kv("members", ttl_keys=True)
        table = await open_table(attacker, "x_members")
        await table.put("stranger", {"weight": 1})
        assert await members.entries() == {}
        # and the other way round: the victim's members never show in the table
        await members.put("victim", b"\x81\xa6weight\x01")
        assert await table.items() == {"stranger": {"weight": 1}}


async def test_a_table_is_never_another_clusters_members_bucket_in_memory() -> None:
    await _replay_the_collision(f"memory://names-{uuid.uuid4().hex}")


async def test_a_table_is_never_another_clusters_members_bucket_on_nats(
    nats_server: NatsServer,
) -> None:
    await _replay_the_collision(nats_server.url)
    raw = await nats.connect(nats_server.url)
    try:
        names = await raw.jetstream().streams_info()
    finally:
        await raw.close()
    streams = sorted(info.config.name or "" for info in names)
    assert streams == sorted(
        [bucket_stream("iso", "tbl-x_members"), bucket_stream("iso_tbl-x", "members")]
    )
    for stream in streams:  # every stream on the server is one of ours, and says whose
        assert decode_storage_name(stream.removeprefix("KV_"))[0] in {"iso", "iso_tbl-x"}


async def test_logs_of_clusters_with_joined_names_stay_apart(nats_server: NatsServer) -> None:
    """``a``'s log ``log_b`` and ``a_log``'s log ``b`` were the same stream."""
    async with (
        _backend(nats_server.url, "a", "n1") as one,
        _backend(nats_server.url, "a_log", "n1") as other,
    ):
        first = await one.log("log_b", partitions=2)
        second = await other.log("b", partitions=3)  # once the same stream: "fixed" count
        await first.append(0, b"one")
        consumer = await second.claim(0, "n1")
        assert await consumer.fetch(10, timeout=0.3) == []


async def test_memory_refuses_what_nats_refuses() -> None:
    world = f"memory://refuse-{uuid.uuid4().hex}"
    with pytest.raises(ConfigurationError, match="cluster name"):
        open_backend(world, "a.b", "n1")
    with pytest.raises(ConfigurationError, match="node name"):
        open_backend(world, "c", "a..b")
    async with _backend(world, "c", "n1") as backend:
        for bad, call in itertools.product(
            ["a.b", "x" * 65, "a=b"],
            [lambda n: backend.kv(n), lambda n: backend.log(n, partitions=1)],
        ):
            with pytest.raises(ConfigurationError, match="1-64 characters"):
                await call(bad)
