"""Coarse deadlines: a scope times out like asyncio.timeout, at most one resolution late, with one sweeper."""

from __future__ import annotations

import asyncio

import pytest

from consumers.clock import FakeClock
from consumers.deadlines import Deadlines

RESOLUTION = 0.05


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=0.0)


async def wait_within(deadlines: Deadlines, seconds: float, until: asyncio.Event) -> str:
    try:
        with deadlines.within(seconds):
            await until.wait()
    except TimeoutError:
        return "timeout"
    return "done"


async def test_a_scope_past_its_deadline_times_out_never_early_and_at_most_one_resolution_late(
    clock: FakeClock,
) -> None:
    deadlines = Deadlines(clock, resolution=RESOLUTION)
    task = asyncio.create_task(wait_within(deadlines, 1.0, asyncio.Event()))
    await clock.advance(0.99)
    assert not task.done()
    await clock.advance(RESOLUTION + 0.01)
    assert task.done()
    assert task.result() == "timeout"
    assert deadlines.open == 0


async def test_a_scope_that_ends_in_time_is_untouched_and_the_sweeper_stops_when_none_is_open(
    clock: FakeClock,
) -> None:
    deadlines = Deadlines(clock, resolution=RESOLUTION)
    answered = asyncio.Event()
    task = asyncio.create_task(wait_within(deadlines, 1.0, answered))
    await clock.advance(0.5)
    answered.set()
    assert await task == "done"
    assert deadlines.open == 0
    await clock.advance(RESOLUTION)
    assert clock.sleepers == 0  # the sweeper ended: nothing is open
    await clock.advance(10.0)
    late = asyncio.create_task(wait_within(deadlines, 1.0, asyncio.Event()))
    await clock.advance(1.0 + RESOLUTION)
    assert late.done()  # a scope opened later starts a sweeper again
    assert late.result() == "timeout"


async def test_only_the_expired_scopes_of_many_time_out(clock: FakeClock) -> None:
    deadlines = Deadlines(clock, resolution=RESOLUTION)
    never = asyncio.Event()
    short = [asyncio.create_task(wait_within(deadlines, 1.0, never)) for _ in range(50)]
    long = [asyncio.create_task(wait_within(deadlines, 5.0, never)) for _ in range(50)]
    await clock.advance(1.1)
    assert all(t.done() and t.result() == "timeout" for t in short)
    assert not any(t.done() for t in long)
    assert deadlines.open == 50
    await clock.advance(4.0)
    assert all(t.done() and t.result() == "timeout" for t in long)


async def test_a_cancellation_from_elsewhere_stays_a_cancellation(clock: FakeClock) -> None:
    deadlines = Deadlines(clock, resolution=RESOLUTION)
    task = asyncio.create_task(wait_within(deadlines, 1.0, asyncio.Event()))
    await clock.advance(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert deadlines.open == 0


async def test_a_timed_out_task_goes_on_without_a_pending_cancellation(clock: FakeClock) -> None:
    deadlines = Deadlines(clock, resolution=RESOLUTION)

    async def timed_out_then_more() -> tuple[str, int]:
        outcome = await wait_within(deadlines, 0.1, asyncio.Event())
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()  # our cancel taken back: an asyncio.timeout later would misread it
        await clock.sleep(1.0)  # and a cancellation left pending would surface here
        return outcome, cancelling

    task = asyncio.create_task(timed_out_then_more())
    await clock.advance(2.0)
    assert await task == ("timeout", 0)


async def test_a_scope_outside_a_task_is_refused(clock: FakeClock) -> None:
    deadlines = Deadlines(clock)
    loop = asyncio.get_running_loop()
    errors: list[BaseException] = []

    def in_a_callback() -> None:
        try:
            with deadlines.within(1.0):
                pass
        except RuntimeError as exc:
            errors.append(exc)

    loop.call_soon(in_a_callback)
    await asyncio.sleep(0)
    assert [str(e) for e in errors] == ["a deadline scope must be entered inside a task"]
