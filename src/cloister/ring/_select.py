"""Pick the ring's implementation: the C accelerator, or the pure-Python fallback.

``CLOISTER_PURE_RING=1`` forces the fallback. A missing accelerator is logged once, as a
warning on the ``cloister.ring`` logger: results are the same, only slower.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import cast

from cloister.ring import _hash, _pure
from cloister.ring._hash import Key

logger = logging.getLogger("cloister.ring")


def pure_forced() -> bool:
    """Whether ``CLOISTER_PURE_RING`` asks for the pure-Python ring."""
    return os.environ.get("CLOISTER_PURE_RING", "").strip().lower() not in ("", "0", "false", "no")


def select() -> tuple[type[_pure.RingCore], Callable[[Key], int], bool]:
    """(core class, key hash function, whether they are the C ones)."""
    if pure_forced():
        logger.info("CLOISTER_PURE_RING is set: using the pure-Python hash ring")
        return _pure.RingCore, _hash.key_hash, False
    try:
        from cloister.ring import _native
    except ImportError as exc:
        logger.warning(
            "the C accelerator of the hash ring is not built (%s); using the pure-Python "
            "ring: same results, slower. Reinstall with a C compiler to build it.",
            exc,
        )
        return _pure.RingCore, _hash.key_hash, False
    return cast(type[_pure.RingCore], _native.RingCore), _native.key_hash, True


Core, key_hash, NATIVE = select()
