"""`topics.admin.until_listed`: `orderbus topics apply` returns once the broker lists what it created."""

from __future__ import annotations

from typing import Any, cast

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from topics.admin import until_listed
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
