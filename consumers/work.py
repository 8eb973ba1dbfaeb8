"""A fetched record as the engine handles it: decoded once, with its ordering key and idempotency key."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from topics.codec import decode
from topics.envelope import OrderEvent
from topics.errors import ContractError

TopicPartitionKey = tuple[str, int]


@dataclass(slots=True)
class Work:
    """One record of one partition, on its way to a terminal state in one sink."""

    tp: TopicPartitionKey
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]
    event: OrderEvent | None
    invalid: ContractError | None
    order_ref: str
    idempotency_key: str
    replay: bool = False

    @property
    def lane(self) -> tuple[TopicPartitionKey, str]:
        """Records of one lane reach the sink strictly in order: one order (Kafka key) in one partition."""
        return self.tp, self.order_ref


def idempotency_key(sink: str, event_id: str) -> str:
    """Fixed before the first attempt, the same on every attempt and every redelivery of the event."""
    return f"orderbus:{sink}:{event_id}"


# Every sink reads the same records in its own group, usually a few seconds apart. Events still held by some sink
# are found here by their bytes, so the sinks share one decode (a fifth of the CPU of a delivery) and one frozen
# `OrderEvent` instead of three. Weak values: the memo holds nothing that no buffer holds.
_decoded: weakref.WeakValueDictionary[bytes, OrderEvent] = weakref.WeakValueDictionary()


def _decode_shared(value: bytes | None) -> OrderEvent:
    """`decode(value)`, or the event another sink decoded from the same bytes and still holds."""
    if value is None:
        return decode(value)
    event = _decoded.get(value)
    if event is None:
        event = _decoded[value] = decode(value)
    return event


def make_work(sink: str, topic: str, partition: int, record: Any, *, replay: bool = False) -> Work:
    """Decode `record` (an aiokafka ConsumerRecord or a twin); a poison record becomes `invalid`, never an error."""
    value: bytes | None = record.value
    key: bytes | None = record.key
    headers = tuple((str(k), bytes(v or b"")) for k, v in (record.headers or ()))
    event: OrderEvent | None = None
    invalid: ContractError | None = None
    try:
        event = _decode_shared(value)
    except ContractError as exc:
        invalid = exc
    if key:
        order_ref = key.decode("utf-8", "replace")
    elif event is not None:
        order_ref = event.order.order_number
    else:
        order_ref = f"@{partition}:{record.offset}"  # no key and unreadable: a lane of its own
    if event is not None:
        idem = idempotency_key(sink, str(event.event_id))
    else:
        # An unreadable record has no event id; a replayed one keeps the key it was dead-lettered under.
        original = dict(headers).get("orderbus.dlq.idempotency-key") if replay else None
        idem = original.decode() if original else f"orderbus:{sink}:{topic}-{partition}-{record.offset}"
    return Work(
        tp=(topic, partition),
        offset=record.offset,
        timestamp_ms=record.timestamp,
        key=key,
        value=value,
        headers=headers,
        event=event,
        invalid=invalid,
        order_ref=order_ref,
        idempotency_key=idem,
        replay=replay,
    )
