"""`topics.admin`: `orderbus topics apply` returns once the broker lists what it created, or describes what it grew."""

from __future__ import annotations

from typing import Any, cast

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions
from aiokafka.errors import InvalidPartitionsError

from topics.admin import _grow, until_listed
from topics.errors import BrokerError


class Listing:
    """An admin client whose listing shows the created topics only from its `after`-th call on."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.calls = 0

    async def list_topics(self) -> list[str]:
        self.calls += 1
        return ["other", "orders", "orders.dlq.crm"] if self.calls >= self.after else ["other"]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


async def test_it_waits_until_the_broker_lists_the_created_topics() -> None:
    # Regression (clean-clone run): a daemon started right after the apply found "topic ... does not exist".
    admin, clock = Listing(after=4), Clock()
    await until_listed(
        cast(AIOKafkaAdminClient, admin), ["orders", "orders.dlq.crm"], 30.0, sleep=clock.sleep, clock=clock
    )
    assert admin.calls == 4
    assert clock.now == pytest.approx(0.3)


async def test_a_topic_never_listed_is_an_error_naming_it() -> None:
    admin, clock = Listing(after=10**9), Clock()
    with pytest.raises(BrokerError, match=r"not listed them after 2 s: orders, orders.dlq.crm"):
        await until_listed(cast(Any, admin), ["orders.dlq.crm", "orders"], 2.0, sleep=clock.sleep, clock=clock)


class Growing:
    """An admin client that grows topics: `refuse` makes create_partitions fail (as when another apply grew them
    first, if `counts` already say so), and `lag` calls of describe still show the counts from before."""

    def __init__(self, counts: dict[str, int], *, refuse: bool = False, lag: int = 0) -> None:
        self.counts = counts
        self.refuse = refuse
        self.lag = lag
        self.asked: dict[str, int] = {}

    async def create_partitions(self, wanted: dict[str, NewPartitions], timeout_ms: int) -> None:
        if self.refuse:
            raise InvalidPartitionsError("Could not create partitions for orders.replay.crm: already has 12")
        self.asked = {name: spec.total_count for name, spec in wanted.items()}

    async def describe_topics(self, names: list[str]) -> list[dict[str, Any]]:
        if self.lag:
            self.lag -= 1
        else:
            self.counts.update(self.asked)
        return [{"topic": name, "partitions": [{}] * self.counts[name]} for name in names]


async def test_grown_partitions_are_waited_for_until_the_broker_describes_them() -> None:
    admin, clock = Growing({"orders.replay.crm": 3}, lag=3), Clock()
    await _grow(cast(Any, admin), {"orders.replay.crm": 12}, 30.0, sleep=clock.sleep, clock=clock)
    assert admin.counts == {"orders.replay.crm": 12}
    assert clock.now == pytest.approx(0.3)


async def test_another_applys_growth_is_the_state_wanted_and_a_refusal_otherwise_names_the_topic() -> None:
    clock = Clock()
    done = Growing({"orders.replay.crm": 12}, refuse=True)
    await _grow(cast(Any, done), {"orders.replay.crm": 12}, 30.0, sleep=clock.sleep, clock=clock)
    short = Growing({"orders.replay.crm": 3, "orders.replay.shipping": 12}, refuse=True)
    with pytest.raises(BrokerError, match=r"cannot add partitions to orders\.replay\.crm: \[Error 37\]"):
        await _grow(cast(Any, short), {"orders.replay.crm": 12, "orders.replay.shipping": 12}, 30.0, sleep=clock.sleep)


async def test_partitions_never_described_are_an_error_naming_them() -> None:
    admin, clock = Growing({"orders.replay.crm": 3}, lag=10**9), Clock()
    with pytest.raises(BrokerError, match=r"does not describe them after 2 s: orders\.replay\.crm"):
        await _grow(cast(Any, admin), {"orders.replay.crm": 12}, 2.0, sleep=clock.sleep, clock=clock)
