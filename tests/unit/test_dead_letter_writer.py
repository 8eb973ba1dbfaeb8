"""`consumers.kafka_io.KafkaDeadLetterWriter` over a fake producer that makes the checks aiokafka's
`AIOKafkaProducer.send` makes before a record leaves the client (aiokafka/producer/producer.py)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from consumers.deadletter import EXCERPT_LIMIT, DeadLetter, Header, read_headers
from consumers.kafka_io import KafkaDeadLetterWriter
from topics.errors import PublishError


@dataclass
class Sent:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[Header]


@dataclass
class FakeProducer:
    """`send_and_wait` as aiokafka's, up to its accumulator: the same assertion, and the same size check with
    aiokafka's estimate against `max_request_size` (1 MiB by default); a record it takes is kept in `sent`."""

    max_request_size: int = 1_048_576
    sent: list[Sent] = field(default_factory=list)
    failure: BaseException | None = None
    broker_limit: int | None = None  # a broker's max.message.bytes, smaller than the client's limit

    async def send_and_wait(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, headers: Any = None, **_: Any
    ) -> None:
        assert not (value is None and key is None), "Need at least one: key or value"
        if self.failure is not None:
            raise self.failure
        headers = headers or []
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
        if size > self.max_request_size:
            raise MessageSizeTooLargeError(f"The message is {size} bytes when serialized")
        if self.broker_limit is not None and size > self.broker_limit:
            raise RecordListTooLargeError()  # what the produce request's future fails with
        self.sent.append(Sent(topic, key, value, list(headers)))


def letter(key: bytes | None, value: bytes | None, **fields: Any) -> DeadLetter:
    return DeadLetter("crm", "invalid", "contract", "orders", 2, 41, key, value, **fields)


async def test_a_tombstone_without_a_key_is_written_with_an_empty_key() -> None:
    producer = FakeProducer()
    await KafkaDeadLetterWriter(producer).write(letter(None, None, detail="value: is empty"))
    [sent] = producer.sent
    assert (sent.topic, sent.key, sent.value) == ("orders.dlq.crm", b"", None)


async def test_any_error_of_the_producer_fails_the_write_as_a_publish_error() -> None:
    producer = FakeProducer(failure=RuntimeError("the handler is closed"))
    with pytest.raises(PublishError, match="the handler is closed"):
        await KafkaDeadLetterWriter(producer).write(letter(b"SO-1", b"{}"))


async def test_a_dead_letter_too_large_for_kafka_is_written_without_its_value() -> None:
    producer = FakeProducer()
    big = b"x" * 1_048_400  # fits the orders topic; not with the dead-letter headers
    original = [("traceparent", b"00-abc-01")]
    await KafkaDeadLetterWriter(producer).write(letter(b"SO-1", big, headers=original, detail="value: not JSON"))
    [sent] = producer.sent
    assert (sent.key, sent.value) == (b"SO-1", None)
    assert sent.headers[0] == ("traceparent", b"00-abc-01")
    meta = read_headers(sent.headers)
    assert meta["value-omitted"] == str(len(big))
    assert meta["value-sha256"] == hashlib.sha256(big).hexdigest()
    assert (meta["topic"], meta["partition"], meta["offset"], meta["reason"]) == ("orders", "2", "41", "invalid")


async def test_a_dead_letter_the_broker_finds_too_large_is_written_without_its_value_then_its_headers() -> None:
    producer = FakeProducer(broker_limit=20_000)
    headers = [("big", b"h" * 30_000), ("small", b"s")]
    await KafkaDeadLetterWriter(producer).write(letter(None, b"v" * 30_000, headers=headers))
    [sent] = producer.sent
    assert (sent.key, sent.value) == (b"", None)
    meta = read_headers(sent.headers)
    assert (meta["value-omitted"], meta["headers-omitted"]) == ("30000", "2")
    assert [k for k, _ in sent.headers if not k.startswith("orderbus.dlq.")] == []


async def test_a_dead_letter_too_large_even_without_value_and_headers_is_a_publish_error() -> None:
    producer = FakeProducer(broker_limit=100)
    with pytest.raises(PublishError, match="too large"):
        await KafkaDeadLetterWriter(producer).write(letter(b"SO-1", b"v" * 200))
    assert producer.sent == []


def test_the_detail_header_is_capped() -> None:
    meta = read_headers(letter(b"SO-1", b"{}", detail="order.line_items.0.sku: bad; " * 1000).record_headers())
    assert len(meta["detail"]) == EXCERPT_LIMIT
    assert meta["detail"].endswith("…")


async def test_the_records_headers_are_copied_unchanged_a_null_value_too() -> None:
    producer = FakeProducer()
    original: list[Header] = [("trace", None), ("empty", b""), ("tenant", b"eu")]
    await KafkaDeadLetterWriter(producer).write(letter(b"SO-1", b"{}", headers=original))
    [sent] = producer.sent
    assert sent.headers[:3] == original
