"""`orderbus reconcile --resend` against a real daemon, broker and sandbox: a system that lost some orders (a
restore from an older backup) gets each of them back once, in its newest state, and nothing else; an order whose
update met the lost object's 404 is resent ahead of that dead letter, which then replays against the new object."""

from __future__ import annotations

import asyncio
import random
import re
from pathlib import Path

import pytest
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
)

from daemon.kafka_local import BrokerInfo
from daemon.sandbox import SandboxClient, SandboxProcess
from daemon.sandbox.records import LedgerEntry
from daemon.settings import load_settings
from topics.catalogue import dlq_topic, replay_topic
from topics.envelope import OrderEvent
from topics.samples import sample_event

pytestmark = pytest.mark.integration


def changed(event: OrderEvent, seed: int) -> OrderEvent:
    """An update of `event`'s order that changes it: another sample under the same number."""
    fresh = sample_event(random.Random(seed), order_number=event.order.order_number)
    return fresh.model_copy(update={"event_type": "order.updated"})


def ledger_ids(ledger: list[LedgerEntry]) -> dict[str, str]:
    return {entry["order_number"]: entry["id"] for entry in ledger}


def resent_lines(stdout: str) -> dict[str, str]:
    """The report's resent orders: number -> what was sent."""
    listed = stdout.split("the running daemon delivers them:\n", 1)[1].split("not resent:", 1)[0]
    return dict(line.strip().split(": ", 1) for line in listed.splitlines())


async def test_reconcile_resends_what_a_system_lost_once_in_its_newest_state(
    kafka_broker: BrokerInfo,
    sandbox_process: SandboxProcess,
    sandbox: SandboxClient,
    unique_name: str,
    tmp_path: Path,
) -> None:
    sinks = {"accounting": {"base_url": sandbox_process.system_url("accounting"), **QUICK_SINK}}
    env = settings_env(kafka_broker, f"{unique_name}.", tmp_path, sinks=sinks)
    settings = load_settings(None, env=env)
    events = make_events(10, seed=73)
    updated = [changed(event, 300 + i) for i, event in enumerate(events[:2])]
    lost = [events[0], events[5], events[6]]  # the first with an update: its newest state is the update's
    numbers = [event.order.order_number for event in lost]
    after_loss = changed(events[6], 400)  # sent to the lost object: 404, dead-lettered, the order blocked
    dlq = dlq_topic("accounting", settings.topics.prefix)
    async with running_daemon(settings):
        await produce(kafka_broker.bootstrap, orders_of(settings), events)
        await sandbox.wait_ledger("accounting", 10, timeout=60)
        await produce(kafka_broker.bootstrap, orders_of(settings), updated)
        before = await sandbox.wait_ledger("accounting", 12, timeout=60)
        assert await sandbox.lose("accounting", numbers) == 3
        await produce(kafka_broker.bootstrap, orders_of(settings), [after_loss])

        async def dead_lettered() -> bool:
            return len(await read_topic(kafka_broker.bootstrap, dlq)) == 1

        await until(dead_lettered, timeout=60, every=0.2)
    lost_ids = {entry["order_number"]: entry["id"] for entry in before if entry["method"] == "POST"}

    # The daemon is stopped: both runs find the orders missing; the second sends nothing again.
    first = await orderbus_cli("reconcile", "--sink", "accounting", "--resend", env=env)
    assert first.returncode == 1, first.stdout + first.stderr  # the blocked order's dead letter is to be replayed
    assert "  present  7\n  missing  3\n  unknown  0\n" in first.stdout
    topic = replay_topic("accounting", settings.topics.prefix)
    assert f"resent 3 order(s) to {topic} as creates; the running daemon delivers them:" in first.stdout
    said = resent_lines(first.stdout)
    assert sorted(said) == sorted(numbers)
    assert said[numbers[0]].endswith(f", of order.updated {updated[0].event_id}")
    assert said[numbers[1]].endswith(f", of order.created {events[5].event_id}")
    assert said[numbers[2]].endswith(
        f", of order.updated {after_loss.event_id}; then replay its dead letters, which now address the resent "
        f"order: orderbus dlq replay --sink accounting --order {numbers[2]}"
    )
    second = await orderbus_cli("reconcile", "--sink", "accounting", "--resend", env=env)
    assert second.returncode == 1
    skipped = dict(line.strip().split(": ", 1) for line in second.stdout.split("not resent:\n", 1)[1].splitlines())
    assert sorted(skipped) == sorted(numbers)
    assert all(
        re.fullmatch(rf"resent at \S+, after the delivery it lost: see orderbus trace {n}", skipped[n]) for n in numbers
    )

    async with running_daemon(settings, apply=False):
        ledger = await sandbox.wait_ledger("accounting", 3, since=before[-1]["seq"], timeout=60)
        replayed = await orderbus_cli("dlq", "replay", "--sink", "accounting", "--order", numbers[2], env=env)
        assert replayed.returncode == 0, replayed.stderr
        [put] = await sandbox.wait_ledger("accounting", 1, since=ledger[-1]["seq"], timeout=60)

        again = await orderbus_cli("reconcile", "--sink", "accounting", "--resend", env=env)  # nothing lost any more
        assert again.returncode == 0, again.stdout + again.stderr
        assert "  present  10\n  missing  0\n" in again.stdout
        assert not [line for line in again.stdout.splitlines() if line.startswith(("resent", "not resent"))]

        traced = await orderbus_cli("trace", numbers[1], env=env)
        assert traced.returncode == 0, traced.stderr
        [resent_line] = [line for line in traced.stdout.splitlines() if line.startswith("accounting: resent ")]
        resent_id = said[numbers[1]].split(",")[0].removeprefix("event ")
        assert f" as event_id={resent_id} (of {events[5].event_id}; replay topic " in resent_line
        assert f"): delivered, its id there now {ledger_ids(ledger)[numbers[1]]}: 1 attempt, " in resent_line

        later = changed(events[5], 999)
        await produce(kafka_broker.bootstrap, orders_of(settings), [later])
        [later_put] = await sandbox.wait_ledger("accounting", 1, since=put["seq"], timeout=60)
        await asyncio.sleep(1.0)  # nothing else comes
        assert len(await sandbox.ledger("accounting", since=before[-1]["seq"])) == 5

    assert sorted((entry["method"], entry["order_number"]) for entry in ledger) == [
        ("POST", n) for n in sorted(numbers)
    ]
    keys = {entry["idempotency_key"] for entry in ledger}
    assert all(key is not None and key.startswith("orderbus:accounting:") for key in keys)
    assert not keys & {entry["idempotency_key"] for entry in before}, "new keys: the system may remember the old"
    resent_ids = ledger_ids(ledger)
    assert all(resent_ids[n] != lost_ids[n] for n in numbers)
    assert {entry["order_number"]: f"event {entry['event_id']}" for entry in ledger} == {
        number: text.split(",")[0] for number, text in said.items()
    }
    assert (put["method"], put["id"], put["event_id"]) == ("PUT", resent_ids[numbers[2]], str(after_loss.event_id))
    assert (later_put["method"], later_put["id"]) == ("PUT", resent_ids[numbers[1]]), "updates address the resent"
    books = {order["order_number"]: order for order in await sandbox.orders("accounting")}
    assert updated[0].order.gross_total != events[0].order.gross_total
    assert books[numbers[0]]["body"]["gross_total"] == str(updated[0].order.gross_total)
    assert books[numbers[2]]["body"]["gross_total"] == str(after_loss.order.gross_total)
    assert all(books[n]["status"] == "open" for n in numbers)
