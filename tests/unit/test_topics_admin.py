"""`topics.admin`: `orderbus topics apply` returns once the broker lists what it created, or describes what it grew."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.errors import InvalidPartitionsError, KafkaError, TopicAuthorizationFailedError

from topics.admin import _apply, _grow, until_listed
from topics.catalogue import TopicLayout, TopicSpec, catalogue
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

    def __init__(
        self,
        counts: dict[str, int],
        *,
        refuse: bool = False,
        lag: int = 0,
        error: type[KafkaError] = InvalidPartitionsError,
    ) -> None:
        self.counts = counts
        self.refuse = refuse
        self.error = error
        self.lag = lag
        self.asked: dict[str, int] = {}

    async def create_partitions(self, wanted: dict[str, NewPartitions], timeout_ms: int) -> None:
        if self.refuse:
            raise self.error("Could not create partitions for orders.replay.crm")
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
    assert clock.now == 0
    short = Growing({"orders.replay.crm": 3, "orders.replay.shipping": 12}, refuse=True)
    with pytest.raises(BrokerError, match=r"of orders\.replay\.crm: the broker refused \(\[Error 37\] .*after 2 s$"):
        await _grow(
            cast(Any, short),
            {"orders.replay.crm": 12, "orders.replay.shipping": 12},
            2.0,
            sleep=clock.sleep,
            clock=clock,
        )
    denied = Growing({"orders.replay.crm": 3}, refuse=True, error=TopicAuthorizationFailedError)
    with pytest.raises(BrokerError, match=r"^cannot add partitions to orders\.replay\.crm: \[Error 29\]"):
        await _grow(cast(Any, denied), {"orders.replay.crm": 12}, 2.0, sleep=clock.sleep, clock=clock)


async def test_partitions_never_described_are_an_error_naming_them() -> None:
    admin, clock = Growing({"orders.replay.crm": 3}, lag=10**9), Clock()
    with pytest.raises(
        BrokerError, match=r"of orders\.replay\.crm: added, but the broker does not describe them, after 2 s"
    ):
        await _grow(cast(Any, admin), {"orders.replay.crm": 12}, 2.0, sleep=clock.sleep, clock=clock)


class Cluster:
    """An admin client over topics held in a dict (name -> partitions); `undescribed` are listed but not described
    yet (their partitions have no leader). Configs are as the catalogue says, so only partitions can drift."""

    def __init__(self, topics: dict[str, int], specs: Sequence[TopicSpec], undescribed: tuple[str, ...] = ()) -> None:
        self.topics = dict(topics)
        self.configs = {spec.name: spec.configs for spec in specs}
        self.undescribed = set(undescribed)
        self.created: dict[str, int] = {}
        self.grown: dict[str, int] = {}

    async def list_topics(self) -> list[str]:
        return list(self.topics)

    async def describe_topics(self, names: list[str]) -> list[dict[str, Any]]:
        return [
            {"topic": n, "error_code": 5, "partitions": []}
            if n in self.undescribed
            else {"topic": n, "error_code": 0, "partitions": [{}] * self.topics[n]}
            for n in names
        ]

    async def create_topics(self, new: list[NewTopic], timeout_ms: int) -> SimpleNamespace:
        for topic in new:
            self.created[topic.name] = self.topics[topic.name] = topic.num_partitions
        errors = [{"topic": topic.name, "error_code": 0} for topic in new]
        return SimpleNamespace(to_object=lambda: {"topic_errors": errors})

    async def create_partitions(self, wanted: dict[str, NewPartitions], timeout_ms: int) -> None:
        for name, spec in wanted.items():
            self.grown[name] = self.topics[name] = spec.total_count

    async def describe_configs(self, resources: list[Any]) -> list[SimpleNamespace]:
        # As a broker answers: each resource asked for, with an error code (3: no such topic) and no entries then.
        described = [
            {
                "resource_name": r.name,
                "error_code": 0 if (c := self.configs.get(r.name)) is not None else 3,
                "config_entries": [{"config_name": k, "config_value": v} for k, v in (c or {}).items()],
            }
            for r in resources
        ]
        return [SimpleNamespace(to_object=lambda: {"resources": described})]


SPECS = [
    spec
    for spec in catalogue(TopicLayout(orders_partitions=12))
    if ("crm" in spec.name and ".state." not in spec.name) or spec.name == "orders"
]


ORD, DLQ, REP = "orders", "orders.dlq.crm", "orders.replay.crm"
ORDERS_6 = "orders: partitions is 6, catalogue says 12"


@pytest.mark.parametrize(
    ("topics", "undescribed", "created", "grown", "drift"),
    [
        ({}, (), {ORD: 12, DLQ: 3, REP: 12}, {}, []),
        ({ORD: 6}, (), {DLQ: 3, REP: 6}, {}, [ORDERS_6]),
        ({ORD: 6, DLQ: 3, REP: 3}, (), {}, {REP: 6}, [ORDERS_6]),
        ({ORD: 6, DLQ: 3, REP: 24}, (), {}, {}, [ORDERS_6, f"{REP}: partitions is 24, catalogue says 6"]),
        # The orders topic listed, not described yet (another apply made it a moment ago): the settings' count.
        ({ORD: 12}, (ORD,), {DLQ: 3, REP: 12}, {}, ["orders: partitions is 0, catalogue says 12"]),
    ],
)
async def test_a_replay_topic_follows_the_orders_topics_count_as_it_is(
    topics: dict[str, int],
    undescribed: tuple[str, ...],
    created: dict[str, int],
    grown: dict[str, int],
    drift: list[str],
) -> None:
    cluster = Cluster(topics, SPECS, undescribed)
    report = await _apply(cast(Any, cluster), SPECS, 1.0)
    assert (cluster.created, cluster.grown) == (created, grown)
    assert [str(d) for d in report.drift] == drift
