"""Cluster-wide storage built on the backend protocol: replicated tables.

:class:`Table` (``await cluster.table(name)``) is the mnesia analog: a key-value table
every node of the cluster reads and writes, durable in the backend, with atomic
:meth:`Table.update` and a live :meth:`Table.watch`. It is written once, over the
backend's :class:`~cloister.backends.KeyValue`, and so works on every backend.
"""

from __future__ import annotations

from cloister.store.table import (
    Table,
    TableEvent,
    TableOp,
    UpdateConflictError,
    check_table_name,
    open_table,
)

__all__ = [
    "Table",
    "TableEvent",
    "TableOp",
    "UpdateConflictError",
    "check_table_name",
    "open_table",
]
