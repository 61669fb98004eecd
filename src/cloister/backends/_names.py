"""Names on the medium: one injective encoding of cluster, kind and name, for every backend.

Clusters sharing a medium must never see each other, so whatever a backend names after a
cluster and a bucket or log (a NATS stream, a KV bucket, a subject) is built here, and
nowhere else. Joining names with a separator that may also appear inside them is not
enough: joined with ``_``, cluster ``iso``'s bucket ``tbl-x_members`` and cluster
``iso_tbl-x``'s bucket ``members`` were the same stream.

**Stream and bucket names** are length-prefixed::

    cloister_<len>_<cluster>_<len>_<kind>_<len>_<name>

each ``<len>`` the component's length in decimal (no leading zeros). Reading left to
right, every component is found by its length, never by searching for a separator, so
the encoding is injective (:func:`decode_storage_name` inverts it) and uses only
``[A-Za-z0-9_-]``, as NATS stream and KV bucket names need. Cluster ``iso``'s bucket
``tbl-x_members`` is ``cloister_3_iso_2_kv_13_tbl-x_members``; cluster ``iso_tbl-x``'s
``members`` is ``cloister_9_iso_tbl-x_2_kv_7_members``.

**Subjects** are dot-separated tokens, and the components that are not last cannot
contain a dot: ``cloister.<cluster>.node.<node>``, ``cloister.<cluster>.topic.<topic>``
and ``cloister.<cluster>.log.<log>.<partition>`` (node names and topics may contain dots;
they are the last tokens). A KV bucket's keys are ``$KV.<bucket>.<key>`` with the bucket
named as above.

What a cluster, bucket or log name may be is checked here too, with the same error on
every backend (the memory backend keys its world by the same names, so a name refused on
NATS is refused in memory as well).
"""

from __future__ import annotations

import re
from typing import Final, Literal

from cloister.errors import ConfigurationError

Kind = Literal["kv", "log"]
KINDS: Final[tuple[Kind, ...]] = ("kv", "log")

PREFIX: Final = "cloister"
#: Longest cluster, bucket and log name.
MAX_COMPONENT: Final = 64
#: Longest stream (and consumer) name nats-server accepts (its ``JSMaxNameLen``).
MAX_STREAM_NAME: Final = 255
#: Longest node name or topic: a subject must fit the server's control line (4 KB by
#: default) with the reply subject and headers beside it.
MAX_SUBJECT_TOKEN: Final = 512

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_TOKENS = re.compile(r"^[A-Za-z0-9_=-]+(?:\.[A-Za-z0-9_=-]+)*$")
_LENGTH = re.compile(r"_(0|[1-9][0-9]{0,3})_")


def check_name(kind: str, name: object) -> str:
    """``name`` if it is a valid cluster, bucket or log name: 1-64 of ``[A-Za-z0-9_-]``."""
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > MAX_COMPONENT:
        raise ConfigurationError(
            f"invalid {kind} {_shown(name)}: use 1-{MAX_COMPONENT} characters of [A-Za-z0-9_-]"
        )
    return name


def check_cluster(cluster: object) -> str:
    """``cluster`` if it is a valid cluster name, else :class:`ConfigurationError`."""
    return check_name("cluster name", cluster)


def check_token(kind: str, name: object) -> str:
    """``name`` if it can end a subject (a node name, a topic): dot-separated tokens of
    ``[A-Za-z0-9_=-]``, at most :data:`MAX_SUBJECT_TOKEN` characters."""
    if not isinstance(name, str) or not _TOKENS.match(name):
        raise ConfigurationError(
            f"invalid {kind} {_shown(name)}: use [A-Za-z0-9_=.-], without a leading, trailing or "
            "doubled '.'"
        )
    if len(name) > MAX_SUBJECT_TOKEN:
        raise ConfigurationError(
            f"{kind} {name[:60]!r}... is {len(name)} characters long: at most "
            f"{MAX_SUBJECT_TOKEN} fit in a NATS subject; use a shorter one"
        )
    return name


def storage_name(cluster: str, kind: Kind, name: str) -> str:
    """The medium's name of ``cluster``'s bucket or log ``name``, e.g.
    ``cloister_4_shop_2_kv_7_members`` (a NATS KV bucket, or a log's stream)."""
    check_cluster(cluster)
    if kind not in KINDS:
        raise ConfigurationError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    check_name("bucket name" if kind == "kv" else "log name", name)
    encoded = PREFIX + "".join(f"_{len(part)}_{part}" for part in (cluster, kind, name))
    return _fit(encoded, MAX_STREAM_NAME - len("KV_"), "stream name")


def decode_storage_name(encoded: str) -> tuple[str, Kind, str]:
    """``(cluster, kind, name)`` of a name :func:`storage_name` built; else
    :class:`ConfigurationError` (not one of ours, or not in canonical form)."""
    if not encoded.startswith(PREFIX):
        raise ConfigurationError(f"{encoded!r} is not a pycloister name")
    parts: list[str] = []
    at = len(PREFIX)
    while at < len(encoded):
        match = _LENGTH.match(encoded, at)
        if match is None:
            raise ConfigurationError(f"{encoded!r} is not a pycloister name (at {at})")
        start = match.end()
        end = start + int(match[1])
        if end > len(encoded):
            raise ConfigurationError(f"{encoded!r} is not a pycloister name (truncated)")
        parts.append(encoded[start:end])
        at = end
    if len(parts) != 3 or parts[1] not in KINDS:
        raise ConfigurationError(f"{encoded!r} is not a pycloister name (components)")
    cluster, kind, name = parts
    if storage_name(cluster, kind, name) != encoded:  # type: ignore[arg-type]
        raise ConfigurationError(f"{encoded!r} is not a pycloister name (not canonical)")
    return cluster, kind, name  # type: ignore[return-value]


def bucket_name(cluster: str, bucket: str) -> str:
    """The NATS KV bucket behind ``cluster``'s bucket ``bucket``."""
    return storage_name(cluster, "kv", bucket)


def bucket_stream(cluster: str, bucket: str) -> str:
    """The stream behind that KV bucket (``KV_<bucket>``, as ``nats kv`` names it)."""
    return "KV_" + bucket_name(cluster, bucket)


def log_stream(cluster: str, log: str) -> str:
    """The stream behind ``cluster``'s log ``log``."""
    return storage_name(cluster, "log", log)


def subject_base(cluster: str) -> str:
    """The subject every subject of ``cluster`` starts with: ``cloister.<cluster>``."""
    return f"{PREFIX}.{check_cluster(cluster)}"


def node_subject(cluster: str, node: str) -> str:
    """Requests to ``node``: ``cloister.<cluster>.node.<node>``."""
    return f"{subject_base(cluster)}.node.{check_token('node name', node)}"


def topic_subject(cluster: str, topic: str) -> str:
    """Messages on ``topic``: ``cloister.<cluster>.topic.<topic>``."""
    return f"{subject_base(cluster)}.topic.{check_token('topic', topic)}"


def log_subjects(cluster: str, log: str) -> str:
    """The subject prefix of ``log``'s partitions: ``cloister.<cluster>.log.<log>``;
    partition ``p`` is ``<prefix>.<p>``."""
    return f"{subject_base(cluster)}.log.{check_name('log name', log)}"


def _shown(name: object) -> str:
    """``name`` for an error message: long ones cut short."""
    return repr(name) if not isinstance(name, str) or len(name) <= 80 else f"{name[:60]!r}..."


def _fit(name: str, limit: int, what: str) -> str:
    if len(name) > limit:
        raise ConfigurationError(
            f"{what} {name[:60]!r}... would be {len(name)} characters; NATS allows at most "
            f"{limit} here: use shorter cluster, bucket or log names"
        )
    return name
