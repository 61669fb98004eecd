"""The ack subject of a JetStream delivery, read without nats-py's ``msg.metadata``."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.msg import Msg

from cloister.backends.nats._log_consumer import delivery_of

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=20)
counts = st.integers(min_value=0, max_value=2**63 - 1)


@given(
    stream=names,
    consumer=names,
    delivered=counts,
    stream_seq=counts,
    consumer_seq=counts,
    stored_ns=st.integers(min_value=0, max_value=4 * 10**18),
    pending=counts,
    domain=st.none() | st.tuples(names, names, st.booleans()),
)
def test_the_same_figures_as_nats_py(
    stream: str,
    consumer: str,
    delivered: int,
    stream_seq: int,
    consumer_seq: int,
    stored_ns: int,
    pending: int,
    domain: tuple[str, str, bool] | None,
) -> None:
    tokens = [stream, consumer, delivered, stream_seq, consumer_seq, stored_ns, pending]
    if domain is not None:  # the v2 form: domain and account hash first, maybe a token after
        name, account, trailing = domain
        tokens = [name, account, *tokens, *(["random"] if trailing else [])]
    reply = ".".join(["$JS", "ACK", *map(str, tokens)])
    theirs = Msg.Metadata._from_reply(reply)
    assert delivery_of(reply)[:3] == (
        theirs.sequence.stream,
        theirs.sequence.consumer,
        theirs.num_delivered,
    )
    assert delivery_of(reply)[3] == stored_ns


@pytest.mark.parametrize(
    "reply",
    ["", "_INBOX.abc.1", "$JS.ACK.s.c.1.2.3", "$JS.NAK.s.c.1.2.3.4.5", "$JS.ACK.s.c.x.2.3.4.5"],
)
def test_anything_else_is_refused_as_a_value_error(reply: str) -> None:
    with pytest.raises(ValueError):
        delivery_of(reply)
