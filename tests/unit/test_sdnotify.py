"""sd_notify over a real unix datagram socket the test owns, as systemd's would be: states, watchdog, failures."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumers.clock import FakeClock
from daemon.sdnotify import Notifier, NotifyError, watchdog_loop


class ManagerSocket:
    """The service manager's end: a bound datagram socket and what it has received so far."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)

    def received(self) -> list[str]:
        messages = []
        while True:
            try:
                messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return messages


@pytest.fixture
def socket_path() -> Iterator[Path]:
    # Not tmp_path: a unix socket path must fit in 107 bytes, and pytest's directories can be longer.
    with tempfile.TemporaryDirectory(prefix="sdnotify-", dir="/tmp") as directory:
        yield Path(directory) / "notify"


@pytest.fixture
def manager(socket_path: Path) -> Iterator[ManagerSocket]:
    manager = ManagerSocket(str(socket_path))
    yield manager
    manager.sock.close()


def test_ready_stopping_and_status_arrive_as_datagrams(manager: ManagerSocket, socket_path: Path) -> None:
    with Notifier({"NOTIFY_SOCKET": str(socket_path)}) as notifier:
        assert notifier.enabled
        assert notifier.status("connecting to kafka")
        assert notifier.ready("ready: ingest, 3 sinks")
        assert notifier.stopping("draining\nin-flight deliveries")
    assert manager.received() == [
        "STATUS=connecting to kafka",
        "READY=1\nSTATUS=ready: ingest, 3 sinks",
        "STOPPING=1\nSTATUS=draining in-flight deliveries",  # one line: a line break would start a new key
    ]
    assert not notifier.enabled  # closed by the with block


def test_abstract_namespace_socket() -> None:
    name = f"orderbus-test-{uuid.uuid4().hex}"
    manager = ManagerSocket("\0" + name)
    try:
        with Notifier({"NOTIFY_SOCKET": "@" + name}) as notifier:
            assert notifier.ready()
        assert manager.received() == ["READY=1"]
    finally:
        manager.sock.close()


async def test_watchdog_loop_pings_every_half_period_until_cancelled(manager: ManagerSocket, socket_path: Path) -> None:
    clock = FakeClock()
    env = {"NOTIFY_SOCKET": str(socket_path), "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    with Notifier(env) as notifier:
        assert notifier.watchdog_interval() == 1.0
        task = asyncio.create_task(watchdog_loop(notifier, clock=clock))
        await clock.advance(0)
        assert manager.received() == ["WATCHDOG=1"]
        await clock.advance(0.5)
        assert manager.received() == []
        await clock.advance(1.5)  # t = 2: the pings of t = 1 and t = 2
        assert manager.received() == ["WATCHDOG=1", "WATCHDOG=1"]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await clock.advance(10)
        assert manager.received() == []


async def test_watchdog_loop_takes_an_explicit_interval(manager: ManagerSocket, socket_path: Path) -> None:
    clock = FakeClock()
    with Notifier({"NOTIFY_SOCKET": str(socket_path)}) as notifier:
        assert notifier.watchdog_interval() is None
        task = asyncio.create_task(watchdog_loop(notifier, interval=0.25, clock=clock))
        await clock.advance(1.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert manager.received() == ["WATCHDOG=1"] * 5  # at 0, 0.25, 0.5, 0.75 and 1


def test_watchdog_interval_is_half_of_watchdog_usec_without_a_pid(socket_path: Path) -> None:
    with Notifier({"NOTIFY_SOCKET": str(socket_path), "WATCHDOG_USEC": "30000000"}) as notifier:
        assert notifier.watchdog_interval() == 15.0


async def test_watchdog_meant_for_another_pid_is_not_ours(manager: ManagerSocket, socket_path: Path) -> None:
    env = {"NOTIFY_SOCKET": str(socket_path), "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    with Notifier(env) as notifier:
        assert notifier.watchdog_interval() is None
        await watchdog_loop(notifier, clock=FakeClock())  # returns at once: nothing to ping
    assert manager.received() == []


@pytest.mark.parametrize("usec", ["0", "-5", "soon"])
def test_an_invalid_watchdog_usec_means_no_watchdog(
    socket_path: Path, usec: str, caplog: pytest.LogCaptureFixture
) -> None:
    with Notifier({"NOTIFY_SOCKET": str(socket_path), "WATCHDOG_USEC": usec}) as notifier:
        assert notifier.watchdog_interval() is None
    assert "WATCHDOG_USEC" in caplog.text


async def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier({"WATCHDOG_USEC": "30000000"})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.status("x")
    assert not notifier.watchdog()
    assert not notifier.stopping()
    assert notifier.watchdog_interval() is None
    await watchdog_loop(notifier, clock=FakeClock())
    await watchdog_loop(notifier, interval=0.01, clock=FakeClock())
    notifier.close()


def test_reads_os_environ_by_default(
    manager: ManagerSocket, socket_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(socket_path))
    with Notifier() as notifier:
        assert notifier.ready()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not Notifier().enabled
    assert manager.received() == ["READY=1"]


@pytest.mark.parametrize("value", ["relative/notify", "@", "vsock:2:1234", "/" + "x" * 107])
def test_an_unusable_notify_socket_stops_start_up(value: str) -> None:
    with pytest.raises(NotifyError, match="NOTIFY_SOCKET"):
        Notifier({"NOTIFY_SOCKET": value})


def test_a_vanished_socket_is_logged_once_per_outage_and_never_raises(
    socket_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="daemon.sdnotify")
    with Notifier({"NOTIFY_SOCKET": str(socket_path)}) as notifier:
        assert not notifier.ready()  # nobody listens yet: ENOENT
        assert not notifier.watchdog()
        assert not notifier.watchdog()
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "ENOENT" in warnings[0].getMessage()
        assert str(socket_path) in warnings[0].getMessage()

        manager = ManagerSocket(str(socket_path))  # systemd is back (daemon-reexec)
        try:
            assert notifier.watchdog()
            assert "answers again" in caplog.records[-1].getMessage()
            assert manager.received() == ["WATCHDOG=1"]
        finally:
            manager.sock.close()
        socket_path.unlink()
        assert not notifier.stopping()
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def test_a_full_socket_queue_drops_the_message_instead_of_blocking(manager: ManagerSocket, socket_path: Path) -> None:
    with Notifier({"NOTIFY_SOCKET": str(socket_path)}) as notifier:
        sent = 0
        while notifier.watchdog():  # nobody reads: the receive queue fills, then EAGAIN
            sent += 1
            assert sent < 100_000, "the notify socket never pushed back"
        assert sent > 0
        assert len(manager.received()) == sent
        assert notifier.ready()
