"""The sink consumer's fetch limits against a real broker: small prefetches, and no record too big to fetch."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import NoOffsetForPartitionError
from support import create_topic

from consumers.expiry import Positions
from consumers.kafka_io import FETCH_MAX_BYTES, MAX_PARTITION_FETCH_BYTES, sink_consumer
from daemon.kafka_local import BrokerInfo

pytestmark = pytest.mark.integration

PARTITIONS = 12
SMALL = 300  # per partition, ~1 KB each: more than one fetch's worth of every partition


async def test_records_larger_than_the_fetch_limits_are_delivered_whole_and_in_order(
    kafka_broker: BrokerInfo, unique_name: str
) -> None:
    big = b"B" * (MAX_PARTITION_FETCH_BYTES * 7 // 2)  # over the partition limit, under the broker's 1 MB
    assert len(big) > MAX_PARTITION_FETCH_BYTES
    await create_topic(kafka_broker.bootstrap, unique_name, PARTITIONS)
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_broker.bootstrap, acks="all", enable_idempotence=True, max_request_size=1_000_000
    )
    await producer.start()
    expected: dict[int, list[bytes]] = {p: [] for p in range(PARTITIONS)}
    sent = []
    try:
        for i in range(SMALL):
            for partition in range(PARTITIONS):
                value = f"{partition}:{i}:".encode() + b"x" * 1000
                if i == SMALL // 2 and partition % 3 == 0:
                    value = big  # a big record in the middle of every third partition
                sent.append(await producer.send(unique_name, value, partition=partition))
                expected[partition].append(value)
        await asyncio.gather(*sent)
    finally:
        await producer.stop()

    consumer = sink_consumer({"bootstrap_servers": kafka_broker.bootstrap}, "crm", prefix=f"{unique_name}.")
    consumer.subscribe([unique_name])
    await consumer.start()
    positions = Positions(consumer, "crm")
    got: dict[int, list[bytes]] = {p: [] for p in range(PARTITIONS)}
    largest_fetch = 0
    try:
        async with asyncio.timeout(60):
            while sum(map(len, got.values())) < PARTITIONS * SMALL:
                try:
                    batch = await consumer.getmany(timeout_ms=500)
                except NoOffsetForPartitionError as exc:  # a new group: the engine's port settles it so
                    await positions.settle(exc)
                    continue
                largest_fetch = max(largest_fetch, sum(len(r.value) for rs in batch.values() for r in rs))
                for tp, records in batch.items():
                    got[tp.partition].extend(r.value for r in records)
    finally:
        await consumer.stop()
    assert got == expected  # every record once, in order, the big ones whole
    # aiokafka hands over what one fetch brought: bounded by the request limit, plus one oversized record at most
    assert largest_fetch <= FETCH_MAX_BYTES + len(big)
