"""Operator commands against a running daemon: `orderbus status`, `orderbus dedup prune`, and what pruning means."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import socket
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from support import (
    apply_topics,
    free_port,
    make_events,
    orders_of,
    produce,
    running_daemon,
    settings_env,
    settings_for,
)

from daemon import lifecycle
from daemon.app import LISTEN_BACKLOG, RUNNER_OPTIONS, build_app
from daemon.kafka_local import BrokerInfo
from daemon.retention import prune
from daemon.sandbox import SandboxClient, SandboxProcess
from daemon.status import fetch_status
from topics.admin import missing_topics
from topics.catalogue import dlq_topic, orders_topic, replay_topic, state_topic

pytestmark = pytest.mark.integration


async def cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", *args, env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_status_shows_each_sink_of_a_running_daemon(
    kafka_broker: BrokerInfo, sandbox_process: SandboxProcess, sandbox: SandboxClient, unique_name: str, tmp_path: Path
) -> None:
    sinks = {name: {"base_url": sandbox_process.system_url(name)} for name in ("crm", "shipping")}
    env = settings_env(kafka_broker, f"{unique_name}.", tmp_path, sinks=sinks)
    settings = settings_for(kafka_broker, f"{unique_name}.", tmp_path, sinks=sinks)
    async with running_daemon(settings) as base:
        await produce(kafka_broker.bootstrap, orders_of(settings), make_events(30, seed=41))
        await sandbox.wait_ledger("crm", 30, timeout=30)
        await sandbox.wait_ledger("shipping", 30, timeout=30)
        for _ in range(100):  # the lag is measured every 2 s; wait until it shows the commits
            if sum((await asyncio.to_thread(fetch_status, base))["sinks"]["crm"]["lag"].values()) == 0:
                break
            await asyncio.sleep(0.1)
        code, out, err = await cli("status", "--url", base, env=env)
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["sink", "partitions", "lag"]
    crm = next(row.split() for row in rows if row.startswith("crm"))
    assert crm[1] == "0-5"  # all six partitions
    assert crm[2] == "0"  # no lag
    assert crm[6] == "closed"
    assert crm[8] == "30"  # delivered
    assert not any(row.startswith("accounting") for row in rows), "only enabled sinks"
    code, _, err = await cli("status", "--url", "http://127.0.0.1:1", env=env)
    assert code == 1
    assert "no orderbus daemon answers" in err


async def test_a_pruned_delivery_state_is_redelivered_safely_through_the_idempotency_key(
    kafka_broker: BrokerInfo, sandbox_process: SandboxProcess, sandbox: SandboxClient, unique_name: str, tmp_path: Path
) -> None:
    sinks = {"crm": {"base_url": sandbox_process.system_url("crm"), "commit_interval": 0.2}}
    env = settings_env(kafka_broker, f"{unique_name}.", tmp_path, sinks=sinks)
    settings = settings_for(kafka_broker, f"{unique_name}.", tmp_path, sinks=sinks)
    events = make_events(20, seed=43)
    async with running_daemon(settings):
        await produce(kafka_broker.bootstrap, orders_of(settings), events)
        await sandbox.wait_ledger("crm", 20, timeout=30)

    code, out, err = await cli("dedup", "prune", "--older-than-hours", "2", env=env)
    assert code == 0, err
    assert "dedup-crm: 0 row(s) pruned" in out.splitlines()  # nothing is that old yet
    code, _, err = await cli("dedup", "prune", "--older-than-hours", "0", env=env)
    assert code == 2  # below the least of the settings
    assert "--older-than-hours: a number of hours, at least 1" in err
    # Three hours later, by the retention's clock: the states are that old now.
    assert (await prune(settings, older_than_hours=2, now=time.time() + 3 * 3600))["dedup-crm"] == 20

    # The same events again (an upstream producer retried): orderbus no longer remembers them ...
    async with running_daemon(settings):
        await produce(kafka_broker.bootstrap, orders_of(settings), events)
        for _ in range(100):
            if (await sandbox.stats())["systems"]["crm"]["duplicate_requests"] >= 20:
                break
            await asyncio.sleep(0.1)
    # ... so it sends them again, with the same Idempotency-Key, and the CRM applies nothing twice.
    stats = (await sandbox.stats())["systems"]["crm"]
    assert stats["duplicate_requests"] == 20
    applied = Counter(entry["order_number"] for entry in await sandbox.ledger("crm"))
    assert len(applied) == 20
    assert set(applied.values()) == {1}


async def test_the_daemon_refuses_to_start_without_its_topics_and_creates_none(
    kafka_broker: BrokerInfo, unique_name: str, tmp_path: Path
) -> None:
    # The test broker, like Kafka by default, creates a topic a client asks metadata for: the daemon's own
    # clients created one-partition topics that `topics apply` then only reported as drift.
    env = settings_env(kafka_broker, f"{unique_name}.", tmp_path, sinks={"crm": {"base_url": "http://127.0.0.1:1"}})
    settings = settings_for(
        kafka_broker, f"{unique_name}.", tmp_path, sinks={"crm": {"base_url": "http://127.0.0.1:1"}}
    )
    names = [orders_topic(settings.topics.prefix), dlq_topic("crm", settings.topics.prefix)]
    names += [replay_topic("crm", settings.topics.prefix), state_topic("crm", settings.topics.prefix)]
    code, _, err = await cli("run", env=env)
    assert code == 2, err
    assert f"topics {', '.join(names)} do not exist: run `orderbus topics apply`" in err
    assert await missing_topics(names, {"bootstrap_servers": kafka_broker.bootstrap}) == names, "none created"


async def test_the_listener_queues_a_burst_of_connections_while_its_event_loop_is_busy() -> None:
    # After a 90 s broker freeze, the clients' retries came at once: beyond aiohttp's default queue of 128 the
    # handshakes were dropped, and the clients' kernels retried them after 1, 3, 7, 15, 31 s (webhooks waited a
    # minute and more). Here the loop is kept busy (this test does not yield) while 300 clients connect.
    assert LISTEN_BACKLOG >= 300
    port = free_port()
    async with contextlib.AsyncExitStack() as stack:
        await lifecycle._listen(stack, build_app(ingest=None, readiness=dict), "ingest", "127.0.0.1", port)
        clients = [socket.socket() for _ in range(300)]
        try:
            for client in clients:
                client.setblocking(False)
                client.connect_ex(("127.0.0.1", port))
            deadline = time.monotonic() + 2.0
            pending = list(clients)
            while pending and (left := deadline - time.monotonic()) > 0:
                _, writable, _ = select.select([], pending, [], left)  # connected: the kernel completed the handshake
                pending = [client for client in pending if client not in writable]
            assert not pending, f"{len(pending)} of 300 handshakes not completed while the loop was busy"
        finally:
            for client in clients:
                client.close()


async def test_a_connection_whose_request_head_never_ends_is_closed_by_the_listeners_keepalive_timeout() -> None:
    # Review (security): aiohttp's default kept such a connection for an hour (1,000 of them held 95 s and more).
    # The daemon's listener with its own options, but a timeout of 0.5 s instead of 75 s to keep the test short.
    assert RUNNER_OPTIONS["keepalive_timeout"] <= 120, "a proxy's idle timeout is 60 s at most; an hour is too long"
    port = free_port()
    async with contextlib.AsyncExitStack() as stack:
        app = build_app(ingest=None, readiness=dict)
        await lifecycle._listen(stack, app, "ingest", "127.0.0.1", port, keepalive_timeout=0.5)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/orders HTTP/1.1\r\nHost: x\r\nContent-")  # and nothing more
        await writer.drain()
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), timeout=10) == b"", "closed without an answer"
        assert time.monotonic() - started < 5
        writer.close()


async def test_a_port_held_by_another_process_ends_the_start_with_exit_1_which_systemd_retries(
    kafka_broker: BrokerInfo, unique_name: str, tmp_path: Path
) -> None:
    # Exit 2 (a bad setting) is not restarted (RestartPreventExitStatus=2): a port held for a moment at a rolling
    # restart, or an address not up yet at boot, left the daemon down for good.
    env = settings_env(kafka_broker, f"{unique_name}.", tmp_path)
    await apply_topics(settings_for(kafka_broker, f"{unique_name}.", tmp_path))
    port = int(env["ORDERBUS_INGEST__PORT"])
    with socket.create_server(("127.0.0.1", port)):
        code, _, err = await cli("run", env={**env, "ORDERBUS_INGEST__HOST": "127.0.0.1"})
    assert code == 1, err
    last = json.loads(err.strip().splitlines()[-1])
    assert last["exit_code"] == 1
    assert last["msg"].startswith(f"stopped: ingest.host/ingest.port: cannot listen on 127.0.0.1:{port}: ")
    assert last["msg"].endswith("; a service manager starts it again (exit 1)")
