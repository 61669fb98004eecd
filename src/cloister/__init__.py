"""pycloister: zero-cost distribution for Python.

Write one keyed worker manager as if it ran on one machine; start it N times; the copies
form a cluster, split the keys with a consistent hash ring and hand work over when a node
joins, leaves or dies.

Entry points, from the bottom layer up:

- :class:`HashRing` (``cloister.ring``): the pure consistent hash ring.
- :class:`Cluster` (``cloister.cluster``): membership, epochs, sentry, listener, RPC.
- :class:`DynamicManager` (``cloister.manager``): keyed workers, distributed by the ring.
- :class:`Client` / :class:`SyncClient` (``cloister.client``): cast and call from outside
  the cluster, without joining it.
- :class:`CloisterError` (``cloister.errors``): root of every error raised here.
"""

from __future__ import annotations

from cloister.client import Client, SyncClient
from cloister.cluster import CallResult, Cluster, ClusterInfo, Listener, State
from cloister.errors import CloisterError
from cloister.manager import DynamicManager, Halt, Ok, Replace, Timeout
from cloister.ring import HashRing

__all__ = [
    "CallResult",
    "Client",
    "CloisterError",
    "Cluster",
    "ClusterInfo",
    "DynamicManager",
    "Halt",
    "HashRing",
    "Listener",
    "Ok",
    "Replace",
    "State",
    "SyncClient",
    "Timeout",
]
__version__ = "0.1.0"
