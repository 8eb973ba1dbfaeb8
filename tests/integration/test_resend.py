"""`orderbus reconcile --resend` against a real daemon, broker and sandbox: a system that lost some orders (a
restore from an older backup) gets each of them back once, in its newest state, and nothing else."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from support import make_events, orderbus_cli, orders_of, produce, running_daemon, settings_env, with_type

from daemon.kafka_local import BrokerInfo
from daemon.sandbox import SandboxClient, SandboxProcess
from daemon.settings import load_settings
from topics.catalogue import replay_topic
from topics.samples import sample_event

pytestmark = pytest.mark.integration


async def test_reconcile_resends_what_a_system_lost_once_in_its_newest_state(
    kafka_broker: BrokerInfo,
    sandbox_process: SandboxProcess,
    sandbox: SandboxClient,
    unique_name: str,
    tmp_path: Path,
) -> None:
    fast = {"backoff_base": 0.05, "backoff_cap": 0.2, "commit_interval": 0.2}
    sinks = {"accounting": {"base_url": sandbox_process.system_url("accounting"), **fast}}
    env = settings_env(kafka_broker, f"{unique_name}.", tmp_path, sinks=sinks)
    settings = load_settings(None, env=env)
    events = make_events(10, seed=73)
    # Updates that change the order (another sample under the same number): the resend must send the newest state.
    updated = [
        sample_event(random.Random(300 + i), order_number=event.order.order_number).model_copy(
            update={"event_type": "order.updated"}
        )
        for i, event in enumerate(events[:2])
    ]
    lost = [events[0], events[5], events[6]]  # the first with an update: its newest state is the update's
    numbers = [event.order.order_number for event in lost]
    async with running_daemon(settings):
        await produce(kafka_broker.bootstrap, orders_of(settings), events)
        await sandbox.wait_ledger("accounting", 10, timeout=60)
        await produce(kafka_broker.bootstrap, orders_of(settings), updated)
        before = await sandbox.wait_ledger("accounting", 12, timeout=60)
        lost_ids = {entry["order_number"]: entry["id"] for entry in before if entry["method"] == "POST"}
        assert await sandbox.lose("accounting", numbers) == 3

        checked = await orderbus_cli("reconcile", "--sink", "accounting", "--resend", env=env)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "  present  7\n  missing  3\n  unknown  0\n" in checked.stdout
        topic = replay_topic("accounting", settings.topics.prefix)
        assert f"resent 3 order(s) to {topic} as creates; the running daemon delivers them:" in checked.stdout
        assert "not resent" not in checked.stdout
        ledger = await sandbox.wait_ledger("accounting", 3, since=before[-1]["seq"], timeout=60)

        again = await orderbus_cli("reconcile", "--sink", "accounting", "--resend", env=env)  # nothing lost any more
        assert again.returncode == 0, again.stdout + again.stderr
        assert "  present  10\n  missing  0\n" in again.stdout
        assert not [line for line in again.stdout.splitlines() if line.startswith(("resent", "not resent"))]

        later = with_type(events[5], "order.updated", seed=999)
        await produce(kafka_broker.bootstrap, orders_of(settings), [later])
        [put] = await sandbox.wait_ledger("accounting", 1, since=ledger[-1]["seq"], timeout=60)
        await asyncio.sleep(1.0)  # nothing else comes
        assert len(await sandbox.ledger("accounting", since=before[-1]["seq"])) == 4

    assert sorted((entry["method"], entry["order_number"]) for entry in ledger) == [
        ("POST", n) for n in sorted(numbers)
    ]
    keys = {entry["idempotency_key"] for entry in ledger}
    assert all(key is not None and key.startswith("orderbus:accounting:") for key in keys)
    assert not keys & {entry["idempotency_key"] for entry in before}, "new keys: the system may remember the old"
    resent_ids = {entry["order_number"]: entry["id"] for entry in ledger}
    assert all(resent_ids[n] != lost_ids[n] for n in numbers)
    assert put["method"] == "PUT"
    assert put["id"] == resent_ids[events[5].order.order_number], "later updates address the resent order"
    books = {order["order_number"]: order for order in await sandbox.orders("accounting")}
    assert updated[0].order.gross_total != events[0].order.gross_total
    assert books[numbers[0]]["body"]["gross_total"] == str(updated[0].order.gross_total)
    assert all(books[n]["status"] == "open" for n in numbers)
    said = dict(line.strip().split(": ", 1) for line in checked.stdout.split("delivers them:\n", 1)[1].splitlines())
    assert {entry["order_number"]: f"event {entry['event_id']}" for entry in ledger} == {
        number: text.split(",")[0] for number, text in said.items()
    }
    assert said[numbers[0]].endswith(f", of order.updated {updated[0].event_id}")
    assert said[numbers[1]].endswith(f", of order.created {events[5].event_id}")
