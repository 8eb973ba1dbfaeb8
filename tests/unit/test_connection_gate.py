"""The webhook listener's connection limit: the gate's bookkeeping with fakes, then a real aiohttp server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

import pytest
import uvloop
from aiohttp import web
from support import free_port, until

from daemon.connection_gate import (
    MAX_HEAD,
    MIN_IDLE,
    REFUSAL_WAIT,
    ConnectionGate,
    GatedSite,
    _Gated,
    refusals_held,
    waits_for_request,
)
from topics.errors import ConfigError

# --- fakes ---------------------------------------------------------------------------------------------------


class Waiter:
    def __init__(self, done: bool = False) -> None:
        self._done = done

    def done(self) -> bool:
        return self._done


class FakeConnection:
    """What the gate calls on aiohttp's `web.RequestHandler`, and the state aiohttp keeps of it: `_waiter` pending
    while it waits for a request head, `_messages` the requests parsed and not yet handled."""

    def __init__(self) -> None:
        self.made: list[object] = []
        self.received: list[bytes] = []
        self.lost: list[Exception | None] = []
        self.paused = 0
        self.transport: FakeTransport | None = None
        self._waiter: Waiter | None = Waiter()
        self._messages: deque[object] = deque()

    def handling(self) -> None:
        """A request is being handled (aiohttp waits for no head meanwhile)."""
        self._waiter = None

    def waiting(self) -> None:
        self._waiter = Waiter()

    @property
    def cut_off(self) -> bool:
        return self.transport is not None and self.transport.aborted

    def connection_made(self, transport: FakeTransport) -> None:
        self.made.append(transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received.append(data)

    def eof_received(self) -> None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)

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
        self.aborted = False
        self._eof = eof

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def can_write_eof(self) -> bool:
        return self._eof

    def write_eof(self) -> None:
        self.eof_written = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


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


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gate_of(
    limit: int, shed: list[str] | None = None, timers: Timers | None = None, clock: Clock | None = None
) -> ConnectionGate:
    return ConnectionGate(
        limit,
        retry_after=5,
        shed=(shed.append if shed is not None else None),
        schedule=timers or Timers(),
        clock=clock or Clock(),
    )


def connect(gate: ConnectionGate, *, transport: FakeTransport | None = None) -> tuple[FakeConnection, _Gated]:
    fake = FakeConnection()
    gated = _Gated(handler(fake), gate)
    gated.connection_made(transport or FakeTransport())
    return fake, gated


async def run_request(gate: ConnectionGate, gated: _Gated, connection: FakeConnection, until: asyncio.Event) -> None:
    """A request on the connection: its bytes arrive, its handler runs until `until`, then aiohttp waits again."""

    async def slow(_: web.Request) -> web.StreamResponse:
        await until.wait()
        return web.Response()

    gated.data_received(b"POST / HTTP/1.1\r\n\r\n")
    connection.handling()
    try:
        await gate.tracking(slow)(cast(web.Request, Request(connection)))
    finally:
        connection.waiting()


def done() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


# --- the bookkeeping -------------------------------------------------------------------------------------------


def test_a_limit_below_one_is_refused_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"ingest\.max_connections: at least 1, not 0"):
        ConnectionGate(0, retry_after=5)


def test_connections_under_the_limit_are_served_as_aiohttp_would() -> None:
    shed: list[str] = []
    gate = gate_of(3, shed)
    transport = FakeTransport()
    fake, gated = connect(gate, transport=transport)
    assert (gate.open, gate.idle) == (1, 1)
    gated.data_received(b"GET / HTTP/1.1\r\n\r\n")
    fake.handling()
    assert (gate.open, gate.idle) == (1, 0)
    assert gate.states() == {"busy": 1, "idle": 0, "refusing": 0}
    gated.pause_writing()
    assert fake.made == [transport]
    assert fake.received == [b"GET / HTTP/1.1\r\n\r\n"]
    assert fake.paused == 1
    gated.connection_lost(None)
    assert fake.lost == [None]
    assert gate.open == 0
    assert shed == []


async def test_at_the_limit_the_connection_idle_longest_is_cut_off_once_idle_long_enough() -> None:
    shed: list[str] = []
    clock = Clock()
    gate = gate_of(3, shed, clock=clock)
    (first, first_gated), (second, _), (third, _) = (connect(gate) for _ in range(3))
    clock.now += MIN_IDLE
    await run_request(gate, first_gated, first, done())  # used again: the second is now idle longest
    fourth, _ = connect(gate)
    assert second.cut_off  # aborted: its descriptor is free at once, with TLS too
    assert not first.cut_off
    assert not third.cut_off
    assert fourth.made
    assert gate.open == 3
    assert shed == ["closed_idle"]


def test_a_connection_idle_for_less_than_the_minimum_is_not_cut_off_for_room() -> None:
    """It may be sending its next request right now (in the kernel's buffer, not read yet): the new one is refused."""
    shed: list[str] = []
    clock = Clock()
    gate = gate_of(1, shed, clock=clock)
    first, first_gated = connect(gate)
    clock.now += MIN_IDLE
    first_gated.data_received(b"GE")  # a head begun: activity; aiohttp still waits for the rest of it
    clock.now += MIN_IDLE - 0.1
    _, refused = connect(gate)
    assert not first.cut_off
    assert shed == ["refused"]
    assert gate.refusing == 1
    refused.connection_lost(None)
    assert gate.refusing == 0
    clock.now += 0.1  # a head left unfinished for as long: cut off like any idle connection
    third, _ = connect(gate)
    assert first.cut_off
    assert third.made


@pytest.mark.parametrize("state", ["parsed, not yet handled", "handled", "pipelined behind one handled"])
def test_a_request_is_never_cut_off_whatever_its_stage(state: str) -> None:
    """Regression (reviews): a parsed request waiting for its handler, and a pipelined one whose handler ran after
    the first one's ended, counted as idle and were cut off for new connections; aiohttp ran their handlers all the
    same (the orders published) and the answers went nowhere. aiohttp's own state decides now."""
    shed: list[str] = []
    clock = Clock()
    gate = gate_of(1, shed, clock=clock)
    first, _ = connect(gate)
    if state == "parsed, not yet handled":
        first._messages.append(object())
    elif state == "handled":
        first.handling()
    else:
        first.handling()
        first._messages.append(object())
    clock.now += 600
    connect(gate)
    assert not first.cut_off
    assert shed == ["refused"]


def test_a_connection_aiohttp_does_not_describe_is_never_cut_off() -> None:
    """An aiohttp without the attributes `waits_for_request` reads: every connection busy, new ones refused."""
    assert waits_for_request(cast(web.RequestHandler, object())) is False


async def test_a_connection_with_a_request_under_way_is_never_closed_for_room() -> None:
    timers = Timers()
    shed: list[str] = []
    clock = Clock()
    gate = gate_of(2, shed, timers, clock)
    first, first_gated = connect(gate)
    second, second_gated = connect(gate)
    release = asyncio.Event()
    busy = [
        asyncio.create_task(run_request(gate, gated, connection, release))
        for gated, connection in ((first_gated, first), (second_gated, second))
    ]
    await asyncio.sleep(0)  # both handlers have started: no sleep of time, one turn of the loop
    clock.now += 60
    transport = FakeTransport()
    third, gated = connect(gate, transport=transport)
    assert not first.cut_off
    assert not second.cut_off
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
    assert gate.refusing == 0
    # The requests end: their connections are idle again, and, once idle long enough, one makes room.
    release.set()
    await asyncio.gather(*busy)
    clock.now += MIN_IDLE
    fourth, _ = connect(gate)
    assert fourth.made
    assert first.cut_off
    assert not second.cut_off
    assert shed == ["refused", "closed_idle"]


async def all_busy(gate: ConnectionGate, count: int, release: asyncio.Event) -> list[asyncio.Task[None]]:
    """`count` connections, each with a request under way until `release`."""
    tasks = []
    for _ in range(count):
        fake, gated = connect(gate)
        tasks.append(asyncio.create_task(run_request(gate, gated, fake, release)))
    await asyncio.sleep(0)  # the handlers have started
    return tasks


async def test_a_refused_connection_that_sends_no_head_is_cut_off_after_the_wait() -> None:
    timers = Timers()
    shed: list[str] = []
    gate = gate_of(1, shed, timers)
    busy = await all_busy(gate, 1, release := asyncio.Event())
    transport = FakeTransport()
    connect(gate, transport=transport)
    [(delay, cut, _)] = timers.due
    assert delay == REFUSAL_WAIT
    cut()
    assert transport.aborted  # no TLS close_notify to wait for: the descriptor is free at once
    assert transport.written == b""
    assert gate.refusing == 0
    assert shed == ["refused"]
    release.set()
    await asyncio.gather(*busy)


async def test_beyond_the_refusals_held_a_connection_is_cut_off_at_once_and_a_stop_cuts_the_rest() -> None:
    shed: list[str] = []
    gate = gate_of(1, shed)
    busy = await all_busy(gate, 1, release := asyncio.Event())
    held = [FakeTransport() for _ in range(refusals_held(1))]
    for transport in held:
        connect(gate, transport=transport)
    assert gate.refusing == refusals_held(1) == 16
    assert gate.states() == {"busy": 1, "idle": 0, "refusing": 16}
    beyond = FakeTransport()
    fake, gated = connect(gate, transport=beyond)
    assert beyond.aborted
    assert beyond.written == b""
    gated.data_received(b"GET / HTTP/1.1\r\n\r\n")  # nothing reaches aiohttp, nor is answered
    gated.connection_lost(None)
    assert fake.received == []
    assert fake.lost == []
    assert shed == ["refused"] * 17
    assert not any(transport.aborted for transport in held)
    gate.close_refusals()  # the listener stops
    assert all(transport.aborted for transport in held)
    assert gate.refusing == 0
    release.set()
    await asyncio.gather(*busy)


async def test_an_endless_head_is_answered_at_its_limit_and_a_tls_refusal_waits_for_the_client() -> None:
    gate = gate_of(1, [])
    busy = await all_busy(gate, 1, release := asyncio.Event())
    transport = FakeTransport(eof=False)  # TLS: no half-close
    _, gated = connect(gate, transport=transport)
    gated.data_received(b"X" * MAX_HEAD)
    assert transport.written == b""
    gated.data_received(b"X")
    assert transport.written.startswith(b"HTTP/1.1 503 ")
    assert not transport.eof_written
    assert not transport.closed  # the client closes, or the wait ends (the test above)
    release.set()
    await asyncio.gather(*busy)


async def test_a_connection_lost_during_its_request_is_forgotten() -> None:
    gate = gate_of(2, [])
    fake, gated = connect(gate)
    release = asyncio.Event()
    task = asyncio.create_task(run_request(gate, gated, fake, release))
    await asyncio.sleep(0)
    gated.connection_lost(ConnectionResetError())
    release.set()
    await task
    assert gate.open == 0


def test_a_connection_aiohttp_could_not_take_is_not_counted() -> None:
    class Broken(FakeConnection):
        def connection_made(self, transport: FakeTransport) -> None:
            raise OSError("setsockopt")

    gate = gate_of(2, [])
    with pytest.raises(OSError, match="setsockopt"):
        _Gated(handler(Broken()), gate).connection_made(FakeTransport())
    assert gate.open == 0


async def test_a_request_not_through_the_gate_is_served_untracked() -> None:
    gate = gate_of(2, [])
    fake = FakeConnection()

    async def quick(_: web.Request) -> web.StreamResponse:
        return web.Response()

    await gate.tracking(quick)(cast(web.Request, Request(fake)))
    assert gate.open == 0


# --- a real aiohttp server -----------------------------------------------------------------------------------


class Later:
    """The real monotonic clock, moved on by hand (so that connections need not really stay idle `MIN_IDLE`)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


@contextlib.asynccontextmanager
async def served(limit: int = 4) -> AsyncIterator[tuple[int, ConnectionGate, asyncio.Event, list[str], Later]]:
    """A real listener whose POST reads its body, then waits for the event; what its handlers ran is `ran`."""
    shed: list[str] = []
    clock = Later()
    gate = ConnectionGate(limit, retry_after=2, shed=shed.append, clock=clock)
    release = asyncio.Event()

    async def post(request: web.Request) -> web.Response:
        await request.read()
        RAN.append(request.path)
        await release.wait()
        return web.Response(status=202, text="ok")

    async def get(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/", gate.tracking(post))
    app.router.add_get("/", gate.tracking(get))
    runner = web.AppRunner(app, access_log=None, handler_cancellation=False)
    await runner.setup()
    port = free_port()
    site = GatedSite(runner, "127.0.0.1", port, gate)
    await site.start()
    assert site.name == f"http://127.0.0.1:{port}"
    RAN.clear()
    try:
        yield port, gate, release, shed, clock
    finally:
        release.set()
        await runner.cleanup()


RAN: list[str] = []
POST = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"


async def open_connection(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def a_real_listener_closes_the_idle_longest_then_refuses_when_all_are_busy() -> None:
    async with served() as (port, gate, release, shed, clock):
        # Four idle connections, idle long enough, then a fifth: the first is closed (EOF), the fifth is served.
        idle = [await open_connection(port) for _ in range(4)]
        await until(lambda: gate.open == 4, timeout=5, every=0.01)
        clock.offset += MIN_IDLE
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
            w.write(POST)
        await until(lambda: gate.idle == 0 and len(RAN) == 4, timeout=5, every=0.01)
        clock.offset += MIN_IDLE
        refused_reader, refused_writer = await open_connection(port)
        refused_writer.write(POST)
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
        await until(lambda: gate.open == 0 and gate.refusing == 0, timeout=5, every=0.01)


async def a_burst_of_posts_gets_an_answer_each_and_only_the_answered_ones_run() -> None:
    """Regression (review): in a burst of new connections, each sending its request at once, the connections
    admitted first were closed for later ones, with their requests parsed: their handlers ran (orders published)
    and their senders got no answer. Each sender gets 202 or 503 now, and a handler runs for each 202 only."""
    async with served() as (port, gate, release, shed, clock):
        release.set()
        idle = [await open_connection(port) for _ in range(4)]  # idle long enough: room for the burst's first
        await until(lambda: gate.open == 4, timeout=5, every=0.01)
        clock.offset += MIN_IDLE

        async def post() -> bytes:
            reader, writer = await open_connection(port)
            try:
                writer.write(POST)
                return await asyncio.wait_for(reader.readline(), 10)
            finally:
                writer.close()

        # As many as can be admitted or answered 503 (beyond, refused connections are cut off without an answer).
        answers = await asyncio.gather(*(post() for _ in range(gate.limit + refusals_held(gate.limit))))
        statuses = sorted(answer[9:12] for answer in answers)
        assert set(statuses) <= {b"202", b"503"}, statuses  # never a connection closed without an answer
        assert statuses.count(b"202") == len(RAN) >= 4
        assert shed.count("closed_idle") == 4
        assert shed.count("refused") == statuses.count(b"503")
        for _, w in idle:
            w.close()
        await until(lambda: gate.open == 0 and gate.refusing == 0, timeout=5, every=0.01)


async def pipelined_requests_are_answered_each_and_never_cut_off() -> None:
    """Regression (review): the second of two pipelined requests ran while the gate took its connection for idle
    (the first one's handler had ended), and a new connection cut it off: published, never answered."""
    async with served(limit=1) as (port, gate, release, shed, clock):
        reader, writer = await open_connection(port)
        writer.write(POST + POST)
        await until(lambda: len(RAN) == 1, timeout=5, every=0.01)
        release.set()  # the first is answered; the second's handler runs, then waits again
        release.clear()
        await until(lambda: len(RAN) == 2, timeout=5, every=0.01)
        clock.offset += 60
        refused_reader, refused_writer = await open_connection(port)
        refused_writer.write(POST)
        assert (await asyncio.wait_for(refused_reader.readline(), 5)).startswith(b"HTTP/1.1 503")
        release.set()
        first = await asyncio.wait_for(reader.readuntil(b"ok"), 5)
        second = await asyncio.wait_for(reader.readuntil(b"ok"), 5)
        assert first.startswith(b"HTTP/1.1 202")
        assert second.startswith(b"HTTP/1.1 202")
        assert shed == ["refused"]
        for w in (writer, refused_writer):
            w.close()
            await w.wait_closed()
        await until(lambda: gate.open == 0 and gate.refusing == 0, timeout=5, every=0.01)


@pytest.mark.parametrize(
    "scenario",
    [
        a_real_listener_closes_the_idle_longest_then_refuses_when_all_are_busy,
        a_burst_of_posts_gets_an_answer_each_and_only_the_answered_ones_run,
    ],
)
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_real_listener(scenario: Callable[[], Awaitable[None]], loop: str) -> None:
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(scenario(), 30))
