"""The consistent hash ring: which node owns a key.

``HashRing`` is a pure, immutable value (no I/O, no asyncio)::

    ring = HashRing({"a": 1, "b": 1, "c": 2})   # names, or name -> weight
    ring = ring.add_node("d")                    # a new ring; the old one is unchanged
    ring.key_to_node("foo_42")                   # the owner
    ring.key_to_nodes("foo_42", 2)               # owner and first fallback, distinct
    ring.key_to_node("foo_42", exclude={"a"})    # the best node that is not "a"

Design: a slot table assigned by weighted rendezvous hashing
-------------------------------------------------------------
A key hashes (64-bit, see ``key_hash``) to one of ``S = 2**18`` slots: the hash's top 18
bits. A table maps each slot to a node, chosen by rendezvous (highest random weight)
hashing: every node draws ``u = mix64(H(name) + slot * 0x9E3779B97F4A7C15)`` for the slot
(``mix64`` is the splitmix64 finalizer) and the highest draw wins. With unequal weights
the draw becomes Resch's weighted score ``-w / ln(u01)``, ``u01 = ((u >> 11) + 0.5) / 2**53``,
which gives each node a share of the slots proportional to its weight. Ties (practically
never) go to the higher draw, then to the smaller name, so with equal weights both rules
give the same table.

Why: measured by ``bench/ring.py`` side by side with uhashring (1M keys, 2-core machine):

- lookup is one hash and one array index, the cost of jump hashing, whatever the number
  of nodes: 19-28 M lookups/s with the C accelerator at 10 and at 100 nodes, against
  0.4-0.8 M/s for uhashring's 160-vnode ring (plain rendezvous hashing is O(nodes) per
  lookup: 0.2 M/s at 100 nodes, as measured for issue 2);
- balance is that of rendezvous over 2**18 slots: busiest node / mean 1.009 for 10 nodes
  (uhashring: 1.15), a weight-2 node among nine of weight 1 gets 0.3% off its 2/11 share
  (uhashring: 5% off);
- disruption is exactly minimal: adding a node moves only the slots it now wins, all to
  it (8.97% of the keys for an 11th node; ideal 9.09%); removing one moves only its own
  slots, each to that slot's next preferred node; no key ever moves between two nodes that
  stay (unlike jump hashing, any node can be removed, not only the last);
- the table is a pure function of (members, weights): history-independent, so every
  process that sees the same members computes the same table, whatever order it saw
  joins and leaves in. ``fingerprint`` lets nodes compare their views cheaply.

Building a ring costs O(S x nodes): ~45 ms for 100 nodes (~90 ms with unequal weights).
``add_node`` and ``remove_node`` update the parent's table in O(S), ~1 ms, and give exactly
what a fresh build gives. ``key_to_nodes`` ranks all nodes for the key's slot, so its first
element is the table's owner: correct for every key (no ring wrap-around), and removing a
node keeps the relative order of the others. A table costs 512 KiB per ring (uint16 node
indices, hence at most 65535 nodes).

The C accelerator ``_native`` (built by ``pip install``; optional) implements the hash, the
table and the lookups; ``HashRing`` subclasses its type, so ``ring.key_to_node`` is a C
method run with no Python frame. Without it (or with ``CLOISTER_PURE_RING=1``) a pure-Python
core gives identical results, filling its table lazily (~0.6 M lookups/s once warm,
O(nodes) to build or derive a ring); a warning is logged once.

Equal-weight rings use integer arithmetic only, so they are the same on every machine.
Weighted rings also use the C library's ``log``: on two platforms whose ``log`` differs in
the last bit, a slot could change owner only where two nodes' scores agree to ~1e-16,
about a 1e-10 chance per ring.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cloister.ring import _pure, _select
from cloister.ring._hash import SLOTS, Key
from cloister.ring._partition import PARTITION_KEY, partition_key
from cloister.ring._ring import RingMethods, UnknownNodeError
from cloister.ring._select import NATIVE, key_hash

if TYPE_CHECKING:
    _CoreBase = _pure.RingCore
else:
    _CoreBase = _select.Core


class HashRing(RingMethods, _CoreBase):
    """An immutable consistent hash ring of named, weighted nodes.

    ``HashRing(nodes)``: ``nodes`` is an iterable of names (weight 1 each) or a mapping
    name -> weight (a finite number > 0). Names are non-empty str. Keys are str, bytes,
    int (not bool) and tuples of them; their owner is the same in every process.

    Lookups: ``key_to_node(key, exclude=())``, ``key_to_nodes(key, n, exclude=())``,
    ``slot_of(key)``, ``owner_of_slot(slot)``. Members: ``nodes``, ``weight(name)``,
    ``shares()``, ``len``, ``in``. Values: ``==``, ``hash``, ``fingerprint``. Derived rings:
    ``add_node(name, weight=1)``, ``remove_node(name)``. Lookups on an empty ring raise
    ``cloister.errors.EmptyRingError``.
    """

    __slots__ = ()


__all__ = [
    "NATIVE",
    "PARTITION_KEY",
    "SLOTS",
    "HashRing",
    "Key",
    "UnknownNodeError",
    "key_hash",
    "partition_key",
]
