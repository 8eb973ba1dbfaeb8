"""`KafkaStateTopic` on a real broker, and a real SQLite file that keeps how far it read: a restart reads only what
came after, and a topic deleted and made again (its offsets start over) is read from its beginning."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from support import at, create_topic, until

from consumers.dedup import SqliteDedupStore
from consumers.order_state import SharedStateStore
from consumers.state_topic import KafkaStateTopic
from daemon.kafka_local import BrokerInfo
from topics.errors import StoreError

pytestmark = pytest.mark.integration


async def test_a_file_reads_its_partitions_once_and_a_topic_made_again_from_its_beginning(
    kafka_broker: BrokerInfo, unique_name: str, tmp_path: Path
) -> None:
    options = {"bootstrap_servers": kafka_broker.bootstrap}
    name = f"{unique_name}.orders.state.crm"
    await create_topic(kafka_broker.bootstrap, name, partitions=2)
    producer = AIOKafkaProducer(**options, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        topic = KafkaStateTopic(producer, options, name)
        writer = SharedStateStore(SqliteDedupStore(tmp_path / "a.sqlite"), topic)
        async with writer:
            for n in range(4):
                writer.put_downstream_id(f"SO-{n}", f"d-{n}", origin=at(n % 2))
            writer.block_order("SO-9", '["k1"]', origin=at(1))
            await writer.flush()

        path = tmp_path / "b.sqlite"
        async with SharedStateStore(SqliteDedupStore(path), topic) as reader:
            restored = await reader.restore([0, 1])
            assert (restored.entries, restored.chains) == (5, {"SO-9": '["k1"]'})
            assert await reader.downstream_id("SO-3") == "d-3"
        async with SharedStateStore(SqliteDedupStore(path), topic) as reader:  # a restart: nothing new
            assert (await reader.restore([0, 1])).entries == 0
            assert await reader.file.read_to(name) == {0: 2, 1: 3}
        async with writer:
            writer.unblock_order("SO-9", origin=at(1))
            await writer.flush()
        async with SharedStateStore(SqliteDedupStore(path), topic) as reader:
            restored = await reader.restore([0, 1])
            assert (restored.entries, restored.chains) == (1, {"SO-9": None}), "only the unblock after the last read"
            assert await reader.blocked_orders(["SO-9"]) == set()

        # The topic deleted and made again (an operator's mistake, a new cluster): its offsets begin at 0 again,
        # below where the file read to; what it holds now is read from its beginning.
        admin = AIOKafkaAdminClient(**options)
        await admin.start()
        try:
            await admin.delete_topics([name])
            await until(lambda: _gone(admin, name), timeout=30)
        finally:
            await admin.close()
        await create_topic(kafka_broker.bootstrap, name, partitions=2)
        producer_again = AIOKafkaProducer(**options, acks="all", enable_idempotence=True)  # a daemon started again
        await producer_again.start()
        try:
            async with SharedStateStore(
                SqliteDedupStore(tmp_path / "a.sqlite"), KafkaStateTopic(producer_again, options, name)
            ) as again:
                again.put_downstream_id("SO-20", "d-20", origin=at(0))
                again.put_downstream_id("SO-21", "d-21", origin=at(1))
                await until(lambda: _written(again), timeout=30)  # the new topic's leaders take a moment
        finally:
            await producer_again.stop()
        async with SharedStateStore(SqliteDedupStore(path), topic) as reader:
            assert (await reader.restore([0, 1])).entries == 2
            assert [await reader.downstream_id(order) for order in ("SO-20", "SO-21")] == ["d-20", "d-21"]
            assert await reader.file.read_to(name) == {0: 1, 1: 1}
    finally:
        await producer.stop()


async def _gone(admin: AIOKafkaAdminClient, name: str) -> bool:
    return name not in await admin.list_topics()


async def _written(store: SharedStateStore) -> bool:
    try:
        await store.flush()
    except StoreError:  # the new topic's leaders not yet elected: the entries stay buffered, tried again
        return False
    return True
