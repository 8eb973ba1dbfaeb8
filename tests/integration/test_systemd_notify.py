"""The daemon speaks sd_notify itself: READY=1 once connected and assigned, WATCHDOG=1 pings, STOPPING=1.

The test owns the unix datagram socket systemd would own, and runs `python -m daemon run` as a process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import free_port

from daemon.kafka_local import BrokerInfo
from daemon.sandbox import SandboxProcess
from topics.admin import apply_catalogue
from topics.catalogue import TopicLayout, catalogue

pytestmark = pytest.mark.integration


def receive_until(sock: socket.socket, wanted: str, deadline: float, seen: list[str]) -> None:
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            break
        seen.append(message)
        if wanted in message.splitlines():
            return
    raise AssertionError(f"no {wanted} within the deadline; received {seen}")


def test_ready_watchdog_and_stopping_over_a_real_notify_socket(
    kafka_broker: BrokerInfo, sandbox_process: SandboxProcess, unique_name: str, tmp_path: Path
) -> None:
    prefix = f"{unique_name}."
    specs = catalogue(TopicLayout(prefix=prefix, orders_partitions=3))
    asyncio.run(apply_catalogue(specs, {"bootstrap_servers": kafka_broker.bootstrap}))
    socket_path = tmp_path / "notify.sock"
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(socket_path),
        "WATCHDOG_USEC": "400000",  # a ping every 0.2 s
        "ORDERBUS_KAFKA__BOOTSTRAP_SERVERS": kafka_broker.bootstrap,
        "ORDERBUS_TOPICS__PREFIX": prefix,
        "ORDERBUS_STATE_DIR": str(tmp_path / "state"),
        "ORDERBUS_INGEST__PORT": str(free_port()),
        "ORDERBUS_INGEST__ALLOW_UNSIGNED": "true",
        "ORDERBUS_SINKS__CRM": json.dumps({"enabled": True, "base_url": sandbox_process.system_url("crm")}),
    }
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(socket_path))
        log = (tmp_path / "daemon.log").open("wb")
        daemon = subprocess.Popen([sys.executable, "-m", "daemon", "run"], env=env, stdout=log, stderr=log)
        try:
            seen: list[str] = []
            receive_until(sock, "READY=1", time.monotonic() + 60, seen)
            pings_before = sum("WATCHDOG=1" in m for m in seen)
            started = time.monotonic()
            while sum("WATCHDOG=1" in m for m in seen) < pings_before + 3:
                receive_until(sock, "WATCHDOG=1", time.monotonic() + 5, seen)
            assert time.monotonic() - started < 3.0, "pinged at about the interval systemd asked for"
            daemon.send_signal(signal.SIGTERM)
            receive_until(sock, "STOPPING=1", time.monotonic() + 30, seen)
            assert daemon.wait(30) == 0
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
            log.close()
