"""Fixtures shared by every test directory: the real local Kafka broker and unique names.

`kafka_broker` is one broker for the whole session (started on first use); tests isolate themselves with
`unique_name` topics and groups. Tests that stop, kill or restart a broker start their own with
`private_broker()`. Neither ever skips: if Kafka cannot start, the test errors with the broker's own output.
"""

from __future__ import annotations

import io
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from daemon import kafka_local, logs
from daemon.kafka_local import BrokerInfo
from daemon.sandbox import SandboxClient, SandboxProcess, start_sandbox_process
from topics.errors import LocalKafkaError

# Commands and daemons the tests start without --config read the built-in defaults, not a settings file this host
# may have at /etc/orderbus/orderbus.toml (`daemon.cli.default_config`); subprocesses inherit it.
os.environ["ORDERBUS_CONFIG"] = ""

# Two brokers may run at once (session + private) on a shared 2-core machine: keep each heap small.
TEST_BROKER_HEAP = "384m"


def _start_or_fail(data_dir: Path) -> BrokerInfo:
    try:
        return kafka_local.start(data_dir, heap=TEST_BROKER_HEAP)
    except LocalKafkaError as exc:
        # The error quotes kafka.out/server.log when the JVM died; add them for every other failure too.
        detail = str(exc) if "--- last lines of" in str(exc) else f"{exc}\n{kafka_local.log_tail(data_dir)}"
        pytest.fail(f"the local Kafka broker in {data_dir} did not start: {detail}", pytrace=False)


def _stop(data_dir: Path) -> None:
    kafka_local.stop(data_dir, grace=20.0)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerInfo]:
    """One real broker for the whole test session, on free loopback ports."""
    data_dir = tmp_path_factory.mktemp("kafka-session")
    try:
        yield _start_or_fail(data_dir)
    finally:
        _stop(data_dir)


@pytest.fixture
def private_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], BrokerInfo]]:
    """Starts brokers of this test alone, each in its own data dir, which the test may stop, kill and restart.

    Call it to get a running broker; restart one with `kafka_local.start(info.data_dir)` (the data dir
    remembers its ports). Whatever runs in those data dirs at the end of the test is stopped.
    """
    data_dirs: list[Path] = []

    def start_private() -> BrokerInfo:
        data_dir = tmp_path_factory.mktemp("kafka-private")
        data_dirs.append(data_dir)
        return _start_or_fail(data_dir)

    try:
        yield start_private
    finally:
        for data_dir in data_dirs:
            _stop(data_dir)


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A topic/group name no other test uses: the test's name (legal characters only) plus a random suffix."""
    stem = re.sub(r"[^A-Za-z0-9-]+", "-", request.node.name).strip("-")[:60]
    return f"{stem}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def sandbox_process() -> Iterator[SandboxProcess]:
    """One sandbox downstream process for the session (reset by `sandbox` before each test). It keeps the bodies
    of the orders it holds, so a test can read back what a system received (a few MB over the session)."""
    process = start_sandbox_process()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
async def sandbox(sandbox_process: SandboxProcess) -> AsyncIterator[SandboxClient]:
    """The session's sandbox, reset: empty ledger, no faults, no script."""
    async with sandbox_process.client() as client:
        await client.reset()
        yield client


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """Every log event of the test as the daemon writes it (`daemon.logs.configure` at DEBUG), in a StringIO.

    Afterwards the root logger's level and the quieted libraries' levels are restored and every JSON handler
    removed (also those the test itself configured).
    """
    root = logging.getLogger()
    saved = root.level, {name: logging.getLogger(name).level for name in logs.QUIETED}
    stream = io.StringIO()
    logs.configure("DEBUG", stream)
    try:
        yield stream
    finally:
        for handler in root.handlers[:]:
            if isinstance(handler.formatter, logs.JsonFormatter):
                root.removeHandler(handler)
        root.setLevel(saved[0])
        for name, level in saved[1].items():
            logging.getLogger(name).setLevel(level)


@pytest.fixture
def no_orderbus_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An operator's shell on the systemd host: the sink secrets are the unit's credentials, not in its env."""
    for name in list(os.environ):
        if name.startswith("ORDERBUS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ORDERBUS_CONFIG", "")  # not this host's /etc/orderbus/orderbus.toml
    return monkeypatch
