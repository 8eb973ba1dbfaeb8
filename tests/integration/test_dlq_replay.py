"""Dead letters, fixed, replayed with the operator CLI: each applied exactly once, with its original key."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
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
    with_type,
)

from consumers.work import idempotency_key
from daemon.kafka_local import BrokerInfo
from daemon.sandbox import SandboxClient, SandboxProcess
from daemon.settings import load_settings
from topics.catalogue import dlq_topic

pytestmark = pytest.mark.integration


async def test_fix_then_replay_applies_each_dead_letter_once_with_its_original_key(
    kafka_broker: BrokerInfo,
    sandbox_process: SandboxProcess,
    sandbox: SandboxClient,
    unique_name: str,
    tmp_path: Path,
) -> None:
    events = make_events(60, seed=31)
    rejected = [e.order.order_number for e in events[:5]]
    update = with_type(events[0], "order.updated", seed=99)  # follows its rejected create to the dead letters
    await sandbox.faults("crm", reject_order_numbers=rejected)
    sinks = {"crm": {"base_url": sandbox_process.system_url("crm"), **QUICK_SINK}}
    env = settings_env(kafka_broker, f"{unique_name}.", tmp_path, sinks=sinks)  # the daemon's and the CLI's
    settings = load_settings(None, env=env)
    dlq = dlq_topic("crm", settings.topics.prefix)
    async with running_daemon(settings):
        await produce(kafka_broker.bootstrap, orders_of(settings), [*events, update])
        await sandbox.wait_ledger("crm", 55, timeout=60)
        for _ in range(100):
            if len(await read_topic(kafka_broker.bootstrap, dlq)) == 6:
                break
            await asyncio.sleep(0.2)

        listed = await orderbus_cli("dlq", "list", "--sink", "crm", env=env)
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert len(lines) == 6
        assert all(line.endswith(" state=open") for line in lines), lines
        assert Counter("reason=rejected" in line for line in lines) == {True: 5, False: 1}
        assert sum("reason=dead-lettered-predecessor" in line for line in lines) == 1
        shown = await orderbus_cli("dlq", "show", "--sink", "crm", lines[0].split()[0], env=env)
        assert "response body:" in shown.stdout
        assert "idempotency key: orderbus:crm:" in shown.stdout

        blocked = events[0].order.order_number
        for _ in range(20):  # the dead letters are on their topic; the sink's file has the order's chain a flush later
            traced = await orderbus_cli("trace", blocked, env=env)
            if "2 of its events wait" in traced.stdout:
                break
            await asyncio.sleep(0.2)
        assert traced.returncode == 0, traced.stderr
        assert traced.stdout.startswith(f"order {blocked}: 2 event(s) in {orders_of(settings)} (partition ")
        of_blocked = {line.split("reason=")[1].split()[0]: line.split()[0] for line in lines if f"={blocked} " in line}
        crm_lines = [
            line.split(maxsplit=1)[1] for line in traced.stdout.splitlines() if line.lstrip().startswith("crm ")
        ]
        assert crm_lines == [
            f"dead-lettered: dlq {of_blocked['rejected']} (rejected, HTTP 400), state=open",
            f"dead-lettered: dlq {of_blocked['dead-lettered-predecessor']} (dead-lettered-predecessor), state=open",
        ]
        assert "crm: the order is blocked (2 of its events wait in the dead letters" in traced.stdout
        delivered = await orderbus_cli("trace", events[10].order.order_number, env=env)
        assert delivered.returncode == 0, delivered.stderr
        assert re.search(r"\n\s+crm\s+delivered, its id there now \S+: 1 attempt, ", delivered.stdout), delivered.stdout
        # The newest records, read as trace and dlq read.
        newest = await orderbus_cli("topics", "show", "--limit", "4", env=env)
        assert newest.returncode == 0, newest.stderr
        shown_lines = newest.stdout.splitlines()
        assert len(shown_lines) == 4
        numbers = {e.order.order_number for e in events}
        assert all(re.fullmatch(r"\S+ p\d+@\d+ order\.\w+ order=(\S+) event_id=.*", line) for line in shown_lines)
        assert {re.search(r"order=(\S+)", line)[1] for line in shown_lines} <= numbers  # type: ignore[index]
        missing = await orderbus_cli("trace", "SO-2026-999999", env=env)
        assert missing.returncode == 1
        assert missing.stdout.startswith("no record of order SO-2026-999999")

        await sandbox.faults("crm")  # the downstream was fixed
        replayed = await orderbus_cli("dlq", "replay", "--sink", "crm", "--all", env=env)
        assert replayed.returncode == 0, replayed.stderr
        assert "6 dead letter(s) sent back" in replayed.stderr
        ledger = await sandbox.wait_ledger("crm", 61, timeout=60)

        for _ in range(50):  # the sink commits what it read of the replay topic every 0.2 s
            listed = await orderbus_cli("dlq", "list", "--sink", "crm", env=env)
            if all(line.endswith(" state=replayed") for line in listed.stdout.splitlines()):
                break
            await asyncio.sleep(0.2)
        assert [line.rsplit(" ", 1)[1] for line in listed.stdout.splitlines()] == ["state=replayed"] * 6
        assert (await orderbus_cli("dlq", "list", "--sink", "crm", "--open", env=env)).stdout == ""

        after = (await orderbus_cli("trace", blocked, env=env)).stdout
        assert after.count("state=replayed; delivered") == 2, after
        assert "blocked" not in after

        nothing = await orderbus_cli("dlq", "replay", "--sink", "crm", "--all", env=env)  # every one was replayed
        assert nothing.returncode == 1
        assert "matches --all among the open ones" in nothing.stderr
        # A second replay changes nothing.
        again = await orderbus_cli("dlq", "replay", "--sink", "crm", "--all", "--again", env=env)
        assert again.returncode == 0, again.stderr
        assert "6 dead letter(s) sent back" in again.stderr
        await asyncio.sleep(2.0)
        assert len(await sandbox.ledger("crm")) == 61

    applied = Counter((entry["order_number"], entry["method"]) for entry in ledger)
    assert max(applied.values()) == 1
    assert {number for number, _ in applied} == {e.order.order_number for e in events}
    by_number = {entry["order_number"]: entry for entry in ledger if entry["method"] == "POST"}
    for event in events[:5]:
        assert by_number[event.order.order_number]["idempotency_key"] == idempotency_key("crm", str(event.event_id))
    methods = [entry["method"] for entry in ledger if entry["order_number"] == events[0].order.order_number]
    assert methods == ["POST", "PUT"], "the replayed update came after its replayed create"
