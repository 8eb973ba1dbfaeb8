"""Crash safety with the daemon as a real process: SIGKILL at random moments, restart, nothing lost or doubled.

The daemon runs as `python -m daemon run --config FILE` (what systemd runs); orders come from an upstream
producer straight into Kafka; the sandbox systems count every request, so duplicate requests after each kill
are measured, not guessed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from support import committed_vs_end, free_port, longest_shutdown, make_events, produce, read_topic

from daemon.kafka_local import BrokerInfo
from daemon.sandbox import SandboxClient, SandboxProcess
from daemon.settings import load_settings
from topics.admin import apply_catalogue
from topics.catalogue import SINKS, TopicLayout, catalogue, consumer_group, orders_topic, state_topic

pytestmark = pytest.mark.integration

ORDERS = 3000
MAX_IN_FLIGHT = 16
COMMIT_INTERVAL = 0.2


def write_config(path: Path, broker: BrokerInfo, prefix: str, state: Path, sandbox: SandboxProcess) -> None:
    lines = [
        f'state_dir = "{state}"',
        'log_level = "INFO"',
        "[kafka]",
        f'bootstrap_servers = "{broker.bootstrap}"',
        "[topics]",
        f'prefix = "{prefix}"',
        "orders_partitions = 6",
        "[ingest]",
        f"port = {free_port()}",
        "allow_unsigned = true",
    ]
    for name in SINKS:
        lines += [
            f"[sinks.{name}]",
            "enabled = true",
            f'base_url = "{sandbox.system_url(name)}"',
            f"max_in_flight = {MAX_IN_FLIGHT}",
            f"commit_interval = {COMMIT_INTERVAL}",
            "backoff_base = 0.05",
            "backoff_cap = 0.5",
            "max_attempts = 100",
            "shutdown_grace = 5",
        ]
    path.write_text("\n".join(lines) + "\n")


def start_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--config", str(config)], stdout=out, stderr=out
        )


def integrity(state: Path) -> dict[str, str]:
    results = {}
    for path in sorted(state.glob("*.sqlite")):
        with sqlite3.connect(path) as db:
            results[path.name] = db.execute("PRAGMA integrity_check").fetchone()[0]
    return results


async def ledger_total(sandbox: SandboxClient) -> int:
    stats = await sandbox.stats()
    return sum(stats["systems"].get(name, {}).get("applied", 0) for name in SINKS)


async def test_sigkill_at_random_moments_loses_nothing_and_applies_nothing_twice(
    kafka_broker: BrokerInfo,
    sandbox_process: SandboxProcess,
    sandbox: SandboxClient,
    unique_name: str,
    tmp_path: Path,
) -> None:
    prefix, state, config, log = (
        f"{unique_name}.",
        tmp_path / "state",
        tmp_path / "orderbus.toml",
        tmp_path / "daemon.log",
    )
    write_config(config, kafka_broker, prefix, state, sandbox_process)
    await apply_catalogue(
        catalogue(TopicLayout(prefix=prefix, orders_partitions=6)), {"bootstrap_servers": kafka_broker.bootstrap}
    )
    await sandbox.faults("*", latency_ms=5, latency_jitter_ms=5, p503=0.02)
    await produce(kafka_broker.bootstrap, orders_topic(prefix), make_events(ORDERS, seed=21))

    rng = random.Random(3)
    kills, duplicates_after_kill = 0, []
    daemon = start_daemon(config, log)
    try:
        for target in sorted(rng.sample(range(ORDERS // 2, 2 * ORDERS), 3)):
            while await ledger_total(sandbox) < target:
                assert daemon.poll() is None, log.read_text()[-3000:]
                await asyncio.sleep(0.05)
            before = (await sandbox.stats())["total"]["duplicate_requests"]
            daemon.send_signal(signal.SIGKILL)
            daemon.wait(10)
            kills += 1
            assert set(integrity(state).values()) == {"ok"}, integrity(state)
            daemon = start_daemon(config, log)
            # Duplicates of this kill: counted until the restarted daemon has moved on (or the next kill).
            duplicates_after_kill.append(before)
        for name in SINKS:
            await sandbox.wait_ledger(name, ORDERS, timeout=120)
        await asyncio.sleep(2 * COMMIT_INTERVAL + 0.5)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, log.read_text()[-3000:]
        total = (await sandbox.stats())["total"]["duplicate_requests"]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()

    for name in SINKS:
        applied = Counter(entry["order_number"] for entry in await sandbox.ledger(name))
        assert len(applied) == ORDERS, f"{name}: lost {ORDERS - len(applied)}"
        assert max(applied.values()) == 1, f"{name}: applied twice"
        committed, ends = await committed_vs_end(
            kafka_broker.bootstrap, orders_topic(prefix), consumer_group(name, prefix)
        )
        assert committed == ends
        # Every create's id reached the sink's state topic, also those a kill left between the file and the brokers
        # (the file's outbox); a record finished before a kill comes again as a dedup hit, which writes nothing.
        shared = {key for key, _, _ in await read_topic(kafka_broker.bootstrap, state_topic(name, prefix))}
        assert {f"id:{order}".encode() for order in applied} <= shared, f"{name}: ids missing from its state topic"
    # What a kill can cost: each sink's requests under way (a lane holds its request slot until the outcome is
    # durable, so nothing else can be applied-but-unrecorded); the downstream's idempotency keys absorb them.
    # A kill can also land before the previous kill's re-sends were recorded, which sends those once more: the
    # bound is twice the window per kill, over the whole run (before the group commit it was ~10x that).
    marks = [*duplicates_after_kill, total]
    per_kill = [later - earlier for earlier, later in itertools.pairwise(marks)]
    report = {"kills": kills, "duplicate_requests_after_each_kill": per_kill, "total": total - marks[0]}
    print(json.dumps(report))
    assert total - marks[0] <= 2 * kills * len(SINKS) * MAX_IN_FLIGHT, report


async def test_a_stop_with_the_broker_frozen_ends_within_the_shutdown_budget(
    private_broker: Callable[[], BrokerInfo],
    sandbox_process: SandboxProcess,
    unique_name: str,
    tmp_path: Path,
) -> None:
    # aiokafka waits its request timeout (40 s) for a LeaveGroup answer, and the sinks leave one after another: with
    # the broker frozen, a daemon with three sinks had not exited 120 s after SIGTERM (systemd kills at 45 s).
    broker = private_broker()
    prefix, state, config, log = f"{unique_name}.", tmp_path / "state", tmp_path / "orderbus.toml", tmp_path / "log"
    write_config(config, broker, prefix, state, sandbox_process)
    budget = longest_shutdown(load_settings(config))
    await apply_catalogue(
        catalogue(TopicLayout(prefix=prefix, orders_partitions=6)), {"bootstrap_servers": broker.bootstrap}
    )
    await produce(broker.bootstrap, orders_topic(prefix), make_events(300, seed=23))
    daemon = start_daemon(config, log)
    try:
        while log.read_text().count("partitions assigned") < len(SINKS):
            assert daemon.poll() is None, log.read_text()[-3000:]
            await asyncio.sleep(0.1)
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            daemon.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(daemon.wait, budget + 10)
            took = time.monotonic() - started
        finally:
            os.kill(broker.pid, signal.SIGCONT)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    assert took < budget, f"stopped in {took:.1f} s or more, over the budget of {budget:.0f} s"
    assert daemon.returncode == 0, log.read_text()[-3000:]
    said = log.read_text()
    assert "kafka did not answer sink crm's leave of its group within 1 s" in said
    assert "Task exception was never retrieved" not in said, "a commit past its deadline is one line, no traceback"
