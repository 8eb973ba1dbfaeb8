"""Reading a topic up to its end now, for the operator commands (`dlq`, `topics show`, `trace`): in no consumer
group, committing nothing; a Kafka error is a `BrokerError` that names the topic."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from topics.admin import partition_ids
from topics.errors import BrokerError

__all__ = ["batches", "reading", "whole"]


@contextlib.asynccontextmanager
async def reading(
    topic: str, options: Mapping[str, Any], partitions: Sequence[int] | None = None, *, committed: bool = False
) -> AsyncIterator[tuple[AIOKafkaConsumer, list[TopicPartition]]]:
    """A consumer assigned `partitions` of `topic` (default: all of them), stopped at the end of the block;
    `committed`: only the records of committed transactions, as the sinks read them."""
    ids = list(partitions) if partitions is not None else await partition_ids(topic, options)
    if not ids:
        raise BrokerError(f"topic {topic} does not exist; run `orderbus topics apply`")
    tps = [TopicPartition(topic, p) for p in ids]
    isolation = "read_committed" if committed else "read_uncommitted"
    consumer = AIOKafkaConsumer(**options, enable_auto_commit=False, group_id=None, isolation_level=isolation)
    try:
        await consumer.start()
        consumer.assign(tps)
        yield consumer, tps
    except KafkaError as exc:
        raise BrokerError(f"cannot read {topic}: {exc!r}") from exc
    finally:
        await consumer.stop()


async def batches(
    consumer: AIOKafkaConsumer, starts: Mapping[TopicPartition, int], ends: Mapping[TopicPartition, int]
) -> AsyncIterator[tuple[int, list[Any]]]:
    """The records of each partition in `starts` from its start up to its end in `ends` (offsets asked for a
    moment before), a fetched batch at a time (a partition may hold millions), with their partition."""
    for tp, start in starts.items():
        consumer.seek(tp, start)
    while any([await consumer.position(tp) < ends[tp] for tp in starts]):
        for tp, records in (await consumer.getmany(timeout_ms=1000)).items():
            yield tp.partition, [record for record in records if record.offset < ends[tp]]


async def whole(
    topic: str, options: Mapping[str, Any], partitions: Sequence[int] | None = None, *, committed: bool = False
) -> AsyncIterator[tuple[int, list[Any]]]:
    """Every record of `partitions` of `topic` (default: all), from its beginning up to its end now, a fetched batch
    at a time with its partition (`reading`, `batches`)."""
    async with reading(topic, options, partitions, committed=committed) as (consumer, tps):
        starts, ends = await consumer.beginning_offsets(tps), await consumer.end_offsets(tps)
        async for partition, records in batches(consumer, starts, ends):
            yield partition, records
