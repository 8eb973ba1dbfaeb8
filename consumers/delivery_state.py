"""A row of the per-sink delivery-state table (`consumers.dedup`), the table names, and the buffer of writes a
store holds until a flush makes them durable."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

__all__ = [
    "BLOCKED_ORDERS_TABLE",
    "BLOCKED_ORDER_COLUMNS",
    "DELIVERIES_TABLE",
    "DELIVERY_COLUMNS",
    "DOWNSTREAM_IDS_TABLE",
    "DOWNSTREAM_ID_COLUMNS",
    "STATE_OUTBOX_TABLE",
    "STATE_READS_TABLE",
    "DeliveryState",
    "DeliveryStatus",
    "Origin",
    "OutboxEntry",
    "WriteBuffer",
]

DeliveryStatus = Literal["in_flight", "done", "duplicate", "dead"]

DELIVERIES_TABLE: Final = "deliveries"
DELIVERY_COLUMNS: Final = (
    "key",
    "event_id",
    "order_ref",
    "status",
    "attempts",
    "last_status",
    "first_attempt_at",
    "last_attempt_at",
    "downstream_id",
    "reply_digest",
    "reason",
    "updated_at",
    "event_type",
)
DOWNSTREAM_IDS_TABLE: Final = "downstream_ids"
DOWNSTREAM_ID_COLUMNS: Final = ("order_ref", "downstream_id")
BLOCKED_ORDERS_TABLE: Final = "blocked_orders"
BLOCKED_ORDER_COLUMNS: Final = ("order_ref", "reason")
STATE_READS_TABLE: Final = "state_reads"
STATE_OUTBOX_TABLE: Final = "state_outbox"
# The record that made a write: its topic, partition and offset.
Origin = tuple[str, int, int]
# An entry of the state topic's outbox: its key, its partition, its value (None: a tombstone), and the topic and
# offset of the record that made it.
OutboxEntry = tuple[bytes, int, bytes | None, str, int]


@dataclass(frozen=True, slots=True)
class DeliveryState:
    """What happened to one event in one sink; the fields are the table's columns, in this order.

    `order_ref` is the order number, a business reference (not personal data), so it may be stored and
    logged. `last_status` is the last HTTP status seen; the ``*_at`` fields are unix seconds. `event_type` is the
    event's (``order.cancelled``: `orderbus reconcile` expects the order gone); None for a record that could not be
    decoded, and in rows written before orderbus kept it.
    """

    key: str
    event_id: str
    order_ref: str
    status: DeliveryStatus
    attempts: int
    last_status: int | None
    first_attempt_at: float | None
    last_attempt_at: float | None
    downstream_id: str | None
    reply_digest: str | None
    reason: str | None
    updated_at: float
    event_type: str | None = None


@dataclass(slots=True)
class WriteBuffer:
    """Writes not yet flushed, one per key/order (later writes replace earlier ones).

    In `blocks`, a reason means "block" and None means "unblock". `read_to` holds, per (state topic, partition),
    the offset after the last entry of the topic the file took (`consumers.order_state`); `outbox` the entries to
    keep until the state topic has them, by key, and `sent` the keys whose last entry it has (deleted before the
    new ones are written). A flush takes the whole buffer and leaves an empty one; if its write fails, `requeue`
    puts back what no later write has replaced, in this buffer or in a newer flush still under way.
    """

    states: dict[str, DeliveryState] = field(default_factory=dict)
    downstream_ids: dict[str, str] = field(default_factory=dict)
    blocks: dict[str, str | None] = field(default_factory=dict)
    read_to: dict[tuple[str, int], int] = field(default_factory=dict)
    outbox: dict[bytes, OutboxEntry] = field(default_factory=dict)
    sent: set[bytes] = field(default_factory=set)

    def __len__(self) -> int:
        return (
            len(self.states)
            + len(self.downstream_ids)
            + len(self.blocks)
            + len(self.read_to)
            + len(self.outbox)
            + len(self.sent)
        )

    def requeue(self, failed: WriteBuffer, newer: Sequence[WriteBuffer] = ()) -> None:
        """Put back the writes of `failed` that neither this buffer nor a batch in `newer` (flushes handed over
        after `failed`, still under way) has a later write for: putting back an older write beside a newer one
        would have the next flush write the older state over the newer (an ``in_flight`` over a ``done``)."""
        layers = [self, *newer]
        for key, state in failed.states.items():
            if all(key not in layer.states for layer in layers):
                self.states[key] = state
        for order_ref, downstream_id in failed.downstream_ids.items():
            if all(order_ref not in layer.downstream_ids for layer in layers):
                self.downstream_ids[order_ref] = downstream_id
        for order_ref, reason in failed.blocks.items():
            if all(order_ref not in layer.blocks for layer in layers):
                self.blocks[order_ref] = reason
        for place, offset in failed.read_to.items():
            if all(place not in layer.read_to for layer in layers):
                self.read_to[place] = offset
        for entry_key, entry in failed.outbox.items():
            if all(entry_key not in layer.outbox for layer in layers):
                self.outbox[entry_key] = entry
        for entry_key in failed.sent:  # not over a newer entry of the key, written by a flush under way or to come
            if all(entry_key not in layer.outbox for layer in layers):
                self.sent.add(entry_key)

    def blocked(self, order_ref: str) -> bool | None:
        """True/False if the buffer decides whether `order_ref` is blocked, None if the tables do."""
        if order_ref not in self.blocks:
            return None
        return self.blocks[order_ref] is not None
