"""The fake clock: virtual time that moves only when the test says so, wakes sleepers in order, and autojumps."""

from __future__ import annotations

import asyncio
import math

import pytest

from consumers.clock import Clock, FakeClock, SystemClock


async def sleep_and_log(clock: FakeClock, seconds: float, log: list[tuple[str, float]], name: str) -> None:
    await clock.sleep(seconds)
    log.append((name, clock.now()))


def test_both_clocks_satisfy_the_protocol() -> None:
    clocks: list[Clock] = [SystemClock(), FakeClock()]
    assert len(clocks) == 2


async def test_system_clock_reads_real_time_and_sleeps_zero_without_waiting() -> None:
    clock = SystemClock()
    before = clock.now()
    await clock.sleep(0)
    await clock.sleep(-1)
    assert clock.now() >= before
    assert clock.wall() > 1_600_000_000


def test_fake_clock_starts_where_told_and_wall_time_follows_virtual_time() -> None:
    clock = FakeClock(start=50.0, wall_start=1_700_000_000.0)
    assert clock.now() == 50.0
    assert clock.wall() == 1_700_000_000.0
    assert clock.next_wakeup is None
    assert clock.sleepers == 0


async def test_advance_moves_time_and_wall_time_together() -> None:
    clock = FakeClock()
    await clock.advance(2.5)
    assert clock.now() == 1002.5
    assert clock.wall() == 1_800_000_002.5


async def test_advance_rejects_negative_time() -> None:
    clock = FakeClock()
    with pytest.raises(ValueError, match="cannot advance"):
        await clock.advance(-1)
    with pytest.raises(ValueError, match="cannot advance"):
        await clock.advance(math.nan)


async def test_a_sleeper_wakes_exactly_at_its_deadline_and_not_before() -> None:
    clock = FakeClock()
    log: list[tuple[str, float]] = []
    task = asyncio.create_task(sleep_and_log(clock, 3, log, "a"))
    await clock.advance(0)
    assert clock.sleepers == 1
    assert clock.next_wakeup == 1003.0
    await clock.advance(2.999)
    assert log == []
    await clock.advance(0.001)
    assert log == [("a", 1003.0)]
    assert task.done()


async def test_advance_wakes_sleepers_in_deadline_order_with_time_set_to_each_deadline() -> None:
    clock = FakeClock()
    log: list[tuple[str, float]] = []
    tasks = [
        asyncio.create_task(sleep_and_log(clock, 5, log, "late")),
        asyncio.create_task(sleep_and_log(clock, 1, log, "early")),
        asyncio.create_task(sleep_and_log(clock, 3, log, "middle")),
    ]
    await clock.advance(10)
    assert log == [("early", 1001.0), ("middle", 1003.0), ("late", 1005.0)]
    assert clock.now() == 1010.0
    await asyncio.gather(*tasks)


async def test_equal_deadlines_wake_in_the_order_the_sleeps_began() -> None:
    clock = FakeClock()
    log: list[tuple[str, float]] = []
    tasks = [asyncio.create_task(sleep_and_log(clock, 1, log, name)) for name in "abcde"]
    await clock.advance(1)
    assert [name for name, _ in log] == list("abcde")
    await asyncio.gather(*tasks)


async def test_a_sleeper_that_sleeps_again_is_woken_again_within_one_advance() -> None:
    clock = FakeClock()
    ticks: list[float] = []

    async def ticker() -> None:
        for _ in range(4):
            await clock.sleep(1)
            ticks.append(clock.now())

    task = asyncio.create_task(ticker())
    await clock.advance(10)
    assert ticks == [1001.0, 1002.0, 1003.0, 1004.0]
    assert task.done()


async def test_woken_coroutines_run_through_their_non_clock_awaits_before_advance_returns() -> None:
    clock = FakeClock()
    queue: asyncio.Queue[int] = asyncio.Queue()
    seen: list[int] = []

    async def producer() -> None:
        await clock.sleep(1)
        for n in range(3):
            await queue.put(n)
            await asyncio.sleep(0)

    async def consumer() -> None:
        for _ in range(3):
            seen.append(await queue.get())

    tasks = [asyncio.create_task(producer()), asyncio.create_task(consumer())]
    await clock.advance(1)
    assert seen == [0, 1, 2]
    assert all(task.done() for task in tasks)


async def test_sleep_of_zero_or_less_only_yields() -> None:
    clock = FakeClock()
    await clock.sleep(0)
    await clock.sleep(-5)
    assert clock.now() == 1000.0
    assert clock.sleepers == 0


async def test_a_cancelled_sleeper_is_skipped_and_does_not_hold_time_back() -> None:
    clock = FakeClock()
    log: list[tuple[str, float]] = []
    cancelled = asyncio.create_task(sleep_and_log(clock, 1, log, "cancelled"))
    kept = asyncio.create_task(sleep_and_log(clock, 2, log, "kept"))
    await clock.advance(0)
    cancelled.cancel()
    await clock.advance(0)
    assert clock.sleepers == 1
    assert clock.next_wakeup == 1002.0
    await clock.run_until_idle()
    assert log == [("kept", 1002.0)]
    assert cancelled.cancelled()
    await kept


async def test_run_until_idle_jumps_from_wakeup_to_wakeup_until_nothing_sleeps() -> None:
    clock = FakeClock()
    log: list[tuple[str, float]] = []
    tasks = [asyncio.create_task(sleep_and_log(clock, s, log, f"s{s}")) for s in (100, 0.5, 30)]
    await clock.run_until_idle()
    assert log == [("s0.5", 1000.5), ("s30", 1030.0), ("s100", 1100.0)]
    assert clock.now() == 1100.0
    await asyncio.gather(*tasks)


async def test_run_until_idle_stops_at_its_limit_when_something_keeps_sleeping() -> None:
    clock = FakeClock()
    ticks: list[float] = []

    async def forever() -> None:
        while True:
            await clock.sleep(10)
            ticks.append(clock.now())

    task = asyncio.create_task(forever())
    await clock.run_until_idle(limit=35)
    assert ticks == [1010.0, 1020.0, 1030.0]
    assert clock.now() == 1035.0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_run_until_idle_ignores_tasks_blocked_on_something_other_than_the_clock() -> None:
    clock = FakeClock()
    never: asyncio.Event = asyncio.Event()
    task = asyncio.create_task(never.wait())
    await clock.run_until_idle()
    assert clock.now() == 1000.0
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_infinite_sleep_never_wakes_and_never_blocks_run_until_idle() -> None:
    clock = FakeClock()
    task = asyncio.create_task(clock.sleep(math.inf))
    await clock.run_until_idle()
    assert not task.done()
    assert clock.next_wakeup is None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_autojump_runs_a_long_scenario_by_jumping_whenever_all_tasks_wait() -> None:
    clock = FakeClock()

    async def scenario() -> list[float]:
        seen: list[float] = []
        for seconds in (60, 0.25, 3600):
            await clock.sleep(seconds)
            seen.append(clock.now() - 1000.0)
        return seen

    async with clock.autojump():
        first, second = await asyncio.gather(scenario(), scenario())
    assert first == second == [60.0, 60.25, 3660.25]
    assert clock.now() == 4660.25


async def test_autojump_waits_for_new_sleepers_and_ends_cleanly() -> None:
    clock = FakeClock()
    async with clock.autojump():
        await asyncio.sleep(0)
        await clock.sleep(5)
        assert clock.now() == 1005.0
        await clock.sleep(5)
        assert clock.now() == 1010.0
    await clock.run_until_idle()
    assert clock.now() == 1010.0


async def test_autojump_cannot_be_nested() -> None:
    clock = FakeClock()
    async with clock.autojump():
        with pytest.raises(RuntimeError, match="already running"):
            async with clock.autojump():
                pass  # pragma: no cover


async def test_a_task_that_never_stops_spinning_is_reported_not_waited_on_forever() -> None:
    clock = FakeClock()

    async def spin() -> None:
        for _ in range(30_000):  # longer than the clock's patience of 10,000 loop turns
            await asyncio.sleep(0)

    task = asyncio.create_task(spin())
    with pytest.raises(RuntimeError, match="did not go idle"):
        await clock.advance(1)
    await task
