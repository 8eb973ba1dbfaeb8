"""Orders Kafka deleted before a sink read them (its retention ran out during an outage or a forgotten pause): the
whole daemon on a real broker says which, counts them, and delivers the orders after them."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from prometheus_client import CollectorRegistry
from support import (
    apply_topics,
    committed_vs_end,
    make_events,
    orders_of,
    produce,
    running_daemon,
    sandbox_sinks,
    settings_for,
    until,
)

from daemon.kafka_local import BrokerInfo
from daemon.sandbox import SandboxClient, SandboxProcess
from daemon.status import fetch_status, render_status
from topics.admin import partition_ids
from topics.catalogue import consumer_group

pytestmark = pytest.mark.integration

DELETED, LATER = 8, 5


async def test_orders_deleted_before_a_sink_read_them_are_counted_and_said_and_the_later_ones_delivered(
    kafka_broker: BrokerInfo,
    sandbox_process: SandboxProcess,
    sandbox: SandboxClient,
    unique_name: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = settings_for(kafka_broker, f"{unique_name}.", tmp_path, sinks=sandbox_sinks(sandbox_process))
    await apply_topics(settings)
    topic, bootstrap = orders_of(settings), kafka_broker.bootstrap
    partitions = [TopicPartition(topic, p) for p in await partition_ids(topic, {"bootstrap_servers": bootstrap})]
    # The CRM's group stands at the start of every partition (it committed, then its downstream went away) ...
    crm = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=consumer_group("crm", settings.topics.prefix))
    await crm.start()
    try:
        crm.assign(partitions)
        await crm.commit(dict.fromkeys(partitions, 0))
    finally:
        await crm.stop()
    # ... while orders came and the retention deleted them.
    await produce(bootstrap, topic, make_events(DELETED, seed=5, prefix="GONE"))
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        probe = AIOKafkaConsumer(bootstrap_servers=bootstrap)
        await probe.start()
        try:
            ends = await probe.end_offsets(partitions)
        finally:
            await probe.stop()
        await admin.delete_records({tp: RecordsToDelete(end) for tp, end in ends.items() if end})
    finally:
        await admin.close()
    later = make_events(LATER, seed=6, prefix="LATER")
    await produce(bootstrap, topic, later)

    registry = CollectorRegistry()
    with caplog.at_level(logging.INFO, "consumers"):
        async with running_daemon(settings, registry, apply=False) as base:

            async def all_delivered() -> bool:
                counts = [len(await sandbox.orders(system)) for system in ("crm", "accounting", "shipping")]
                return counts == [LATER] * 3

            await until(all_delivered)
            status = render_status(await asyncio.to_thread(fetch_status, base))
    assert f"crm: {DELETED} RECORDS DELETED FROM KAFKA BEFORE THIS SINK READ THEM" in status
    assert "accounting:" not in status

    assert sorted(order["order_number"] for order in await sandbox.orders("crm")) == sorted(
        event.order.order_number for event in later
    )
    # Its commits moved past the deleted records, in partitions with no record after them too: found once.
    committed, ends = await committed_vs_end(bootstrap, topic, consumer_group("crm", settings.topics.prefix))
    assert committed == ends
    assert registry.get_sample_value("orderbus_expired_records_total", {"sink": "crm"}) == DELETED
    # The other sinks' groups are new: they begin where the partitions now begin, and have lost nothing.
    assert registry.get_sample_value("orderbus_expired_records_total", {"sink": "accounting"}) == 0
    said = [r for r in caplog.records if r.getMessage().startswith("records deleted from kafka before this sink")]
    assert {r.sink for r in said} == {"crm"}  # type: ignore[attr-defined]
    assert sum(r.records for r in said) == DELETED  # type: ignore[attr-defined]
    assert all(r.levelno == logging.ERROR and r.from_offset == 0 for r in said)  # type: ignore[attr-defined]

    # A restart does not find them missing again.
    again = CollectorRegistry()
    one_more = make_events(1, seed=7, prefix="AGAIN")
    async with running_daemon(settings, again, apply=False):
        await produce(bootstrap, topic, one_more)

        async def crm_has_it() -> bool:
            return len(await sandbox.orders("crm")) == LATER + 1

        await until(crm_has_it)
    assert again.get_sample_value("orderbus_expired_records_total", {"sink": "crm"}) == 0
