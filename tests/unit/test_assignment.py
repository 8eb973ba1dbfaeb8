"""The sinks' partition assignor: partition p of the orders and the replay topic to one member, the orders topic
dealt as Kafka's round robin dealt it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor

from consumers.assignment import ASSIGNORS, CoLocatedAssignor
from consumers.kafka_io import sink_consumer

ORDERS = "orders"
REPLAY = "orders.replay.crm"


class Cluster:
    """The one thing an assignor asks of aiokafka's ClusterMetadata."""

    def __init__(self, partitions: Mapping[str, int]) -> None:
        self._partitions = partitions

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        count = self._partitions.get(topic)
        return None if count is None else set(range(count))


def dealt(
    assignor: type[RoundRobinPartitionAssignor] | type[CoLocatedAssignor],
    partitions: Mapping[str, int],
    subscriptions: Mapping[str, Sequence[str]],
) -> dict[str, dict[str, list[int]]]:
    members = {member: assignor.metadata(topics) for member, topics in subscriptions.items()}
    answer = assignor.assign(Cluster(partitions), members)
    return {member: dict(assignment.assignment) for member, assignment in answer.items()}


def members(count: int) -> dict[str, list[str]]:
    # Static members' ids begin with their names (the broker adds a UUID).
    return {f"host-{i}-8f1c": [ORDERS, REPLAY] for i in range(count)}


@pytest.mark.parametrize("count", [1, 2, 3, 5, 7, 12, 13])
def test_each_member_holds_the_same_partitions_of_both_topics(count: int) -> None:
    result = dealt(CoLocatedAssignor, {ORDERS: 12, REPLAY: 12}, members(count))
    assert sorted(p for topics in result.values() for p in topics.get(ORDERS, [])) == list(range(12))
    for topics in result.values():
        assert topics.get(ORDERS, []) == topics.get(REPLAY, [])
    held = [len(topics.get(ORDERS, [])) for topics in result.values()]
    assert max(held) - min(held) <= 1


@pytest.mark.parametrize("count", [2, 3, 5, 7])
def test_the_orders_topic_is_dealt_as_round_robin_dealt_it(count: int) -> None:
    # So the upgrade that brings this assignor moves none of the orders topic's partitions (nor their states).
    ours = dealt(CoLocatedAssignor, {ORDERS: 12, REPLAY: 3}, members(count))
    theirs = dealt(RoundRobinPartitionAssignor, {ORDERS: 12, REPLAY: 3}, members(count))
    assert {m: t.get(ORDERS) for m, t in ours.items()} == {m: t.get(ORDERS) for m, t in theirs.items()}


def test_round_robin_did_not_keep_them_together() -> None:
    # Why this assignor exists: five members, 12 partitions each; replay partition p went to the member of 12 + p.
    theirs = dealt(RoundRobinPartitionAssignor, {ORDERS: 12, REPLAY: 12}, members(5))
    assert any(topics.get(ORDERS) != topics.get(REPLAY) for topics in theirs.values())


def test_members_are_taken_in_the_order_of_their_ids() -> None:
    result = dealt(CoLocatedAssignor, {ORDERS: 4, REPLAY: 4}, {"b-1": [ORDERS, REPLAY], "a-2": [ORDERS, REPLAY]})
    assert result == {"a-2": {ORDERS: [0, 2], REPLAY: [0, 2]}, "b-1": {ORDERS: [1, 3], REPLAY: [1, 3]}}


def test_a_topic_goes_only_to_the_members_that_read_it_and_one_without_metadata_is_skipped() -> None:
    subscriptions = {"a": [ORDERS], "b": [ORDERS, REPLAY], "c": [ORDERS, "gone"]}
    result = dealt(CoLocatedAssignor, {ORDERS: 3, REPLAY: 2}, subscriptions)
    assert result == {"a": {ORDERS: [0]}, "b": {ORDERS: [1], REPLAY: [0, 1]}, "c": {ORDERS: [2]}}


async def test_the_sinks_consumers_deal_with_it_alone_under_round_robins_name() -> None:
    # One protocol, which members before it announce too: a rolling upgrade joins at once, in one JoinGroup each.
    consumer = sink_consumer({"bootstrap_servers": "127.0.0.1:9"}, "crm")
    try:
        assert consumer._partition_assignment_strategy == ASSIGNORS == (CoLocatedAssignor,)
    finally:
        await consumer.stop()  # never started: it only closes its client
    assert (CoLocatedAssignor.name, CoLocatedAssignor.version) == ("roundrobin", RoundRobinPartitionAssignor.version)
    ours, theirs = CoLocatedAssignor.metadata([ORDERS, REPLAY]), RoundRobinPartitionAssignor.metadata([ORDERS, REPLAY])
    assert ours.encode() == theirs.encode()
