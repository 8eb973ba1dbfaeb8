"""Static membership: the consumer's options, and the watch that tells a name used twice."""

from __future__ import annotations

import pytest

from consumers.clock import FakeClock
from consumers.membership import (
    CHURN_LIMIT,
    CHURN_WINDOW,
    DYNAMIC,
    DYNAMIC_SESSION_TIMEOUT,
    JOIN_WAIT,
    STATIC_SESSION_TIMEOUT,
    ChurnWatch,
    Membership,
)


def test_a_name_makes_a_static_member_with_a_session_a_restart_fits_in() -> None:
    assert DYNAMIC.consumer_options() == {"group_instance_id": None, "session_timeout_ms": 6000}
    static = {"group_instance_id": "orderbus-0", "session_timeout_ms": 45000}
    assert Membership("orderbus-0").consumer_options() == static
    assert Membership("orderbus-0", 120).session_timeout_ms == 120_000
    assert Membership(None, 10.5).session_timeout_ms == 10_500
    assert DYNAMIC_SESSION_TIMEOUT < STATIC_SESSION_TIMEOUT


async def _assign(watch: ChurnWatch, clock: FakeClock, times: int, every: float) -> list[str | None]:
    """Assign `times` times, `every` seconds apart; what each assignment said."""
    said = []
    for _ in range(times):
        said.append(watch.assigned())
        await clock.advance(every)
    return said


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def test_assignments_at_every_heartbeat_say_the_name_is_used_twice_once(clock: FakeClock) -> None:
    watch = ChurnWatch(Membership("orderbus-0"), "orderbus.crm", clock)
    said = await _assign(watch, clock, CHURN_LIMIT - 1, 2.0)
    assert said == [None] * (CHURN_LIMIT - 1)
    assert watch.problem is None
    first = watch.assigned()
    assert first is not None
    assert "another consumer of group orderbus.crm runs under kafka.group_instance_id 'orderbus-0'" in first
    assert watch.problem == first
    assert await _assign(watch, clock, 5, 2.0) == [None] * 5, "said once while it lasts"
    assert watch.problem is not None


async def test_the_problem_ends_once_the_last_assignments_spread_past_a_window_and_can_be_said_again(
    clock: FakeClock,
) -> None:
    watch = ChurnWatch(Membership("orderbus-0"), "orderbus.crm", clock)
    await _assign(watch, clock, CHURN_LIMIT, 2.0)
    assert watch.problem is not None
    await clock.advance(CHURN_WINDOW)  # the other instance was stopped: no assignment since
    assert watch.problem is None
    assert await _assign(watch, clock, CHURN_LIMIT - 1, 2.0) == [None] * (CHURN_LIMIT - 1), "the old ones are too old"
    assert watch.assigned() is not None, "it started again"


async def test_a_few_rebalances_of_a_rolling_deploy_are_not_churn(clock: FakeClock) -> None:
    watch = ChurnWatch(Membership("orderbus-0"), "orderbus.crm", clock)
    spread = CHURN_WINDOW / (CHURN_LIMIT - 1) + 0.1  # never CHURN_LIMIT within a window
    assert await _assign(watch, clock, CHURN_LIMIT * 3, spread) == [None] * (CHURN_LIMIT * 3)
    assert watch.problem is None


async def test_a_dynamic_member_is_never_said_to_churn(clock: FakeClock) -> None:
    watch = ChurnWatch(DYNAMIC, "orderbus.crm", clock)
    assert await _assign(watch, clock, CHURN_LIMIT * 2, 0.1) == [None] * (CHURN_LIMIT * 2)
    assert watch.problem is None
    watch.revoked()
    await clock.advance(JOIN_WAIT * 2)
    assert watch.problem is None, "without a name: joining, as ever"


async def test_a_static_member_out_of_its_group_longer_than_a_join_takes_says_its_name_may_be_taken(
    clock: FakeClock,
) -> None:
    watch = ChurnWatch(Membership("orderbus-0"), "orderbus.crm", clock)
    await clock.advance(JOIN_WAIT)
    assert watch.problem is None, "a join may wait for the others' drains that long"
    await clock.advance(1)
    said = watch.problem
    assert said is not None
    assert said.startswith(f"not in consumer group orderbus.crm for {JOIN_WAIT + 1:.0f} s")
    assert "another instance runs under kafka.group_instance_id 'orderbus-0' too" in said
    assert watch.assigned() is None
    assert watch.problem is None, "in the group"


async def test_out_of_the_group_after_a_rebalance_counts_from_the_revoke_not_from_the_start(clock: FakeClock) -> None:
    # Refused after it had joined once (its partitions revoked, never assigned again): said the same way.
    watch = ChurnWatch(Membership("orderbus-0"), "orderbus.crm", clock)
    watch.assigned()
    await clock.advance(3600)
    watch.revoked()
    await clock.advance(10)
    watch.revoked()  # another rebalance before any assignment: the first revoke counts
    assert watch.problem is None
    await clock.advance(JOIN_WAIT)
    assert watch.problem is not None
    watch.assigned()
    assert watch.problem is None


async def test_churn_is_said_between_a_revoke_and_the_next_assignment_too(clock: FakeClock) -> None:
    # Review: fenced in turn, a member is revoked before each rejoin; returning None until the next assignment made
    # /readyz go back and forth, and a scrape in the gap reset OrderbusNotReady's 5 minutes.
    watch = ChurnWatch(Membership("orderbus-0"), "orderbus.crm", clock)
    for _ in range(CHURN_LIMIT):
        watch.assigned()
        await clock.advance(1.0)
        watch.revoked()
        await clock.advance(1.0)
    assert watch.problem is not None
    assert watch.problem.startswith(f"assigned {CHURN_LIMIT} times")
