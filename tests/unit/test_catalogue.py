"""The topic catalogue: names in one place, partitions and retention declared in code."""

from __future__ import annotations

from topics.admin import _compare
from topics.catalogue import SINKS, TopicLayout, catalogue, consumer_group, dlq_topic, orders_topic


def test_orders_and_one_dead_letter_topic_per_sink() -> None:
    specs = catalogue(TopicLayout())
    assert [spec.name for spec in specs] == [
        "orders",
        "orders.dlq.crm",
        "orders.dlq.accounting",
        "orders.dlq.shipping",
        "orders.replay.crm",
        "orders.replay.accounting",
        "orders.replay.shipping",
        "orders.state.crm",
        "orders.state.accounting",
        "orders.state.shipping",
    ]
    orders = specs[0]
    assert orders.partitions == 12
    assert orders.configs["cleanup.policy"] == "delete"
    assert orders.configs["retention.ms"] == str(168 * 3_600_000)
    assert all(spec.configs["retention.ms"] == str(720 * 3_600_000) for spec in specs[1:7])


def test_a_state_topic_is_compacted_with_its_own_retention() -> None:
    # Each key's last value is what an instance reads when it is assigned a partition (`consumers.order_state`).
    states = [spec for spec in catalogue(TopicLayout(state_retention_hours=48)) if ".state." in spec.name]
    assert [spec.name for spec in states] == [f"orders.state.{sink}" for sink in SINKS]
    assert all(spec.configs["cleanup.policy"] == "compact,delete" for spec in states)
    assert all(spec.configs["retention.ms"] == str(48 * 3_600_000) for spec in states)
    # An unblock (a tombstone) must outlive Kafka's default day: an instance's file may hold the block for longer.
    assert all(spec.configs["delete.retention.ms"] == str(48 * 3_600_000) for spec in states)
    others = [spec for spec in catalogue(TopicLayout()) if ".state." not in spec.name]
    assert all("delete.retention.ms" not in spec.configs for spec in others)


def test_a_replay_topic_has_the_orders_topics_partitions_and_grows_to_them() -> None:
    # Partition p of each holds the same orders, which one instance's state covers (`consumers.assignment`).
    specs = catalogue(TopicLayout(orders_partitions=7, dlq_partitions=2))
    assert {spec.name: (spec.partitions, spec.follows) for spec in specs} == {
        "orders": (7, None),
        **{f"orders.dlq.{sink}": (2, None) for sink in SINKS},
        **{f"orders.replay.{sink}": (7, "orders") for sink in SINKS},
        **{f"orders.state.{sink}": (7, "orders") for sink in SINKS},
    }


def test_prefix_namespaces_every_name() -> None:
    specs = catalogue(TopicLayout(prefix="t1."))
    assert all(spec.name.startswith("t1.") for spec in specs)
    assert orders_topic("t1.") == "t1.orders"
    assert dlq_topic("crm", "t1.") == "t1.orders.dlq.crm"
    assert consumer_group("shipping", "t1.") == "t1.orderbus.shipping"
    assert len({consumer_group(sink) for sink in SINKS}) == 3


def test_drift_names_each_difference() -> None:
    spec = catalogue(TopicLayout())[0]
    live = {**spec.configs, "retention.ms": "1000"}
    drift = _compare(spec, 6, live)
    assert [str(d) for d in drift] == [
        "orders: partitions is 6, catalogue says 12",
        f"orders: retention.ms is 1000, catalogue says {168 * 3_600_000}",
    ]
    assert _compare(spec, 12, spec.configs) == []
