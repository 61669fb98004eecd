"""The control plane's resync loop ends when cancelled, even when a listing swallowed the
cancellation (as nats-py's requests can on Python 3.11): a node's stop must not wait a
second for the supervisor's second cancel."""

from __future__ import annotations

import asyncio

from cloister.cluster.control import ClusterCounters, Control


async def test_the_resync_loop_ends_when_a_listing_swallowed_the_cancellation() -> None:
    control = Control("a", heartbeat=10.0, counters=ClusterCounters(), wake=lambda: None)
    listing = asyncio.Event()
    swallowed = asyncio.Event()

    async def reload_members() -> None:  # a listing whose reply came with the cancel
        listing.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            swallowed.set()  # ... and returned it, as asyncio.wait_for can on 3.11

    async def reload_control() -> None:
        return None

    control.reload_members = reload_members  # type: ignore[method-assign]
    control.reload_control = reload_control  # type: ignore[method-assign]
    control.resync.set()  # resync at once, not after 5 heartbeats
    task = asyncio.ensure_future(control.resync_loop())
    await listing.wait()
    task.cancel()
    # One cancel is enough: the loop notices the cancellation it was asked for, rather
    # than waiting out its interval (50 s here) for a second one.
    done, _ = await asyncio.wait({task}, timeout=5.0)
    assert swallowed.is_set() and done == {task} and task.cancelled()
