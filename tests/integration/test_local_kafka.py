"""The local Kafka tooling against real brokers: aiokafka round trips, data surviving stop and kill."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from support import create_topic

from daemon import kafka_local
from daemon.kafka_local import BrokerInfo

pytestmark = pytest.mark.integration

READ_TIMEOUT = 30.0


async def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    """Send `values` in order with the idempotent, acks=all producer the daemon uses."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=b"order-1")
    finally:
        await producer.stop()


async def read(consumer: Any, count: int) -> list[Any]:
    """Exactly `count` records from a started consumer, or an AssertionError after READ_TIMEOUT."""
    records: list[Any] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READ_TIMEOUT
    while len(records) < count:
        remaining = deadline - loop.time()
        assert remaining > 0, f"read {len(records)} of {count} records in {READ_TIMEOUT} s"
        batches = await consumer.getmany(timeout_ms=int(min(remaining, 1.0) * 1000), max_records=count)
        for batch in batches.values():
            records.extend(batch)
    assert len(records) == count, f"expected {count} records, got {len(records)}"
    return records


def group_consumer(bootstrap: str, topic: str, group: str) -> Any:
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )


async def read_all(bootstrap: str, topic: str, count: int) -> list[bytes]:
    """The first `count` values of partition 0, read without a group."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        return [record.value for record in await read(consumer, count)]
    finally:
        await consumer.stop()


def restart(info: BrokerInfo) -> BrokerInfo:
    again = kafka_local.start(info.data_dir)
    assert (again.bootstrap, again.cluster_id) == (info.bootstrap, info.cluster_id)
    assert again.pid != info.pid
    return again


async def test_group_resumes_after_committed_offset_across_broker_restart(
    private_broker: Callable[[], BrokerInfo], unique_name: str
) -> None:
    broker = private_broker()
    bootstrap, topic, group = broker.bootstrap, unique_name, f"{unique_name}-group"
    values = [f"order-{i}".encode() for i in range(10)]
    await create_topic(bootstrap, topic)
    await produce(bootstrap, topic, values)

    first = group_consumer(bootstrap, topic, group)
    await first.start()
    try:
        records = await read(first, 4)
        partition = TopicPartition(topic, 0)
        await first.commit({partition: records[-1].offset + 1})
    finally:
        await first.stop()
    assert [r.value for r in records] == values[:4]

    assert await asyncio.to_thread(kafka_local.stop, broker.data_dir) is True
    stopped = kafka_local.status(broker.data_dir)
    assert (stopped.running, stopped.answering, stopped.info) == (False, False, None)
    restarted = await asyncio.to_thread(restart, broker)

    assert await read_all(restarted.bootstrap, topic, len(values)) == values
    second = group_consumer(restarted.bootstrap, topic, group)
    await second.start()
    try:
        assert await second.committed(partition) == 4
        resumed = await read(second, len(values) - 4)
    finally:
        await second.stop()
    assert [r.offset for r in resumed] == list(range(4, 10))
    assert [r.value for r in resumed] == values[4:]


async def test_data_survives_sigkill(private_broker: Callable[[], BrokerInfo], unique_name: str) -> None:
    broker = private_broker()
    bootstrap, topic = broker.bootstrap, unique_name
    before = [f"before-{i}".encode() for i in range(20)]
    await create_topic(bootstrap, topic)
    await produce(bootstrap, topic, before)

    await asyncio.to_thread(kafka_local.kill, broker.data_dir)
    assert kafka_local.status(broker.data_dir).running is False
    restarted = await asyncio.to_thread(restart, broker)

    # The recovered log takes new idempotent writes after the old ones.
    after = [b"after-0", b"after-1"]
    await produce(restarted.bootstrap, topic, after)
    assert await read_all(restarted.bootstrap, topic, len(before) + 2) == before + after


def test_status_and_stop_are_safe_in_every_state(private_broker: Callable[[], BrokerInfo]) -> None:
    broker = private_broker()
    running = kafka_local.status(broker.data_dir)
    assert (running.running, running.answering, running.info) == (True, True, broker)
    assert broker.launched
    found = kafka_local.start(broker.data_dir)
    assert (found, found.launched) == (broker, False)  # no second broker, and the caller is told it found one

    assert kafka_local.stop(broker.data_dir) is True
    stopped = kafka_local.status(broker.data_dir)
    assert (stopped.running, stopped.answering, stopped.info) == (False, False, None)
    assert str(broker.port) in stopped.detail
    assert kafka_local.stop(broker.data_dir) is False
    assert kafka_local.kill(broker.data_dir) is False  # a no-op too
    assert kafka_local.probe(broker.port) is False


async def test_session_broker_serves_a_consumer_group(kafka_broker: BrokerInfo, unique_name: str) -> None:
    await create_topic(kafka_broker.bootstrap, unique_name, partitions=3)
    await produce(kafka_broker.bootstrap, unique_name, [b"a", b"b", b"c"])
    consumer = group_consumer(kafka_broker.bootstrap, unique_name, unique_name)
    await consumer.start()
    try:
        assert sorted(r.value for r in await read(consumer, 3)) == [b"a", b"b", b"c"]
    finally:
        await consumer.stop()
