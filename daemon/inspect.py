"""Read-only looks at the orders topic for operators: the newest records, joining no consumer group."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from daemon.kafka_options import client_options
from daemon.settings import Settings
from daemon.topic_reader import batches, reading
from topics.catalogue import orders_topic
from topics.codec import decode
from topics.errors import ContractError


async def show_orders(settings: Settings, *, limit: int, full: bool) -> list[str]:
    """The newest `limit` records of the orders topic, one line each.

    A line shows the order number, event and totals; personal data only with `full`.
    """
    topic = orders_topic(settings.topics.prefix)
    async with reading(topic, client_options(settings.kafka)) as (consumer, tps):
        starts, ends = await consumer.beginning_offsets(tps), await consumer.end_offsets(tps)
        newest = {tp: max(starts[tp], ends[tp] - limit) for tp in tps}
        records = [record async for _, batch in batches(consumer, newest, ends) for record in batch]
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
