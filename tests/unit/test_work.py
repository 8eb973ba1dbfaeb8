"""`consumers.work.make_work`: a fetched record decoded, prepared and given its lane and idempotency key."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from consumers.sink import RestSink
from consumers.unreadable import SkippedRecord
from consumers.work import KEY_MISMATCH, KEY_PADDED, make_work
from topics.codec import encode
from topics.errors import FieldError
from topics.samples import sample_event

SINK = RestSink("crm", "http://crm.test")


@dataclass(frozen=True)
class FakeRecord:
    """The fields of an aiokafka ConsumerRecord that `make_work` reads."""

    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int = 1_799_999_999_000
    headers: tuple[tuple[str, bytes | None], ...] = ()


def record(offset: int, order_number: str) -> FakeRecord:
    encoded = encode(sample_event(random.Random(offset), order_number=order_number))
    return FakeRecord(offset, encoded.key, encoded.value, headers=tuple(encoded.headers))


def test_a_record_keyed_by_its_order_number_or_not_keyed_is_in_its_orders_lane() -> None:
    keyed = make_work(SINK, "orders", 3, record(7, "SO-1"))
    unkeyed = make_work(SINK, "orders", 3, dataclasses.replace(record(7, "SO-1"), key=None))
    for work in (keyed, unkeyed):
        assert work.invalid is None
        assert work.prepared is not None
        assert work.order_ref == "SO-1"


def test_a_record_whose_key_is_not_its_order_number_is_invalid_and_the_key_is_not_echoed() -> None:
    work = make_work(SINK, "orders", 3, dataclasses.replace(record(7, "SO-1"), key=b"jane@example.com"))
    assert work.invalid is not None
    assert work.invalid.errors == (FieldError("key", KEY_MISMATCH),)
    assert "jane" not in str(work.invalid)
    assert work.prepared is None, "nothing of it is sent"
    assert work.order_ref == "@3:7", "a lane of its own, not the key's nor the order's"
    assert work.key == b"jane@example.com", "the dead letter keeps the key as consumed"
    assert work.idempotency_key == "orderbus:crm:orders-3-7"


def test_a_key_with_spaces_around_the_order_number_is_said_to_have_them() -> None:
    # Review (sender): " SO-1 " in the key and the value alike was refused as "must be the order number": the
    # contract removes the spaces from the value's order number, not from the key.
    work = make_work(SINK, "orders", 3, dataclasses.replace(record(7, "SO-1"), key=b" SO-1 "))
    assert work.invalid is not None
    assert work.invalid.errors == (FieldError("key", KEY_PADDED),)


def test_an_unreadable_replay_keeps_the_idempotency_key_of_its_dead_letter_or_one_of_its_own() -> None:
    def replayed(key_header: bytes) -> str:
        unreadable = FakeRecord(5, b"SO-1", b"junk", headers=(("orderbus.dlq.idempotency-key", key_header),))
        return make_work(SINK, "orders.replay.crm", 0, unreadable, replay=True).idempotency_key

    assert replayed(b"orderbus:crm:orders-3-7") == "orderbus:crm:orders-3-7"
    assert replayed(b"\xff\xfe") == "orderbus:crm:orders.replay.crm-0-5", "not UTF-8: not ours"


def test_the_records_headers_are_kept_unchanged_a_null_value_too() -> None:
    headers = (("trace", None), ("empty", b""), ("tenant", b"eu"))
    work = make_work(SINK, "orders", 0, FakeRecord(5, b"SO-1", b"junk", headers=headers))
    assert work.headers == headers


def test_the_stand_in_of_a_skipped_unreadable_record_is_invalid_with_its_reason_in_a_lane_of_its_own() -> None:
    work = make_work(
        SINK, "orders", 2, SkippedRecord("orders", 2, 40, "the Kafka client cannot read it", 1_800_000_000_000)
    )
    assert work.prepared is None
    assert work.invalid is not None
    assert list(work.invalid.errors) == [FieldError("record", "the Kafka client cannot read it")]
    assert (work.order_ref, work.idempotency_key) == ("@2:40", "orderbus:crm:orders-2-40")
    assert (work.key, work.value, work.timestamp_ms) == (None, None, 1_800_000_000_000)
