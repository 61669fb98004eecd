"""The cluster layer: membership, state machine, listener, quorum, sentry, RPC.

Start here: :class:`Cluster`. The pieces, one job each:

- :mod:`.states` — the node state machine and its transition table.
- :mod:`.listener` — the listener contract and its in-order dispatcher.
- :mod:`.membership` — member records (self-description + TTL lease + epoch ack).
- :mod:`.topology` — epoch records and the rings derived from them.
- :mod:`.rpc` — named handlers, request envelopes, per-node call results.
- :mod:`.requests` — call, multicall and multicast through the backend.
- :mod:`.lease` — this node's member record and sentry lease: join, renew, fence, leave.
- :mod:`.control` — the facts (watches, readers) and :func:`~.control.decide`, the pure
  function that turns them into what to do.
- :mod:`.hooks` — the topology hooks components follow ownership with.
- :mod:`.core` — :class:`Cluster`, which ties them together in one control loop.
"""

from cloister.cluster.core import Cluster, SuspendReason, TopologyHook
from cloister.cluster.info import ClusterInfo
from cloister.cluster.listener import Listener
from cloister.cluster.rpc import CallResult
from cloister.cluster.schedules import Cron, Every, ScheduledJob, ScheduleInfo, Tick
from cloister.cluster.states import TRANSITIONS, State
from cloister.cluster.topology import Topology

__all__ = [
    "TRANSITIONS",
    "CallResult",
    "Cluster",
    "ClusterInfo",
    "Cron",
    "Every",
    "Listener",
    "ScheduleInfo",
    "ScheduledJob",
    "State",
    "SuspendReason",
    "Tick",
    "Topology",
    "TopologyHook",
]
