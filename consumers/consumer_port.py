"""What the delivery engine needs of a Kafka consumer, as a protocol: aiokafka's behind it in production
(`consumers.kafka_io.KafkaConsumerPort`), in-memory partitions in the unit tests."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from consumers.expiry import Move
from consumers.unreadable import Skips
from consumers.work import TopicPartitionKey


class ConsumerPort(Protocol):
    """What the engine needs of a Kafka consumer; `consumers.kafka_io.KafkaConsumerPort` wraps aiokafka's."""

    async def getmany(self, timeout_ms: int, max_records: int) -> Mapping[TopicPartitionKey, list[Any]]: ...

    def moved(self) -> Mapping[TopicPartitionKey, Move]:
        """Partitions a fetch moved since the last call, with where they go on: past records Kafka deleted, or to
        the start of a partition the group had no offset for (`consumers.expiry`)."""
        ...

    async def commit(self, offsets: Mapping[TopicPartitionKey, int]) -> None: ...

    def pause(self, tps: Iterable[TopicPartitionKey]) -> None: ...

    def resume(self, tps: Iterable[TopicPartitionKey]) -> None: ...

    def assignment(self) -> set[TopicPartitionKey]: ...

    async def end_offsets(self, tps: Iterable[TopicPartitionKey]) -> Mapping[TopicPartitionKey, int]: ...

    async def committed_offset(self, tp: TopicPartitionKey) -> int | None: ...

    async def beginning_offsets(self, tps: Iterable[TopicPartitionKey]) -> Mapping[TopicPartitionKey, int]: ...

    def unreadable(self) -> Mapping[TopicPartitionKey, int]:
        """Partitions held because their records cannot be read (`consumers.unreadable`), with the offset each
        stopped at."""
        ...

    def skip_unreadable(self, skips: Skips) -> None:
        """Go on past a held partition's offset that `skips` names (`consumers.unreadable.ReadGuard.skip`)."""
        ...


__all__ = ["ConsumerPort"]
