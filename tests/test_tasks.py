"""Supervisor ownership: a killed node takes its components' tasks with it; a close does not."""

from __future__ import annotations

import asyncio

from cloister._tasks import Supervisor


async def test_kill_cancels_the_childrens_tasks_and_runs_nothing_more() -> None:
    node = Supervisor("node")
    component = node.child("component")
    ran: list[str] = []

    async def forever(name: str) -> None:
        ran.append(name)
        await asyncio.Event().wait()

    tasks = [node.spawn(forever("node"), "a"), component.spawn(forever("component"), "b")]
    await asyncio.sleep(0)
    node.kill()
    await asyncio.wait(tasks)
    assert all(t.cancelled() for t in tasks)
    assert component.killed
    late = component.spawn(forever("late"), "late")  # a timer firing after the death
    await asyncio.wait([late])
    assert late.cancelled() and ran == ["node", "component"]
    await component.close()
    await node.close()


async def test_closing_the_parent_leaves_a_child_to_its_own_owner() -> None:
    node = Supervisor("node")
    component = node.child("component")
    task = component.spawn(asyncio.sleep(0.05), "handover")
    await node.close()
    assert not task.done()  # the component stops itself, in its own order
    await component.close()
    assert task.done()
    assert node.child("after").killed is False
