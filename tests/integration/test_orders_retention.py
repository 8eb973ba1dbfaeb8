"""The retention the backlog alert is held to is the orders topic's own, read from a real broker, not the setting."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from prometheus_client import CollectorRegistry
from support import apply_topics, orders_of, running_daemon, sandbox_sinks, settings_for, until

from daemon.kafka_local import BrokerInfo
from daemon.sandbox import SandboxProcess
from topics.admin import topic_configs
from topics.errors import BrokerError

pytestmark = pytest.mark.integration

HOURS = 36


async def test_the_daemon_holds_the_backlog_to_the_topics_retention_and_says_where_it_leaves_the_setting(
    kafka_broker: BrokerInfo,
    sandbox_process: SandboxProcess,
    unique_name: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = settings_for(kafka_broker, f"{unique_name}.", tmp_path, sinks=sandbox_sinks(sandbox_process))
    assert settings.topics.orders_retention_hours == 168
    await apply_topics(settings)
    topic, options = orders_of(settings), {"bootstrap_servers": kafka_broker.bootstrap}
    # Raised during an outage as the runbook says, or made so by a platform team's tooling: not the setting.
    admin = AIOKafkaAdminClient(**options)
    await admin.start()
    try:
        configs = {"retention.ms": str(HOURS * 3_600_000), "retention.bytes": str(1 << 30)}
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs=configs)])
    finally:
        await admin.close()

    async def altered() -> bool:  # the brokers apply an altered config a moment later
        return (await topic_configs([topic], options))[topic]["retention.ms"] == str(HOURS * 3_600_000)

    await until(altered)
    with pytest.raises(BrokerError, match=r"configs of .*\.no-such-topic: UnknownTopicOrPartitionError$"):
        await topic_configs([topic, f"{unique_name}.no-such-topic"], options)

    registry = CollectorRegistry()
    with caplog.at_level(logging.WARNING, "daemon.topic_retention"):
        async with running_daemon(settings, registry, apply=False):
            await until(lambda: registry.get_sample_value("orderbus_orders_retention_seconds") == HOURS * 3600)
    said = [r.getMessage() for r in caplog.records if r.name == "daemon.topic_retention"]
    assert said[0].startswith(
        f"the orders topic {topic} keeps its records 36 h, topics.orders_retention_hours says 168"
    )
    assert said[1].startswith(f"the orders topic {topic} has retention.bytes = 1073741824")
