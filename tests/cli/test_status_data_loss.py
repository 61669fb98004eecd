"""``cloister status`` shows a medium that lost its data; ``ClusterInfo`` carries it."""

from __future__ import annotations

from dataclasses import replace

from rich.console import Console

from cloister.cli.status import render
from cloister.cluster import ClusterInfo, State
from cloister.cluster.info import DataLoss
from cloister.cluster.membership import MemberRecord
from cloister.observer import ClusterStatus, MemberStatus

LOSS = DataLoss("the epoch record is gone from the control bucket", 1_800_000_000.0, 7)


def info(node: str, losses: int = 0, rebuilding: bool = False) -> ClusterInfo:
    return ClusterInfo(
        cluster="shop",
        node=node,
        state=State.REHASHING if rebuilding else State.READY,
        members=("a", "b"),
        epoch=8,
        consensus=1,
        sentry="a",
        is_sentry=node == "a",
        started_at=0.0,
        fingerprint="f",
        data_losses=losses,
        last_data_loss=LOSS if losses else None,
        rebuilding=rebuilding,
    )


def member(node: str, cluster_info: ClusterInfo) -> MemberStatus:
    record = MemberRecord(node, 1, 1.0, (), 0.0, acked=8)
    return MemberStatus(node, record, cluster_info, None, 0.5, True, 0.1)


def test_cluster_info_carries_the_data_loss_over_the_wire() -> None:
    sent = info("a", losses=2, rebuilding=True)
    assert ClusterInfo.from_wire(sent.to_wire()) == sent
    older = sent.to_wire()
    for field in ("data_losses", "last_data_loss", "rebuilding"):
        del older[field]  # a node of an earlier version says nothing of it
    parsed = ClusterInfo.from_wire(older)
    assert parsed.data_losses == 0 and parsed.last_data_loss is None and not parsed.rebuilding
    assert replace(parsed, data_losses=2, last_data_loss=LOSS, rebuilding=True) == sent


def test_status_names_the_last_loss_and_the_members_that_saw_it() -> None:
    status = ClusterStatus(
        cluster="shop",
        backend="nats://127.0.0.1:4222",
        epoch=None,
        sentry_lease="a",
        members=(member("a", info("a", losses=1)), member("b", info("b", 1, rebuilding=True))),
        taken_at=0.0,
    )
    console = Console(width=200, record=True)
    console.print(render(status))
    text = console.export_text()
    assert "medium data loss at" in text and "(epoch 7)" in text and LOSS.why in text
    assert "medium lost its data 1x; rebuilding" in text
    document = status.to_json()
    assert document["data_loss"] == LOSS.to_wire()
    assert [m["data_losses"] for m in document["members"]] == [1, 1]
    assert [m["rebuilding"] for m in document["members"]] == [False, True]
    quiet = ClusterStatus("shop", "nats://x", None, None, (member("a", info("a")),), 0.0)
    assert quiet.to_json()["data_loss"] is None
