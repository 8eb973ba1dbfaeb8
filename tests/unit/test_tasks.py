"""Ending background tasks: every one cancelled and awaited, a failure that ended one raised, and the caller's own
cancellation never absorbed."""

from __future__ import annotations

import asyncio

import pytest

from consumers.tasks import cancel_and_wait


async def _forever(started: asyncio.Event, ended: list[str], name: str) -> None:
    started.set()
    try:
        await asyncio.Event().wait()
    finally:
        ended.append(name)


async def test_every_task_is_cancelled_and_has_ended_when_it_returns() -> None:
    ended: list[str] = []
    started = [asyncio.Event(), asyncio.Event()]
    tasks = [asyncio.create_task(_forever(event, ended, str(n))) for n, event in enumerate(started)]
    for event in started:
        await event.wait()

    await cancel_and_wait(*tasks)

    assert sorted(ended) == ["0", "1"]
    assert all(task.cancelled() for task in tasks)


async def test_a_task_that_had_died_raises_its_error_after_the_others_are_ended() -> None:
    async def dies() -> None:
        raise RuntimeError("the loop died")

    ended: list[str] = []
    started = asyncio.Event()
    dead = asyncio.create_task(dies())
    alive = asyncio.create_task(_forever(started, ended, "alive"))
    await started.wait()
    await asyncio.wait([dead])

    with pytest.raises(RuntimeError, match="the loop died"):
        await cancel_and_wait(dead, alive)
    assert ended == ["alive"]
    assert alive.cancelled()


async def test_a_task_that_finished_on_its_own_is_fine() -> None:
    async def returns() -> None:
        return None

    done = asyncio.create_task(returns())
    await done

    await cancel_and_wait(done)


async def test_the_caller_s_own_cancellation_goes_on() -> None:
    async def stubborn() -> None:
        # Cancelled, it takes a while to end; meanwhile the one waiting for it is cancelled too.
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            await release.wait()
            raise

    started, cancelled, release = asyncio.Event(), asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(stubborn())
    await started.wait()
    waiter = asyncio.create_task(cancel_and_wait(task))
    await cancelled.wait()  # the waiter has cancelled it and waits for it to end
    waiter.cancel()
    release.set()

    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert waiter.cancelled()
