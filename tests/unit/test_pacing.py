"""The per-sink pacer on a fake clock: token bucket, server holds, halving and stepwise recovery, fairness,
cancellation and live reload. Virtual time only: a 100-request burst takes 10 virtual seconds, and no real ones."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from itertools import pairwise

import pytest

from consumers.clock import FakeClock
from consumers.pacing import DECREASE_GUARD, Pacer
from topics.errors import ConfigError

START = 1000.0


async def acquire_all(pacer: Pacer, clock: FakeClock, count: int) -> list[float]:
    """Start `count` acquires at once (in order) and return the virtual time each one got through, in order."""
    times: list[float] = []

    async def one() -> None:
        await pacer.acquire()
        times.append(clock.now())

    async with clock.autojump():
        await asyncio.gather(*(one() for _ in range(count)))
    return times


def max_in_window(times: Sequence[float], width: float) -> int:
    """The most acquisitions in any half-open window [t, t + width)."""
    return max(sum(1 for u in times if t <= u < t + width - 1e-9) for t in times)


def returns_without_waiting(pacer: Pacer) -> bool:
    """Whether `acquire()` completes without suspending even once."""
    coroutine = pacer.acquire()
    try:
        coroutine.send(None)
    except StopIteration:
        return True
    coroutine.close()
    return False


# --- token bucket -------------------------------------------------------------------------------------------


async def test_a_burst_of_100_at_rate_10_takes_10_virtual_seconds_evenly_spaced() -> None:
    clock = FakeClock(start=START)
    times = await acquire_all(Pacer(10, clock=clock), clock, 100)
    assert times[0] == START  # the first goes at once; the 100th a tenth of a second before t+10
    assert times[-1] == pytest.approx(START + 9.9)
    assert all(b - a == pytest.approx(0.1) for a, b in pairwise(times))
    assert max_in_window(times, 1.0) == 10


async def test_a_burst_capacity_lets_that_many_go_at_once_and_never_more_than_burst_plus_rate() -> None:
    clock = FakeClock(start=START)
    times = await acquire_all(Pacer(10, clock=clock, burst=5), clock, 50)
    assert times[:5] == [START] * 5
    assert times[5] == pytest.approx(START + 0.1)
    assert times[-1] == pytest.approx(START + 4.5)
    assert max_in_window(times, 1.0) <= 5 + 10


async def test_tokens_accumulate_while_idle_up_to_burst_only() -> None:
    clock = FakeClock(start=START)
    pacer = Pacer(2, clock=clock, burst=3)
    await acquire_all(pacer, clock, 3)
    await clock.advance(60)
    times = await acquire_all(pacer, clock, 5)
    now = START + 60
    assert times == pytest.approx([now, now, now, now + 0.5, now + 1.0])


async def test_waiters_are_served_first_come_first_served_including_late_arrivals() -> None:
    clock = FakeClock(start=START)
    pacer = Pacer(1, clock=clock)
    order: list[str] = []

    async def one(name: str) -> None:
        await pacer.acquire()
        order.append(name)

    early = [asyncio.create_task(one(f"early{n}")) for n in range(3)]
    await clock.advance(0.5)
    late = [asyncio.create_task(one(f"late{n}")) for n in range(2)]
    await clock.run_until_idle()
    await asyncio.gather(*early, *late)
    assert order == ["early0", "early1", "early2", "late0", "late1"]
    assert clock.now() == START + 4


# --- holds (Retry-After) ------------------------------------------------------------------------------------


async def test_a_hold_blocks_every_acquirer_until_it_ends() -> None:
    clock = FakeClock(start=START)
    pacer = Pacer(100, clock=clock, burst=10)
    pacer.hold(2)
    assert pacer.held_until == START + 2
    assert pacer.last_retry_after == 2
    times = await acquire_all(pacer, clock, 3)
    assert times[0] == START + 2
    assert min(times) >= START + 2
    assert pacer.throttled_seconds == pytest.approx(2.0)


async def test_after_a_hold_one_request_goes_at_once_and_the_rest_follow_at_the_halved_rate() -> None:
    clock = FakeClock(start=START)
    pacer = Pacer(10, clock=clock, burst=10)
    pacer.hold(2)
    times = await acquire_all(pacer, clock, 4)
    assert times == pytest.approx([START + 2, START + 2.2, START + 2.4, START + 2.6])


async def test_throttled_time_counts_the_sink_once_not_each_caller_and_only_while_someone_waits() -> None:
    clock = FakeClock(start=START)
    pacer = Pacer(1000, clock=clock)
    pacer.hold(5)
    await clock.advance(3)  # nobody waits during these 3 seconds
    times = await acquire_all(pacer, clock, 20)
    assert times[0] == START + 5
    assert pacer.throttled_seconds == pytest.approx(2.0)  # the hold only, not the tokens' pace after it


async def test_a_shorter_hold_never_shortens_a_longer_one() -> None:
    clock = FakeClock(start=START)
    pacer = Pacer(10, clock=clock, min_rate=0.1)
    pacer.hold(10)
    pacer.hold(1)
    assert pacer.held_until == START + 10
    assert pacer.last_retry_after == 1
    assert (await acquire_all(pacer, clock, 1)) == [START + 10]


async def test_a_hold_of_zero_or_less_only_lowers_the_rate() -> None:
    clock = FakeClock(start=START)
    pacer = Pacer(10, clock=clock)
    pacer.hold(0)
    assert pacer.current_rate == 5
    await clock.advance(DECREASE_GUARD)
    pacer.hold(-3)
    assert pacer.last_retry_after == 0
    assert pacer.current_rate == 2.5
    assert pacer.held_until == START + DECREASE_GUARD
    assert returns_without_waiting(pacer)


async def test_a_hold_extended_while_callers_wait_keeps_them_waiting() -> None:
    clock = FakeClock(start=START)
    pacer = Pacer(10, clock=clock)
    pacer.hold(2)
    waiter = asyncio.create_task(pacer.acquire())
    await clock.advance(1)
    pacer.hold(5)
    await clock.advance(1.5)
    assert not waiter.done()
    await clock.run_until_idle()
    assert waiter.done()
    assert clock.now() == START + 6
    assert pacer.throttled_seconds == pytest.approx(6.0)


# --- lowered rate and recovery ------------------------------------------------------------------------------


async def test_a_hold_halves_the_rate_which_then_recovers_in_steps_after_the_hold_ends() -> None:
    clock = FakeClock(start=START)
    pacer = Pacer(10, clock=clock, recovery_interval=5.0)  # step: 10% of 10 = 1 per 5 s
    assert pacer.current_rate == 10
    pacer.hold(2)
    assert pacer.current_rate == 5
    await clock.advance(2 + 4.99)
    assert pacer.current_rate == 5
    await clock.advance(0.01)
    assert pacer.current_rate == 6
    rates = []
    for _ in range(6):
        await clock.advance(5)
        rates.append(pacer.current_rate)
    assert rates == pytest.approx([7, 8, 9, 10, 10, 10])


async def test_repeated_holds_halve_the_rate_down_to_min_rate_and_no_further() -> None:
    clock = FakeClock(start=START)
    pacer = Pacer(10, clock=clock, min_rate=1.0)
    rates = []
    for _ in range(6):
        pacer.hold(0)
        rates.append(pacer.current_rate)
        await clock.advance(DECREASE_GUARD)
    assert rates == pytest.approx([5, 2.5, 1.25, 1.0, 1.0, 1.0], abs=0.1)  # recovering a little between holds


async def test_a_burst_of_paced_answers_lowers_the_rate_once() -> None:
    # The answers to everything in flight when the server first said "slow down" come back together: 256 halvings
    # took a sink to min_rate for one burst.
    clock = FakeClock(start=START)
    pacer = Pacer(100, clock=clock)
    for _ in range(256):
        pacer.hold(2)
    assert pacer.current_rate == 50
    await clock.advance(2)  # the hold is over, and so is DECREASE_GUARD (shorter)
    pacer.hold(0)  # a "slow down" for a request sent after the hold lowers it again
    assert pacer.current_rate == 25
    pacer.hold(0)
    assert pacer.current_rate == 25


async def test_a_new_hold_during_recovery_halves_the_recovered_rate_and_restarts_the_steps() -> None:
    clock = FakeClock(start=START)
    pacer = Pacer(10, clock=clock, recovery_step=2.0, recovery_interval=1.0)
    pacer.hold(0)
    await clock.advance(1)
    assert pacer.current_rate == 7
    pacer.hold(3)
    assert pacer.current_rate == 3.5
    await clock.advance(3.999)
    assert pacer.current_rate == 3.5
    await clock.advance(0.001)
    assert pacer.current_rate == 5.5


async def test_the_rate_never_recovers_above_the_configured_rate() -> None:
    clock = FakeClock(start=START)
    pacer = Pacer(10, clock=clock, recovery_step=4.0, recovery_interval=1.0)
    pacer.hold(0)
    for expected in (5, 9, 10, 10):
        assert pacer.current_rate == expected
        await clock.advance(1)


async def test_a_min_rate_above_the_configured_rate_never_raises_it() -> None:
    clock = FakeClock(start=START)
    pacer = Pacer(0.5, clock=clock, min_rate=1.0)
    pacer.hold(0)
    assert pacer.current_rate == 0.5


async def test_tokens_follow_the_rate_exactly_across_a_recovery_step() -> None:
    clock = FakeClock(start=START)
    pacer = Pacer(10, clock=clock, recovery_step=5.0, recovery_interval=0.5)
    pacer.hold(0)  # 5/s until START + 0.5, then 10/s
    times = await acquire_all(pacer, clock, 6)
    # 0.4 -> 0.5 earns half a token at 5/s, the other half takes 0.05 s at 10/s.
    expected = [0.0, 0.2, 0.4, 0.55, 0.65, 0.75]
    assert times == pytest.approx([START + t for t in expected])


async def test_pacing_after_a_hold_speeds_up_as_the_rate_recovers() -> None:
    clock = FakeClock(start=START)
    pacer = Pacer(10, clock=clock, recovery_step=5.0, recovery_interval=1.0)
    pacer.hold(1)
    times = await acquire_all(pacer, clock, 11)
    assert times[0] == START + 1
    gaps = [b - a for a, b in pairwise(times)]
    assert gaps[:5] == pytest.approx([0.2] * 5)  # 5/s for the first second after the hold
    assert gaps[5:] == pytest.approx([0.1] * 5)  # then back to 10/s


# --- unlimited ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [None, 0, math.inf])
async def test_an_unlimited_pacer_returns_at_once(rate: float | None) -> None:
    clock = FakeClock(start=START)
    pacer = Pacer(rate, clock=clock)
    assert pacer.rate is None
    assert pacer.current_rate == math.inf
    assert all(returns_without_waiting(pacer) for _ in range(1000))
    assert clock.now() == START


async def test_an_unlimited_pacer_still_obeys_a_hold_but_is_not_slowed() -> None:
    clock = FakeClock(start=START)
    pacer = Pacer(None, clock=clock)
    pacer.hold(3)
    times = await acquire_all(pacer, clock, 10)
    assert times == [START + 3] * 10
    assert pacer.current_rate == math.inf


# --- cancellation -------------------------------------------------------------------------------------------


async def test_a_cancelled_head_waiter_takes_no_token_and_the_next_one_moves_up() -> None:
    clock = FakeClock(start=START)
    pacer = Pacer(1, clock=clock)
    await pacer.acquire()  # the only token: the next comes at START + 1
    done: dict[str, float] = {}

    async def one(name: str) -> None:
        await pacer.acquire()
        done[name] = clock.now()

    head = asyncio.create_task(one("head"))
    second = asyncio.create_task(one("second"))
    await clock.advance(0.5)
    head.cancel()
    await clock.run_until_idle()
    await second
    assert head.cancelled()
    assert done == {"second": START + 1}


async def test_a_cancelled_queued_waiter_takes_no_token_either() -> None:
    clock = FakeClock(start=START)
    pacer = Pacer(1, clock=clock)
    await pacer.acquire()
    done: dict[str, float] = {}

    async def one(name: str) -> None:
        await pacer.acquire()
        done[name] = clock.now()

    tasks = {name: asyncio.create_task(one(name)) for name in ("a", "b", "c")}
    await clock.advance(0.5)
    tasks["b"].cancel()
    await clock.run_until_idle()
    assert done == {"a": START + 1, "c": START + 2}


async def test_a_waiter_cancelled_during_a_hold_counts_its_throttled_time_so_far() -> None:
    clock = FakeClock(start=START)
    pacer = Pacer(10, clock=clock)
    pacer.hold(10)
    waiter = asyncio.create_task(pacer.acquire())
    await clock.advance(4)
    waiter.cancel()
    await clock.advance(0)
    assert waiter.cancelled()
    assert pacer.throttled_seconds == pytest.approx(4.0)
    assert clock.sleepers == 0


# --- live reload --------------------------------------------------------------------------------------------


async def test_raising_the_rate_replans_a_waiter_at_once() -> None:
    clock = FakeClock(start=START)
    pacer = Pacer(0.1, clock=clock)  # one per 10 s
    await pacer.acquire()
    waiter = asyncio.create_task(pacer.acquire())
    await clock.advance(1)  # 0.1 token earned so far
    pacer.set_rate(10)
    await clock.advance(0.0899)
    assert not waiter.done()
    await clock.advance(0.0002)
    assert waiter.done()
    assert pacer.rate == 10


async def test_lowering_the_rate_applies_from_now_on() -> None:
    clock = FakeClock(start=START)
    pacer = Pacer(10, clock=clock)
    pacer.set_rate(2)
    times = await acquire_all(pacer, clock, 3)
    assert times == pytest.approx([START, START + 0.5, START + 1.0])


async def test_switching_to_unlimited_releases_every_waiter() -> None:
    clock = FakeClock(start=START)
    pacer = Pacer(1, clock=clock)
    await pacer.acquire()
    waiters = [asyncio.create_task(pacer.acquire()) for _ in range(5)]
    await clock.advance(0.1)
    pacer.set_rate(None)
    await clock.advance(0)
    assert all(w.done() for w in waiters)
    assert clock.now() == START + 0.1


async def test_switching_from_unlimited_to_limited_starts_with_a_full_bucket() -> None:
    clock = FakeClock(start=START)
    pacer = Pacer(None, clock=clock, burst=2)
    pacer.set_rate(4)
    times = await acquire_all(pacer, clock, 4)
    assert times == pytest.approx([START, START, START + 0.25, START + 0.5])


async def test_a_new_rate_at_or_below_the_lowered_rate_ends_the_recovery() -> None:
    clock = FakeClock(start=START)
    pacer = Pacer(10, clock=clock)
    pacer.hold(0)
    assert pacer.current_rate == 5
    pacer.set_rate(4)
    assert pacer.current_rate == 4
    pacer.set_rate(8)
    assert pacer.current_rate == 8


async def test_a_lowered_rate_keeps_recovering_towards_a_new_higher_rate() -> None:
    clock = FakeClock(start=START)
    pacer = Pacer(10, clock=clock, recovery_step=2.0, recovery_interval=1.0)
    pacer.hold(0)
    pacer.set_rate(20)
    assert pacer.current_rate == 5
    await clock.advance(10)
    assert pacer.current_rate == 20


# --- settings -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "kwargs", "message"),
    [
        (-1.0, {}, "pacing rate must be >= 0"),
        (math.nan, {}, "pacing rate must be >= 0"),
        (10.0, {"burst": 0}, "pacing burst must be"),
        (10.0, {"min_rate": 0.0}, "pacing min_rate must be"),
        (10.0, {"recovery_step": -1.0}, "pacing recovery_step must be"),
        (10.0, {"recovery_interval": 0.0}, "pacing recovery_interval must be"),
    ],
)
def test_bad_settings_are_config_errors(rate: float, kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Pacer(rate, clock=FakeClock(), **kwargs)  # type: ignore[arg-type]


def test_set_rate_validates_like_the_constructor() -> None:
    pacer = Pacer(10, clock=FakeClock())
    with pytest.raises(ConfigError, match="pacing rate"):
        pacer.set_rate(-5)
    assert pacer.rate == 10
    assert pacer.burst == 1
