"""`RetentionWatch`: the retention gauge follows the orders topic's retention.ms as its brokers say, not the setting."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Mapping

import pytest

from consumers.clock import FakeClock
from daemon.topic_retention import EVERY, Retention, RetentionWatch, retention_of
from topics.errors import BrokerError, RefusedError

WEEK = 168 * 3600.0


@pytest.mark.parametrize(
    ("configs", "expected"),
    [
        ({"retention.ms": "604800000", "retention.bytes": "-1"}, Retention(WEEK, None)),
        ({"retention.ms": "86400000"}, Retention(86400.0, None)),  # no retention.bytes described: no bound
        ({"retention.ms": "-1", "retention.bytes": "1073741824"}, Retention(math.inf, 1073741824)),
        ({}, None),  # the topic not described
        ({"retention.ms": None}, None),
        ({"retention.ms": "a week"}, None),
    ],
)
def test_the_retention_in_a_topics_configs(configs: Mapping[str, str | None], expected: Retention | None) -> None:
    assert retention_of(configs) == expected


class Topic:
    """The brokers' side: the configs they describe, or `BrokerError` while they do not answer."""

    def __init__(self, configs: dict[str, str]) -> None:
        self.configs: dict[str, str] | None = configs
        self.reads = 0

    async def read(self) -> Mapping[str, str | None]:
        self.reads += 1
        if self.configs is None:
            raise BrokerError("cannot describe topic configs at kafka:9092: connection refused")
        return dict(self.configs)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


async def test_the_gauge_holds_the_setting_until_the_topic_says_its_own_then_the_topics(
    caplog: pytest.LogCaptureFixture,
) -> None:
    shown: list[float] = []
    topic = Topic({"retention.ms": str(36 * 3_600_000), "retention.bytes": "-1"})
    watch = RetentionWatch("orders", topic.read, shown.append, WEEK, FakeClock())
    assert shown == [WEEK], "before any answer: the setting"
    with caplog.at_level(logging.DEBUG, "daemon.topic_retention"):
        assert await watch.look() == Retention(36 * 3600.0, None)
        assert shown[-1] == 36 * 3600.0
        await watch.look()  # the same difference again: not said again
        topic.configs = None  # the brokers away: the gauge keeps the last answer, which is said once
        assert await watch.look() is None
        assert await watch.look() is None
        assert shown[-1] == 36 * 3600.0
        topic.configs = {"retention.ms": str(int(WEEK * 1000))}  # set to the setting's: nothing to say
        await watch.look()
        assert shown[-1] == WEEK
        topic.configs = {"retention.ms": "-1"}  # kept forever: the alert can never fire
        await watch.look()
        assert shown[-1] == math.inf
    assert warnings(caplog) == [
        "the orders topic orders keeps its records 36 h, topics.orders_retention_hours says 168 h: "
        "OrderbusBacklogNearRetention follows the topic; set the one that is wrong to the other (orderbus topics "
        "apply reports the difference as drift and changes no existing topic)",
        "the orders topic's retention could not be read (cannot describe topic configs at kafka:9092: connection "
        "refused): OrderbusBacklogNearRetention stays held to 36 h until it is",
        "the orders topic orders keeps its records forever (retention.ms = -1), topics.orders_retention_hours says "
        "168 h: OrderbusBacklogNearRetention follows the topic; set the one that is wrong to the other (orderbus "
        "topics apply reports the difference as drift and changes no existing topic)",
    ]


async def test_a_size_bound_is_said_once_because_no_age_can_warn_of_it(caplog: pytest.LogCaptureFixture) -> None:
    shown: list[float] = []
    topic = Topic({"retention.ms": str(int(WEEK * 1000)), "retention.bytes": "1073741824"})
    watch = RetentionWatch("orders", topic.read, shown.append, WEEK, FakeClock())
    with caplog.at_level(logging.WARNING, "daemon.topic_retention"):
        await watch.look()
        await watch.look()
    (said,) = warnings(caplog)
    assert said.startswith("the orders topic orders has retention.bytes = 1073741824: Kafka deletes a partition's")
    assert "--entity-name orders --add-config retention.bytes=-1" in said
    assert shown == [WEEK, WEEK, WEEK]


async def test_it_reads_at_once_then_every_ten_minutes_until_cancelled() -> None:
    clock = FakeClock()
    topic = Topic({"retention.ms": "3600000"})
    watch = RetentionWatch("orders", topic.read, lambda _: None, WEEK, clock)
    task = asyncio.create_task(watch.run())
    try:
        await clock.advance(0)
        assert topic.reads == 1
        await clock.advance(EVERY - 1)
        assert topic.reads == 1
        await clock.advance(1)
        assert topic.reads == 2
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_retention_this_principal_may_not_read_says_which_grant(caplog: pytest.LogCaptureFixture) -> None:
    async def refused() -> Mapping[str, str | None]:
        raise RefusedError("the brokers did not describe the configs of orders: TopicAuthorizationFailedError")

    watch = RetentionWatch("orders", refused, lambda _: None, WEEK, FakeClock())
    with caplog.at_level(logging.WARNING, "daemon.topic_retention"):
        assert await watch.look() is None
    (said,) = warnings(caplog)
    assert said.endswith("stays held to 168 h until it is; grant DescribeConfigs on the topic")


async def test_a_bug_in_a_reading_is_said_and_the_next_reading_still_comes(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    readings: list[float] = []

    async def buggy() -> Mapping[str, str | None]:
        readings.append(clock.now())
        raise KeyError("a bug")

    watch = RetentionWatch("orders", buggy, lambda _: None, WEEK, clock)
    start = clock.now()
    task = asyncio.create_task(watch.run())
    try:
        await clock.advance(0)
        await clock.advance(EVERY)
        assert readings == [start, start + EVERY]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert [r.exc_info is not None for r in caplog.records if r.levelno == logging.ERROR] == [True, True]
