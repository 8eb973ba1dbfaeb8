"""An order's state follows its partition from instance to instance (`consumers.order_state`): two real daemons on
files of their own, one after the other, a real broker and the sandbox. The second addresses by id the orders the
first created, keeps the order the first dead-lettered blocked, and once it has replayed that order's dead letters
the first, back, delivers the order's next update instead of blocking it on what its own file still says."""

from __future__ import annotations

from pathlib import Path

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
from topics.catalogue import dlq_topic, state_topic

pytestmark = pytest.mark.integration


async def test_an_orders_state_follows_its_partition_to_another_instance(
    kafka_broker: BrokerInfo,
    sandbox_process: SandboxProcess,
    sandbox: SandboxClient,
    unique_name: str,
    tmp_path: Path,
) -> None:
    sinks = {"crm": {"base_url": sandbox_process.system_url("crm"), **QUICK_SINK}}
    envs = {
        name: settings_env(kafka_broker, f"{unique_name}.", tmp_path / name, partitions=3, sinks=sinks)
        for name in ("host-a", "host-b")
    }
    first, second = (load_settings(None, env=env) for env in envs.values())
    *created, rejected = make_events(7, seed=73)
    numbers = [event.order.order_number for event in created]
    blocked = rejected.order.order_number
    dlq = dlq_topic("crm", first.topics.prefix)

    async def dead_letters(count: int) -> list[str]:
        async def arrived() -> bool:
            return len(await read_topic(kafka_broker.bootstrap, dlq)) == count

        await until(arrived, timeout=60, every=0.2)
        return [
            dict(headers)["orderbus.dlq.reason"].decode()
            for _, _, headers in await read_topic(kafka_broker.bootstrap, dlq)
        ]

    # The first instance creates six orders (their ids in its file and the topic) and dead-letters the seventh.
    await sandbox.faults("crm", reject_order_numbers=[blocked])
    async with running_daemon(first, CollectorRegistry()):
        await produce(kafka_broker.bootstrap, orders_of(first), [*created, rejected])
        await sandbox.wait_ledger("crm", 6, timeout=60)
        assert await dead_letters(1) == ["rejected"]
    state = await read_topic(kafka_broker.bootstrap, state_topic("crm", first.topics.prefix))
    assert sorted(key for key, _, _ in state if key is not None and key.startswith(b"id:")) == sorted(
        f"id:{number}".encode() for number in numbers
    )

    # The second, on an empty file, gets every partition.
    sent_before = len(await sandbox.requests("crm"))
    async with running_daemon(second, CollectorRegistry(), apply=False):
        updates = [with_type(event, "order.updated", seed=300 + i) for i, event in enumerate(created)]
        await produce(kafka_broker.bootstrap, orders_of(first), [*updates, with_type(rejected, "order.updated", 399)])
        await sandbox.wait_ledger("crm", 12, timeout=60)
        # Behind its dead letter, as the first instance would have it; not sent, so not rejected again.
        assert sorted(await dead_letters(2)) == ["dead-lettered-predecessor", "rejected"]
        puts = [r for r in await sandbox.requests("crm", since=sent_before) if r["method"] == "PUT"]
        assert len(puts) == 6
        assert not [r["path"] for r in puts if "/by-number/" in r["path"]], "by the ids the first instance learned"

        await sandbox.faults("crm")  # the downstream was fixed: the second instance replays the order's dead letters
        replayed = await orderbus_cli("dlq", "replay", "--sink", "crm", "--all", env=envs["host-b"])
        assert replayed.returncode == 0, replayed.stderr
        await sandbox.wait_ledger("crm", 14, timeout=60)

    # The first instance again: its file still has the order blocked, the topic says it no longer is.
    async with running_daemon(first, CollectorRegistry(), apply=False):
        await produce(kafka_broker.bootstrap, orders_of(first), [with_type(rejected, "order.updated", 499)])
        ledger = await sandbox.wait_ledger("crm", 15, timeout=60)
    assert (ledger[-1]["order_number"], ledger[-1]["method"]) == (blocked, "PUT")
    assert len(await read_topic(kafka_broker.bootstrap, dlq)) == 2
