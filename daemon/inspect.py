"""Read-only looks at the orders topic for operators: the newest records, joining no consumer group."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from daemon.kafka_options import client_options
from daemon.settings import Settings
from topics.admin import partition_ids
from topics.catalogue import orders_topic
from topics.codec import decode
from topics.errors import BrokerError, ContractError


async def show_orders(settings: Settings, *, limit: int, full: bool) -> list[str]:
    """The newest `limit` records of the orders topic, one line each.

    A line shows the order number, event and totals; personal data only with `full`.
    """
    topic = orders_topic(settings.topics.prefix)
    options = client_options(settings.kafka)
    partitions = [TopicPartition(topic, p) for p in await partition_ids(topic, options)]
    if not partitions:
        raise BrokerError(f"topic {topic} does not exist; run `orderbus topics apply`")
    consumer = AIOKafkaConsumer(**options, enable_auto_commit=False, group_id=None)
    try:
        await consumer.start()
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        starts = await consumer.beginning_offsets(partitions)
        wanted = 0
        for tp in partitions:
            first = max(starts[tp], ends[tp] - limit)
            consumer.seek(tp, first)
            wanted += ends[tp] - first
        records: list[Any] = []
        while len(records) < wanted:
            batch = await consumer.getmany(timeout_ms=2000)
            if not batch:
                break
            for messages in batch.values():
                records.extend(messages)
    except KafkaError as exc:
        raise BrokerError(f"cannot read {topic}: {exc!r}") from exc
    finally:
        await consumer.stop()
    records.sort(key=lambda record: record.timestamp)
    return [_line(record, full) for record in records[-limit:]]


def _line(record: object, full: bool) -> str:
    partition, offset = getattr(record, "partition", "?"), getattr(record, "offset", "?")
    stamp = datetime.fromtimestamp(getattr(record, "timestamp", 0) / 1000, UTC).isoformat(timespec="seconds")
    value: bytes | None = getattr(record, "value", None)
    where = f"{stamp} p{partition}@{offset}"
    try:
        event = decode(value)
    except ContractError as exc:
        return f"{where} INVALID {exc}"
    if full:
        return f"{where} {json.dumps(json.loads(value or b'null'))}"
    order = event.order
    return (
        f"{where} {event.event_type} order={order.order_number} event_id={event.event_id} "
        f"items={len(order.line_items)} gross={order.gross_total} {order.currency} source={event.source}"
    )
