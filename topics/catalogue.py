"""The topic catalogue: every topic orderbus reads or writes, declared in code, and every name in one place.

- ``orders``: the order events, keyed by order number so one order's events stay in one partition, in order.
  Producers outside orderbus write here too; the contract is `topics.envelope.OrderEvent`.
- ``orders.dlq.<sink>``: one dead-letter topic per downstream system. A record there carries the original key,
  value and headers plus the reason; the operator replays it to that sink only.
- ``orders.replay.<sink>``: dead letters sent back by the operator; only that sink's group reads it, keyed by
  order number like ``orders`` and with as many partitions, so one order's replayed events keep their order and
  reach the instance that holds the order's state (`consumers.assignment`).
- ``orders.state.<sink>``: the sink's order state its instances share (`consumers.order_state`): per order, the
  id its downstream create returned and the chain of dead letters that block it. Compacted (each key's last value
  is kept) and deleted after ``state_retention_hours``, tombstones (an unblock) too, not after Kafka's day; as
  many partitions as ``orders``, the state of an order in the partition its records are in.

Partition counts are fixed once a topic exists: adding partitions would move keys and break per-order ordering,
so `topics.admin` reports a difference and never changes it. A replay topic is the exception: it holds records only
until its sink has read them, and one made with fewer partitions than the orders topic (3, by earlier versions) is
grown to the orders topic's count (`TopicSpec.follows`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

SinkName = Literal["crm", "accounting", "shipping"]
SINKS: Final[tuple[SinkName, ...]] = ("crm", "accounting", "shipping")

ORDERS: Final = "orders"
DLQ_PREFIX: Final = "orders.dlq."
REPLAY_PREFIX: Final = "orders.replay."
STATE_PREFIX: Final = "orders.state."

HOUR_MS: Final = 3_600_000


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """One topic as it should be: name, partitions, replication and the configs we manage."""

    name: str
    partitions: int
    replication_factor: int
    configs: dict[str, str] = field(default_factory=dict)
    # The topic whose partition count this one has, as it is in the cluster (a replay topic: the orders topic's);
    # with fewer, partitions are added, not only reported (`topics.admin`).
    follows: str | None = None


@dataclass(frozen=True, slots=True)
class TopicLayout:
    """The numbers the catalogue is built from (`daemon.settings.TopicSettings` provides them)."""

    prefix: str = ""
    orders_partitions: int = 12
    dlq_partitions: int = 3
    replication_factor: int = 1
    min_insync_replicas: int = 1
    orders_retention_hours: float = 168
    dlq_retention_hours: float = 720
    state_retention_hours: float = 2160


def orders_topic(prefix: str = "") -> str:
    return f"{prefix}{ORDERS}"


def dlq_topic(sink: str, prefix: str = "") -> str:
    return f"{prefix}{DLQ_PREFIX}{sink}"


def replay_topic(sink: str, prefix: str = "") -> str:
    """Dead letters the operator sends back to one sink (`orderbus dlq replay`); read by that sink only."""
    return f"{prefix}{REPLAY_PREFIX}{sink}"


def state_topic(sink: str, prefix: str = "") -> str:
    """The order state one sink's instances share (`consumers.order_state`)."""
    return f"{prefix}{STATE_PREFIX}{sink}"


def consumer_group(sink: str, prefix: str = "") -> str:
    """Each sink reads the orders topic in a group of its own: its own offsets, lag, pace and failures."""
    return f"{prefix}orderbus.{sink}"


def catalogue(layout: TopicLayout) -> tuple[TopicSpec, ...]:
    """Every topic orderbus needs, with the configs it manages: orders, then per sink its dead letters, its replays and
    its shared state."""

    def spec(
        name: str, partitions: int, retention_hours: float, *, follows: str | None = None, cleanup: str = "delete"
    ) -> TopicSpec:
        retention_ms = str(int(retention_hours * HOUR_MS))
        configs = {
            "cleanup.policy": cleanup,
            "min.insync.replicas": str(layout.min_insync_replicas),
            "retention.ms": retention_ms,
        }
        if "compact" in cleanup:
            # A tombstone (an unblocked order) is kept as long as a record, not Kafka's default day: an instance
            # that reads the partition later must see the unblock, or the block its own file still holds stays.
            configs["delete.retention.ms"] = retention_ms
        return TopicSpec(name, partitions, layout.replication_factor, configs, follows)

    orders = spec(orders_topic(layout.prefix), layout.orders_partitions, layout.orders_retention_hours)
    dead_letters = [
        spec(dlq_topic(sink, layout.prefix), layout.dlq_partitions, layout.dlq_retention_hours) for sink in SINKS
    ]
    replays = [
        spec(replay_topic(sink, layout.prefix), orders.partitions, layout.dlq_retention_hours, follows=orders.name)
        for sink in SINKS
    ]
    states = [
        spec(
            state_topic(sink, layout.prefix),
            orders.partitions,
            layout.state_retention_hours,
            follows=orders.name,
            cleanup="compact,delete",
        )
        for sink in SINKS
    ]
    return (orders, *dead_letters, *replays, *states)
