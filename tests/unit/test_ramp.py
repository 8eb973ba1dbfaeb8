"""The slow start after a circuit closes (`consumers.ramp.Ramp`): the answers pace it, no clock."""

from __future__ import annotations

import asyncio

import pytest

from consumers.ramp import Ramp
from topics.errors import ConfigError


async def started(ramp: Ramp) -> asyncio.Task[int | None]:
    task = asyncio.create_task(ramp.acquire())
    await asyncio.sleep(0)  # let it take its place or queue
    return task


async def test_a_sink_that_is_not_ramping_is_not_limited() -> None:
    ramp = Ramp(8)
    assert ramp.limit is None
    assert [await ramp.acquire() for _ in range(20)] == [None] * 20
    ramp.release(None)
    ramp.succeeded(None)
    assert ramp.limit is None


async def test_after_a_close_two_go_then_one_more_for_each_success_until_the_ceiling() -> None:
    ramp = Ramp(5)
    ramp.begin()
    first, second = await ramp.acquire(), await ramp.acquire()
    third = await started(ramp)
    assert not third.done(), "the third waits: two in flight allowed"
    ramp.succeeded(first)  # the limit is 3
    await asyncio.sleep(0)
    assert third.done()
    fourth, fifth = await started(ramp), await started(ramp)
    ramp.release(first)
    await asyncio.sleep(0)
    assert fourth.done()
    assert not fifth.done(), "first come, first served, within the limit"
    ramp.succeeded(second)  # 4
    await asyncio.sleep(0)
    assert fifth.done()
    sixth = await started(ramp)
    assert not sixth.done()
    ramp.succeeded(third.result())  # 5: the ceiling, the ramp ends and every waiter goes uncounted
    assert ramp.limit is None
    await asyncio.sleep(0)
    assert sixth.result() is None
    ramp.release(second)
    ramp.release(fifth.result())
    assert await ramp.acquire() is None


async def test_only_the_answers_of_requests_this_ramp_admitted_widen_it() -> None:
    ramp = Ramp(64)
    ramp.begin()
    old = await ramp.acquire()
    ramp.begin()  # the circuit opened and closed again while `old`'s request was under way
    ramp.succeeded(old)
    ramp.succeeded(None)  # a request sent before the ramp began (no ticket)
    assert ramp.limit == 2
    ramp.succeeded(await ramp.acquire())
    assert ramp.limit == 3


async def test_a_ticket_of_an_earlier_ramp_does_not_free_a_place_in_the_new_one() -> None:
    ramp = Ramp(10)
    ramp.begin()
    old = await ramp.acquire()
    ramp.begin()  # the circuit opened and closed again while `old`'s request was under way
    a, b = await ramp.acquire(), await ramp.acquire()
    waiting = await started(ramp)
    ramp.release(old)
    await asyncio.sleep(0)
    assert not waiting.done(), "the new ramp still has its two requests in flight"
    ramp.release(a)
    await asyncio.sleep(0)
    assert waiting.done()
    ramp.release(b)


async def test_a_waiter_cancelled_takes_no_place_and_one_admitted_as_it_is_cancelled_gives_it_on() -> None:
    ramp = Ramp(10)
    ramp.begin()
    a, _ = await ramp.acquire(), await ramp.acquire()
    gone, admitted_then_gone, next_one = await started(ramp), await started(ramp), await started(ramp)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    ramp.release(a)  # admits `admitted_then_gone`, which is cancelled before it runs
    admitted_then_gone.cancel()
    await asyncio.gather(admitted_then_gone, return_exceptions=True)
    await asyncio.sleep(0)
    assert next_one.done(), "the place went on to the next waiter"


def test_a_start_at_or_above_the_ceiling_is_no_ramp_and_bad_sizes_are_refused() -> None:
    ramp = Ramp(2, start=2)
    ramp.begin()
    assert ramp.limit is None
    with pytest.raises(ConfigError, match="ceiling"):
        Ramp(0)
    with pytest.raises(ConfigError, match="start"):
        Ramp(4, start=0)
