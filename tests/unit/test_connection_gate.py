"""The webhook listener's connection limit: the gate's bookkeeping with fakes, then a real aiohttp server."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import cast

import pytest
import uvloop
from aiohttp import web
from support import free_port, until

from daemon.connection_gate import MAX_HEAD, REFUSAL_WAIT, ConnectionGate, GatedSite, _Gated
from topics.errors import ConfigError

# --- fakes ---------------------------------------------------------------------------------------------------


class FakeConnection:
    """What the gate calls on aiohttp's `web.RequestHandler`."""

    def __init__(self) -> None:
        self.made: list[object] = []
        self.received: list[bytes] = []
        self.lost: list[Exception | None] = []
        self.force_closed = False
        self.paused = 0

    def connection_made(self, transport: object) -> None:
        self.made.append(transport)

    def data_received(self, data: bytes) -> None:
        self.received.append(data)

    def eof_received(self) -> None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)

    def force_close(self) -> None:
        self.force_closed = True

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.paused -= 1


class FakeTransport(asyncio.Transport):
    def __init__(self, *, eof: bool = True) -> None:
        super().__init__()
        self.written = bytearray()
        self.eof_written = False
        self.closed = False
        self._eof = eof

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def can_write_eof(self) -> bool:
        return self._eof

    def write_eof(self) -> None:
        self.eof_written = True

    def close(self) -> None:
        self.closed = True


class Timer:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Timers:
    """An injected ``call_later``: what was scheduled, run by hand."""

    def __init__(self) -> None:
        self.due: list[tuple[float, Callable[[], None], Timer]] = []

    def __call__(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer()
        self.due.append((delay, callback, timer))
        return timer


def handler(fake: FakeConnection) -> web.RequestHandler:
    return cast(web.RequestHandler, fake)


class Request:
    def __init__(self, protocol: FakeConnection) -> None:
        self.protocol = protocol


def gate_of(limit: int, shed: list[str] | None = None, timers: Timers | None = None) -> ConnectionGate:
    return ConnectionGate(
        limit, retry_after=5, shed=(shed.append if shed is not None else None), schedule=timers or Timers()
    )


def connect(gate: ConnectionGate, *, transport: FakeTransport | None = None) -> tuple[FakeConnection, _Gated]:
    fake = FakeConnection()
    gated = _Gated(handler(fake), gate)
    gated.connection_made(transport or FakeTransport())
    return fake, gated


async def run_request(gate: ConnectionGate, connection: FakeConnection, until: asyncio.Event) -> None:
    async def slow(_: web.Request) -> web.StreamResponse:
        await until.wait()
        return web.Response()

    await gate.tracking(slow)(cast(web.Request, Request(connection)))


# --- the bookkeeping -------------------------------------------------------------------------------------------


def test_a_limit_below_one_is_refused_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"ingest\.max_connections: at least 1, not 0"):
        ConnectionGate(0, retry_after=5)


def test_connections_under_the_limit_are_served_as_aiohttp_would() -> None:
    shed: list[str] = []
    gate = gate_of(3, shed)
    transport = FakeTransport()
    fake, gated = connect(gate, transport=transport)
    gated.data_received(b"GET / HTTP/1.1\r\n\r\n")
    gated.pause_writing()
    assert fake.made == [transport]
    assert fake.received == [b"GET / HTTP/1.1\r\n\r\n"]
    assert fake.paused == 1
    assert gate.open == 1
    gated.connection_lost(None)
    assert fake.lost == [None]
    assert gate.open == 0
    assert shed == []


async def test_at_the_limit_the_connection_idle_longest_makes_room() -> None:
    shed: list[str] = []
    gate = gate_of(3, shed)
    first, second, third = (connect(gate)[0] for _ in range(3))
    done = asyncio.Event()
    done.set()
    await run_request(gate, first, done)  # used again: the second is now idle longest
    fourth, _ = connect(gate)
    assert second.force_closed
    assert not first.force_closed
    assert not third.force_closed
    assert fourth.made
    assert gate.open == 3
    assert shed == ["closed_idle"]


async def test_a_connection_with_a_request_under_way_is_never_closed_for_room() -> None:
    timers = Timers()
    shed: list[str] = []
    gate = gate_of(2, shed, timers)
    first, _ = connect(gate)
    second, _ = connect(gate)
    release = asyncio.Event()
    busy = [asyncio.create_task(run_request(gate, connection, release)) for connection in (first, second)]
    await asyncio.sleep(0)  # both handlers have started: no sleep of time, one turn of the loop
    transport = FakeTransport()
    third, gated = connect(gate, transport=transport)
    assert not first.force_closed
    assert not second.force_closed
    assert third.made == []  # refused: aiohttp never sees it
    assert shed == ["refused"]
    gated.data_received(b"POST /v1/orders HTTP/1.1\r\nHost: x\r\n")
    assert transport.written == b""  # not a whole head yet
    gated.data_received(b"Content-Length: 5\r\n\r\nhel")
    head, body = bytes(transport.written).split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Retry-After: 5\r\n" in head
    assert b"Connection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head
    problem = json.loads(body)
    assert problem["type"].endswith("/too-many-connections")
    assert problem["status"] == 503
    assert "limit of 2 connections" in problem["detail"]
    assert transport.eof_written
    assert not transport.closed
    gated.data_received(b"lo")  # the rest of the body: read and dropped
    assert bytes(transport.written).count(b"HTTP/1.1") == 1
    assert gated.eof_received() is False  # the client closed its side: the transport closes
    gated.connection_lost(None)
    assert timers.due[0][2].cancelled
    # The requests end: their connections are idle again, and a new one takes the place of the first to finish.
    release.set()
    await asyncio.gather(*busy)
    fourth, _ = connect(gate)
    assert fourth.made
    assert first.force_closed
    assert not second.force_closed
    assert shed == ["refused", "closed_idle"]


async def all_busy(gate: ConnectionGate, count: int, release: asyncio.Event) -> list[asyncio.Task[None]]:
    """`count` connections, each with a request under way until `release`."""
    tasks = [asyncio.create_task(run_request(gate, connect(gate)[0], release)) for _ in range(count)]
    await asyncio.sleep(0)  # the handlers have started
    return tasks


async def test_a_refused_connection_that_sends_no_head_is_closed_after_the_wait() -> None:
    timers = Timers()
    shed: list[str] = []
    gate = gate_of(1, shed, timers)
    busy = await all_busy(gate, 1, release := asyncio.Event())
    transport = FakeTransport()
    connect(gate, transport=transport)
    [(delay, close, _)] = timers.due
    assert delay == REFUSAL_WAIT
    close()
    assert transport.closed
    assert transport.written == b""
    assert shed == ["refused"]
    release.set()
    await asyncio.gather(*busy)


async def test_an_endless_head_is_answered_at_its_limit_and_tls_closes_after_the_answer() -> None:
    gate = gate_of(1, [])
    busy = await all_busy(gate, 1, release := asyncio.Event())
    transport = FakeTransport(eof=False)  # TLS: no half-close
    _, gated = connect(gate, transport=transport)
    gated.data_received(b"X" * MAX_HEAD)
    assert transport.written == b""
    gated.data_received(b"X")
    assert transport.written.startswith(b"HTTP/1.1 503 ")
    assert not transport.eof_written
    release.set()
    await asyncio.gather(*busy)


async def test_a_connection_lost_during_its_request_is_forgotten() -> None:
    gate = gate_of(2, [])
    fake, gated = connect(gate)
    release = asyncio.Event()
    task = asyncio.create_task(run_request(gate, fake, release))
    await asyncio.sleep(0)
    gated.connection_lost(ConnectionResetError())
    release.set()
    await task
    assert gate.open == 0


async def test_a_request_not_through_the_gate_is_served_untracked() -> None:
    gate = gate_of(2, [])
    done = asyncio.Event()
    done.set()
    await run_request(gate, FakeConnection(), done)
    assert gate.open == 0


# --- a real aiohttp server -----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def served() -> AsyncIterator[tuple[int, ConnectionGate, asyncio.Event, list[str]]]:
    """A real listener (limit 4) whose POST waits for the event."""
    shed: list[str] = []
    gate = ConnectionGate(4, retry_after=2, shed=shed.append)
    release = asyncio.Event()

    async def post(request: web.Request) -> web.Response:
        await request.read()
        await release.wait()
        return web.Response(status=202, text="ok")

    async def get(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/", gate.tracking(post))
    app.router.add_get("/", get)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    site = GatedSite(runner, "127.0.0.1", port, gate)
    await site.start()
    assert site.name == f"http://127.0.0.1:{port}"
    try:
        yield port, gate, release, shed
    finally:
        release.set()
        await runner.cleanup()


async def open_connection(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def a_real_listener_closes_the_idle_longest_then_refuses_when_all_are_busy() -> None:
    async with served() as (port, gate, release, shed):
        # Four idle connections, then a fifth: the first is closed (EOF), the fifth is served.
        idle = [await open_connection(port) for _ in range(4)]
        await until(lambda: gate.open == 4)
        reader, writer = await open_connection(port)
        assert await asyncio.wait_for(idle[0][0].read(), 5) == b""
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        assert await reader.readexactly(2) == b"ok"
        assert shed == ["closed_idle"]
        # A request under way on every connection (the idle ones post too): the next connection is refused.
        busy = [*idle[1:], (reader, writer)]
        for _, w in busy:
            w.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        await until(lambda: gate.open == 4 and shed == ["closed_idle"] and not gate.idle)
        refused_reader, refused_writer = await open_connection(port)
        refused_writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        answer = await asyncio.wait_for(refused_reader.read(), 5)  # to the end: the server closes
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert b"Retry-After: 2\r\n" in answer
        assert b"too-many-connections" in answer
        assert shed == ["closed_idle", "refused"]
        assert gate.open == 4
        # The requests under way were not touched: they are answered once released.
        release.set()
        for r, _ in busy:
            assert (await asyncio.wait_for(r.readline(), 5)).startswith(b"HTTP/1.1 202")
        for _, w in [idle[0], *busy, (refused_reader, refused_writer)]:
            w.close()
            await w.wait_closed()
        await until(lambda: gate.open == 0)


async def test_a_real_listener_closes_the_idle_longest_then_refuses_when_all_are_busy() -> None:
    await a_real_listener_closes_the_idle_longest_then_refuses_when_all_are_busy()


def test_the_same_under_uvloop_as_the_daemon_runs() -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(a_real_listener_closes_the_idle_longest_then_refuses_when_all_are_busy())
