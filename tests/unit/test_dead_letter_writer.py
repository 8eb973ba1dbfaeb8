"""`consumers.kafka_io.KafkaDeadLetterWriter` over a fake producer that makes the checks aiokafka's
`AIOKafkaProducer.send` makes before a record leaves the client (aiokafka/producer/producer.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from consumers.deadletter import DeadLetter
from consumers.kafka_io import KafkaDeadLetterWriter
from topics.errors import PublishError


@dataclass
class Sent:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]


@dataclass
class FakeProducer:
    """`send_and_wait` as aiokafka's, up to its accumulator: the same assertion, and the same size check with
    aiokafka's estimate against `max_request_size` (1 MiB by default); a record it takes is kept in `sent`."""

    max_request_size: int = 1_048_576
    sent: list[Sent] = field(default_factory=list)
    failure: BaseException | None = None

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
