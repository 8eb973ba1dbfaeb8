"""A fetched record as the engine handles it: decoded and prepared once, with its ordering key and idempotency key.

The decoded event is not kept: the record holds its raw bytes (for a dead letter) and the sink's prepared
request (`consumers.sink.Prepared`), so a full buffer of a sink that is down costs little memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from consumers.deadletter import HEADER_PREFIX, Header, copy_headers
from consumers.sink import Prepared, Sink
from topics.codec import decode
from topics.errors import ContractError, FieldError

TopicPartitionKey = tuple[str, int]

KEY_MISMATCH = "must be the order number (order.order_number), or absent"
# The same, for a key that is the order number with spaces around it, which the contract removes from the value's.
KEY_PADDED = "must be the order number without the spaces around it (removed from order.order_number), or absent"


# The header of a create that `orderbus reconcile --resend` sends through a sink's replay topic, naming the event it
# was made of: it goes ahead of its order's dead letters (`consumers.blocks`), which address the object it replaces.
RESEND_OF: Final = "orderbus.resend-of"


@dataclass(slots=True)
class Work:
    """One record of one partition, on its way to a terminal state in one sink."""

    tp: TopicPartitionKey
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[Header]
    prepared: Prepared | None
    invalid: ContractError | None
    order_ref: str
    idempotency_key: str
    replay: bool = False

    @property
    def resend(self) -> bool:
        """A resent create (`RESEND_OF`) read from the replay topic, which the operator's commands write: a create
        only (a replayed dead letter keeps the headers its producer gave it, which could name the header too)."""
        return (
            self.replay
            and self.prepared is not None
            and self.prepared.event_type == "order.created"
            and any(name == RESEND_OF for name, _ in self.headers)
        )

    @property
    def origin(self) -> tuple[str, int, int]:
        """Where the record is: topic, partition, offset (what a shared store keeps with the state it made)."""
        return (self.tp[0], self.tp[1], self.offset)

    @property
    def lane(self) -> tuple[TopicPartitionKey, str]:
        """Records of one lane reach the sink strictly in order: one order (Kafka key) in one partition."""
        return self.tp, self.order_ref


def idempotency_key(sink: str, event_id: str) -> str:
    """Fixed before the first attempt, the same on every attempt and every redelivery of the event."""
    return f"orderbus:{sink}:{event_id}"


def key_problem(key: bytes | None, order_number: str) -> str | None:
    """What is wrong with a record key that is not its event's order number, which the sinks refuse (no key, or an
    empty one, is fine: None); said without echoing it (it may be personal data)."""
    expected = order_number.encode()
    if not key or key == expected:
        return None
    return KEY_PADDED if key.strip() == expected else KEY_MISMATCH


def make_work(sink: Sink, topic: str, partition: int, record: Any, *, replay: bool = False) -> Work:
    """Decode and prepare `record` (an aiokafka ConsumerRecord or a twin) for `sink`.

    A poison record becomes `invalid`, never an error; so do one whose key is not its order number and the stand-in
    of a record the client could not read, skipped by the operator.
    """
    value: bytes | None = record.value
    key: bytes | None = record.key
    headers = copy_headers(record.headers)
    prepared: Prepared | None = None
    invalid: ContractError | None = None
    unreadable: str | None = getattr(record, "unreadable", None)  # a `consumers.unreadable.SkippedRecord`
    if unreadable is not None:
        invalid = ContractError([FieldError("record", unreadable)])
    else:
        try:
            prepared = sink.prepare(decode(value))
        except ContractError as exc:
            invalid = exc
    order_ref = f"@{partition}:{record.offset}"  # unreadable without a key, or a wrong key: a lane of its own
    if prepared is not None:
        if (problem := key_problem(key, prepared.order_number)) is not None:
            # Lanes, blocks and downstream ids go by order number: a key shared by two orders would send one
            # order's update or cancel to the other's downstream id. The key is not echoed: it may be personal data.
            invalid, prepared = ContractError([FieldError("key", problem)]), None
        else:
            order_ref = prepared.order_number
    elif key:
        order_ref = key.decode("utf-8", "replace")
    if prepared is not None:
        idem = idempotency_key(sink.name, prepared.event_id)
    else:
        # An unreadable record has no event id; a replayed one keeps the key it was dead-lettered under.
        original = _dead_lettered_under(headers) if replay else None
        idem = original or f"orderbus:{sink.name}:{topic}-{partition}-{record.offset}"
    return Work(
        tp=(topic, partition),
        offset=record.offset,
        timestamp_ms=record.timestamp,
        key=key,
        value=value,
        headers=headers,
        prepared=prepared,
        invalid=invalid,
        order_ref=order_ref,
        idempotency_key=idem,
        replay=replay,
    )


def _dead_lettered_under(headers: Sequence[Header]) -> str | None:
    """The idempotency key of a replayed record's dead letter; None if the header is missing or not ours (we write
    UTF-8: one mangled on its way back through the replay topic must not stop the sink)."""
    original = dict(headers).get(HEADER_PREFIX + "idempotency-key")
    try:
        return original.decode() if original else None
    except UnicodeDecodeError:
        return None
