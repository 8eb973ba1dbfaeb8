"""With several instances, a replayed dead letter reaches the instance that holds its order's state: two real
daemons, a real broker and the sandbox; orders blocked behind their dead letters, replayed, then updated again."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from support import (
    QUICK_SINK,
    make_events,
    orderbus_cli,
    orders_of,
    produce,
    read_topic,
    running_daemon,
    settings_env,
    until,
    with_type,
)

from daemon.kafka_local import BrokerInfo
from daemon.sandbox import SandboxClient, SandboxProcess
from daemon.settings import load_settings
from topics.catalogue import dlq_topic

pytestmark = pytest.mark.integration

# Two members do not divide 3 partitions: Kafka's round robin gave replay partition p to the member of orders
# partition 3 + p, another one for every p.
PARTITIONS = 3


async def test_a_replay_reaches_the_instance_that_holds_its_order(
    kafka_broker: BrokerInfo,
    sandbox_process: SandboxProcess,
    sandbox: SandboxClient,
    unique_name: str,
    tmp_path: Path,
) -> None:
    sinks = {"crm": {"base_url": sandbox_process.system_url("crm"), **QUICK_SINK}}
    envs = {
        name: {
            **settings_env(kafka_broker, f"{unique_name}.", tmp_path / name, partitions=PARTITIONS, sinks=sinks),
            "ORDERBUS_KAFKA__GROUP_INSTANCE_ID": name,
        }
        for name in ("host-a", "host-b")
    }
    first, second = (load_settings(None, env=env) for env in envs.values())
    events = make_events(30, seed=41)
    blocked = events[:9]  # spread over the three partitions
    numbers = [event.order.order_number for event in blocked]
    updates = [with_type(event, "order.updated", seed=500 + i) for i, event in enumerate(blocked)]
    later = [with_type(event, "order.updated", seed=900 + i) for i, event in enumerate(blocked)]
    dlq = dlq_topic("crm", first.topics.prefix)
    await sandbox.faults("crm", reject_order_numbers=numbers)
    async with (
        running_daemon(first, CollectorRegistry()) as one,
        running_daemon(second, CollectorRegistry(), apply=False) as two,
        aiohttp.ClientSession() as session,
    ):

        async def both_assigned() -> bool:
            held = []
            for base in (one, two):
                async with session.get(f"{base}/status") as response:
                    held.append((await response.json())["sinks"]["crm"]["assigned_partitions"])
            return all(held) and sorted(p for partitions in held for p in partitions) == list(range(PARTITIONS))

        await until(both_assigned, timeout=60, every=0.2)  # the state stays where the orders go from now on
        await produce(kafka_broker.bootstrap, orders_of(first), [*events, *updates])
        await sandbox.wait_ledger("crm", 21, timeout=60)

        async def dead_lettered() -> bool:
            return len(await read_topic(kafka_broker.bootstrap, dlq)) == 18  # each create, and its update behind it

        await until(dead_lettered, timeout=60, every=0.2)
        await sandbox.faults("crm")  # the downstream was fixed
        replayed = await orderbus_cli("dlq", "replay", "--sink", "crm", "--all", env=envs["host-a"])
        assert replayed.returncode == 0, replayed.stderr
        await sandbox.wait_ledger("crm", 21 + 18, timeout=60)

        # Unblocked where the orders are: their next updates are delivered, not dead-lettered behind the replayed.
        await produce(kafka_broker.bootstrap, orders_of(first), later)
        ledger = await sandbox.wait_ledger("crm", 21 + 18 + 9, timeout=60)
    assert len(await read_topic(kafka_broker.bootstrap, dlq)) == 18
    applied = Counter((entry["order_number"], entry["method"]) for entry in ledger)
    assert {applied[number, "POST"] for number in numbers} == {1}
    assert {applied[number, "PUT"] for number in numbers} == {2}
    for number in numbers:
        ids = {entry["id"] for entry in ledger if entry["order_number"] == number}
        assert len(ids) == 1, "the updates address the object the replayed create made"
