"""One attempt against real servers: a system that never answers is a timeout, named, once its deadline passed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from consumers.clock import FakeClock, SystemClock
from consumers.deadlines import Deadlines
from consumers.delivery import Reply, TransportFailure, attempt
from consumers.http_client import HttpClient
from consumers.sink import HttpRequest

TIMEOUT = 0.2
RESOLUTION = 0.05


@pytest.fixture
async def silent_server() -> AsyncIterator[str]:
    """Accepts connections and reads requests, and never answers."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await reader.read()  # until the client gives up and closes
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/crm/orders"
    server.close()
    await server.wait_closed()


async def test_a_system_that_never_answers_is_a_timeout_when_its_deadline_passes(silent_server: str) -> None:
    clock = FakeClock()
    deadlines = Deadlines(clock, resolution=RESOLUTION)
    async with HttpClient(limit=4) as client:
        attempts = [
            asyncio.create_task(
                attempt(
                    client,
                    HttpRequest("POST", silent_server, b"{}", {"Content-Type": "application/json"}),
                    idempotency_key=f"key-{n}",
                    auth_headers={},
                    timeout=TIMEOUT,
                    deadlines=deadlines,
                )
            )
            for n in range(3)
        ]
        await clock.advance(TIMEOUT - 0.01)
        assert not any(task.done() for task in attempts)  # never early
        await clock.advance(0.01 + RESOLUTION)
        outcomes = await asyncio.gather(*attempts)  # at most one sweep late
    for outcome in outcomes:
        assert isinstance(outcome, TransportFailure), outcome
        assert (outcome.kind, outcome.detail) == ("timeout", f"no answer within {TIMEOUT:g} s")
    assert deadlines.open == 0


async def test_an_answer_in_time_is_a_reply(silent_server: str) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 201 Created\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/crm/orders"
    deadlines = Deadlines(SystemClock(), resolution=RESOLUTION)
    try:
        async with HttpClient(limit=1) as client:
            outcome = await attempt(
                client,
                HttpRequest("POST", url, b"{}", {}),
                idempotency_key="key-1",
                auth_headers={},
                timeout=5.0,
                deadlines=deadlines,
            )
    finally:
        server.close()
        await server.wait_closed()
    assert isinstance(outcome, Reply)
    assert (outcome.status, outcome.body) == (201, b"{}")
    assert deadlines.open == 0
