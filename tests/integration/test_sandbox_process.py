"""The sandbox as its own process, over real sockets: start, drive, check the ledger, stop cleanly.

One process serves the module (each test resets it); the tests about starting and stopping start their own.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from daemon.sandbox import SandboxClient, SandboxError, SandboxProcess, start_sandbox_process

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sandbox_process() -> Iterator[SandboxProcess]:
    with start_sandbox_process(seed=11) as process:
        yield process


@pytest.fixture
async def control(sandbox_process: SandboxProcess) -> AsyncIterator[SandboxClient]:
    async with sandbox_process.client() as client:
        await client.reset()
        yield client


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client_session:
        yield client_session


async def test_create_replace_cancel_land_in_the_ledger(
    sandbox_process: SandboxProcess, control: SandboxClient, session: aiohttp.ClientSession
) -> None:
    crm = sandbox_process.system_url("crm")
    headers = {"Idempotency-Key": "evt-1", "X-Event-Id": "evt-1"}
    async with session.post(f"{crm}/orders", json={"order_number": "SO-1"}, headers=headers) as created:
        assert created.status == 201
        order_id = (await created.json())["id"]
    async with session.post(f"{crm}/orders", json={"order_number": "SO-1"}, headers=headers) as again:
        assert (again.status, again.headers["Idempotent-Replayed"]) == (201, "true")
    async with session.put(f"{crm}/orders/{order_id}", json={"order_number": "SO-1", "paid": True}) as replaced:
        assert replaced.status == 200
    async with session.delete(f"{crm}/orders/by-number/SO-1") as cancelled:
        assert cancelled.status == 204

    ledger = await control.wait_ledger("crm", 3, timeout=5)
    assert [(e["method"], e["id"], e["order_number"]) for e in ledger] == [
        ("POST", order_id, "SO-1"),
        ("PUT", order_id, "SO-1"),
        ("DELETE", order_id, "SO-1"),
    ]
    assert ledger[0]["event_id"] == "evt-1"
    stats = (await control.stats())["systems"]["crm"]
    assert (stats["requests"], stats["applied"], stats["duplicate_requests"]) == (4, 3, 1)


async def test_a_retry_after_pause_is_visible_in_the_request_log(
    sandbox_process: SandboxProcess, control: SandboxClient, session: aiohttp.ClientSession
) -> None:
    await control.script("crm", [{"status": 429, "retry_after": 1}])
    url = f"{sandbox_process.system_url('crm')}/orders"
    async with session.post(url, json={"order_number": "SO-2"}, headers={"Idempotency-Key": "k"}) as throttled:
        assert throttled.status == 429
        await asyncio.sleep(int(throttled.headers["Retry-After"]))  # the client under test would honour it so
    async with session.post(url, json={"order_number": "SO-2"}, headers={"Idempotency-Key": "k"}) as created:
        assert created.status == 201
    first, second = await control.requests("crm")
    assert (first["status"], second["status"]) == (429, 201)
    assert second["received_at"] - first["answered_at"] >= 1.0  # type: ignore[operator]


async def test_aiohttp_resends_a_reset_put_by_itself_and_the_key_absorbs_it(
    sandbox_process: SandboxProcess, control: SandboxClient, session: aiohttp.ClientSession
) -> None:
    """A warning for sink authors: aiohttp's ClientSession repeats a GET/PUT/DELETE once, silently, when the
    connection breaks. The lost answer of a PUT thus comes back as the replay of its idempotency key, and the
    sandbox saw two requests where the engine made one attempt. POST is never resent.
    """
    crm = sandbox_process.system_url("crm")
    async with session.post(f"{crm}/orders", json={"order_number": "SO-3"}) as created:
        order_id = (await created.json())["id"]
    await control.script("crm", [{"reset_after_effect": True, "match": {"method": "PUT"}}])
    headers = {"Idempotency-Key": "put-1"}
    async with session.put(f"{crm}/orders/{order_id}", json={"order_number": "SO-3"}, headers=headers) as replaced:
        assert (replaced.status, replaced.headers["Idempotent-Replayed"]) == (200, "true")
    assert [r["outcome"] for r in await control.requests("crm")] == ["answered", "reset", "replayed"]
    assert [e["method"] for e in await control.ledger("crm")] == ["POST", "PUT"]

    await control.script("crm", [{"reset_after_effect": True}])
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.post(f"{crm}/orders", json={"order_number": "SO-4"}):
            pass
    assert [e["order_number"] for e in await control.ledger("crm")] == ["SO-3", "SO-3", "SO-4"]


async def test_a_client_that_gives_up_on_a_held_request_is_counted(
    sandbox_process: SandboxProcess, control: SandboxClient, session: aiohttp.ClientSession
) -> None:
    await control.faults("crm", p_timeout=1.0, timeout_s=30)
    with pytest.raises(TimeoutError):
        async with session.post(
            f"{sandbox_process.system_url('crm')}/orders",
            json={"order_number": "SO-5"},
            timeout=aiohttp.ClientTimeout(total=0.2),
        ):
            pass
    # ASYNC110: the server notices the closed connection on its own schedule and has no event to wait on.
    deadline = time.monotonic() + 5
    while not (stats := await _crm_stats(control))["client_gone"] and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    assert (stats["client_gone"], stats["in_flight"], stats["applied"]) == (1, 0, 0)


async def _crm_stats(control: SandboxClient) -> dict[str, int]:
    stats: dict[str, int] = (await control.stats())["systems"]["crm"]
    return stats


def test_start_up_options_set_faults_auth_and_port() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    faults = {"crm": {"p503": 1.0}}
    with start_sandbox_process(port, faults=faults, auth={"crm": "bearer:t0ken"}, keep_bodies=False) as process:
        assert process.port == port

        async def drive() -> tuple[int, int]:
            async with aiohttp.ClientSession() as session:
                url = f"{process.system_url('crm')}/orders"
                async with session.post(url, json={"order_number": "SO-1"}) as anonymous:
                    pass
                headers = {"Authorization": "Bearer t0ken"}
                async with session.post(url, json={"order_number": "SO-1"}, headers=headers) as authorized:
                    return anonymous.status, authorized.status

        assert asyncio.run(drive()) == (401, 503)


def test_with_stop_on_stdin_eof_it_ends_with_the_process_holding_its_stdin() -> None:
    # `orderbus demo` starts it in a session of its own; killed with -9, the demo left it running, on its port.
    child = subprocess.Popen(
        [sys.executable, "-m", "daemon.sandbox", "--port", "0", "--stop-on-stdin-eof"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        assert child.stdout.readline().startswith(b"http://")  # it serves
        child.stdin.close()  # what the kernel does to a parent's pipes when it dies
        assert child.wait(timeout=20) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()


def test_with_stop_on_stdin_eof_a_stdin_that_cannot_be_watched_counts_as_ended() -> None:
    # /dev/null (or a regular file) cannot be watched by the loop (EPERM): it has nothing more to give
    done = subprocess.run(
        [sys.executable, "-m", "daemon.sandbox", "--port", "0", "--stop-on-stdin-eof"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.startswith(b"http://")


def test_with_stop_on_stdin_eof_a_port_in_use_is_one_line_and_exit_2() -> None:
    # The stdin watcher once was a thread blocked in a read: at the exit after a failed start it held stdin's lock
    # and the interpreter aborted ("could not acquire lock for <stdin> at interpreter shutdown").
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        child = subprocess.Popen(
            [sys.executable, "-m", "daemon.sandbox", "--port", str(port), "--stop-on-stdin-eof"],
            stdin=subprocess.PIPE,  # held open, as the demo holds it
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert child.stdin is not None
        assert child.stderr is not None
        try:
            returncode = child.wait(timeout=30)
            stderr = child.stderr.read().decode()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdin.close()
            child.stderr.close()
    assert returncode == 2
    [line] = stderr.splitlines()
    assert line.startswith(f"sandbox: cannot listen on 127.0.0.1:{port}: ")
    assert line.endswith("address already in use")


def test_sigterm_stops_it_cleanly() -> None:
    process = start_sandbox_process()
    assert process.stop() == 0
    assert not process.log_file.exists()  # a clean stop leaves no log behind


def test_bad_options_exit_2_and_start_up_failures_raise_with_the_log() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "daemon.sandbox", "--port", "0", "--faults", '{"crm": {"p503": 2}}'],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "faults.crm.p503: 2 is out of range" in result.stderr
    with start_sandbox_process() as running, pytest.raises(SandboxError, match="cannot listen"):
        start_sandbox_process(running.port)
