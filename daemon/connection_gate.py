"""The webhook listener's connections, bounded: at most ``ingest.max_connections`` open at once.

Why: an open connection costs a file descriptor and 5-15 KB of memory (more while its body arrives), and nothing
else bounds them. A sender whose HTTP client opens a connection per request and never closes it leaves each one
open for the keep-alive timeout (75 s): at 100 requests a second, 7,500 connections. Past the process's limit of
open files every accept fails, and so does every new connection of the sinks to their downstream systems and to
Kafka: trouble on the webhook would have stopped the deliveries, and tens of thousands of connections the memory.

A connection is *idle* when aiohttp waits on it for the next request head and holds none not yet handled (its
own test before its keep-alive close: no request is read, queued, handled, answered or lingered over); *busy*
otherwise. At the limit, a new connection

1. takes the place of the connection idle longest, if it has been idle for `MIN_IDLE` at least (no bytes
   received, no request ended on it since): that one is cut off (aborted: its descriptor is free at once, with
   HTTPS too, where a close would wait for the client's). A request is never cut off, parsed or not yet handled,
   pipelined or not; and a client may be sending its next request on a connection idle for less;
2. otherwise is answered ``503 too-many-connections`` with Retry-After to its first request and closed
   (`_Refusal`), or, beyond `refusals_held` such answers under way, cut off at once.

Each is counted (``orderbus_ingest_connections_shed_total{action="closed_idle"|"refused"}``) and logged. What the
gate does not see: connections in their TLS handshake (until it completes; bounded by `TLS_HANDSHAKE`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Final, Protocol, cast

from aiohttp import web
from yarl import URL

from daemon.problems import PROBLEM_TYPE, problem_body
from topics.errors import ConfigError

log = logging.getLogger(__name__)

# How long a connection must have been idle to be closed for a new one.
MIN_IDLE: Final = 2.0
# How long a refused connection has to send its request head, then to read the answer and close.
REFUSAL_WAIT: Final = 5.0
# How long a closed TLS connection may wait for the client's close_notify (uvloop's default is 30 s, during which
# its descriptor stays open).
TLS_SHUTDOWN: Final = 5.0
# How long a TLS handshake may take (asyncio's default is 60 s): a connection in its handshake is not counted by the
# gate yet, so a client that opens connections and sends nothing holds a descriptor each for this long. A shop's
# server shakes hands in milliseconds; a slow link in well under a second.
TLS_HANDSHAKE: Final = 10.0
# A request head longer than this is answered at this point (aiohttp's own limit for a head is 8190 bytes a line).
MAX_HEAD: Final = 16_384
_END_OF_HEAD: Final = b"\r\n\r\n"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Told what became of a connection at the limit: "closed_idle" or "refused" (`ConnectionMetrics.shed`).
Shed = Callable[[str], None]


class Timer(Protocol):
    def cancel(self) -> None: ...


class Scheduler(Protocol):
    """``loop.call_later``, injected so that tests need no sleep."""

    def __call__(self, delay: float, callback: Callable[[], None]) -> Timer: ...


def refusals_held(limit: int) -> int:
    """How many refused connections may be waiting for their 503 at once (beyond them, closed without one)."""
    return max(16, limit // 8)


class ConnectionGate:
    """The bookkeeping of one listener's connections (see the module docstring).

    `protocol_factory` wraps aiohttp's server for ``loop.create_server`` (`GatedSite`); `tracking` wraps each
    route's handler. The connections are aiohttp's `web.RequestHandler`s, in the order of their last activity (the
    first least recently active) with its time; and the refusals under way.
    """

    def __init__(
        self,
        limit: int,
        *,
        retry_after: int,
        shed: Shed | None = None,
        schedule: Scheduler | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1:
            raise ConfigError(f"ingest.max_connections: at least 1, not {limit}")
        self.limit = limit
        self._shed = shed
        self._schedule = schedule
        self._clock = clock
        self._open: dict[web.RequestHandler, float] = {}  # -> its last activity: made, bytes received, a request ended
        self._refusals: set[_Refusal] = set()
        detail = (
            f"this listener holds its limit of {limit} connections, none of them idle for {MIN_IDLE:g} s; "
            f"send it again in {retry_after} s"
        )
        self.refusal = _closing_answer(503, "Service Unavailable", "too-many-connections", detail, retry_after)

    @property
    def open(self) -> int:
        """Connections counted against the limit."""
        return len(self._open)

    @property
    def idle(self) -> int:
        """Of `open`, those aiohttp waits on for a request (counted at each call: a scrape, a status)."""
        return sum(1 for connection in self._open if waits_for_request(connection))

    @property
    def refusing(self) -> int:
        """Refused connections being answered 503 (not counted in `open`)."""
        return len(self._refusals)

    def states(self) -> dict[str, int]:
        """How many connections are busy, idle and being refused now (the metric's and the status's states)."""
        idle = self.idle
        return {"busy": self.open - idle, "idle": idle, "refusing": self.refusing}

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """The protocol factory for ``loop.create_server``: each connection passes the gate first."""
        return lambda: _Gated(server(), self)

    def tracking(self, handler: Handler) -> Handler:
        """`handler`, whose end is its connection's latest activity."""
        touch = self.touch

        async def tracked(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            finally:
                touch(request.protocol)

        return tracked

    def admit(self, connection: web.RequestHandler) -> bool:
        """Count a new connection in, cutting off the one idle longest if the limit is reached and it has been idle
        for `MIN_IDLE`; False to refuse it."""
        now = self._clock()
        if len(self._open) >= self.limit:
            victim = None
            for candidate, since in self._open.items():  # least recently active first
                if now - since < MIN_IDLE:
                    break
                if waits_for_request(candidate):
                    victim = candidate
                    break
            if victim is None:
                log.warning(
                    "webhook connection refused: every connection has a request under way or has just had one",
                    extra={"limit": self.limit},
                )
                self._count("refused")
                return False
            del self._open[victim]
            if victim.transport is not None:
                victim.transport.abort()  # its connection_lost follows
            log.warning(
                "webhook connection limit reached: the connection idle longest cut off for a new one",
                extra={"limit": self.limit},
            )
            self._count("closed_idle")
        self._open[connection] = now
        return True

    def touch(self, connection: web.RequestHandler) -> None:
        """Bytes arrived on `connection`, or a request on it ended: its latest activity (one not counted, lost
        meanwhile or another server's, is left out)."""
        active = self._open
        if active.pop(connection, None) is not None:
            active[connection] = self._clock()

    def lost(self, connection: web.RequestHandler) -> None:
        self._open.pop(connection, None)

    def refuse(self, transport: asyncio.Transport) -> _Refusal | None:
        """Answer `transport` with the 503, or close it at once beyond `refusals_held`."""
        if len(self._refusals) >= refusals_held(self.limit):
            transport.abort()
            return None
        refusal = _Refusal(transport, self)
        self._refusals.add(refusal)
        return refusal

    def refused(self, refusal: _Refusal) -> None:
        self._refusals.discard(refusal)

    def close_refusals(self) -> None:
        """Close the refused connections still being answered (the listener stops: aiohttp does not know them)."""
        for refusal in list(self._refusals):
            refusal.abort()

    def later(self, delay: float, callback: Callable[[], None]) -> Timer:
        if self._schedule is not None:
            return self._schedule(delay, callback)
        return asyncio.get_running_loop().call_later(delay, callback)

    def _count(self, action: str) -> None:
        if self._shed is not None:
            self._shed(action)


class _Gated(asyncio.Protocol):
    """aiohttp's protocol of one connection, behind the gate: admitted, it is served as ever; refused, `_Refusal`
    answers it (or nothing does: cut off at once)."""

    __slots__ = ("_admitted", "_connection", "_gate", "_refusal")

    def __init__(self, connection: web.RequestHandler, gate: ConnectionGate) -> None:
        self._connection = connection
        self._gate = gate
        self._admitted = False
        self._refusal: _Refusal | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._gate.admit(self._connection):
            # A stream transport (uvloop's are not `asyncio.Transport` subclasses).
            self._refusal = self._gate.refuse(cast(asyncio.Transport, transport))
            return
        try:
            self._connection.connection_made(transport)
        except BaseException:
            self._gate.lost(self._connection)
            raise
        self._admitted = True

    def data_received(self, data: bytes) -> None:
        if self._admitted:
            self._gate.touch(self._connection)
            self._connection.data_received(data)
        elif self._refusal is not None:
            self._refusal.data_received(data)

    def eof_received(self) -> bool | None:
        if self._admitted:
            self._connection.eof_received()  # aiohttp's: nothing (the transport closes)
            return None
        return False  # the refused client is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted:
            self._gate.lost(self._connection)
            self._connection.connection_lost(exc)
        elif self._refusal is not None:
            self._refusal.lost()

    def pause_writing(self) -> None:
        if self._admitted:
            self._connection.pause_writing()

    def resume_writing(self) -> None:
        if self._admitted:
            self._connection.resume_writing()


def waits_for_request(connection: web.RequestHandler) -> bool:
    """Whether aiohttp waits on `connection` for the next request head, holding none not yet handled: the test its
    own keep-alive close makes (``RequestHandler._process_keepalive``). Private attributes: read defensively, so
    that an aiohttp without them makes every connection busy (never cut off for room; new ones refused instead);
    a unit test against the installed aiohttp keeps the test true."""
    waiter = getattr(connection, "_waiter", None)
    return waiter is not None and not waiter.done() and not getattr(connection, "_messages", True)


class _Refusal:
    """A connection over the limit: its first request head is answered with the gate's 503, then it is closed.

    The rest of what it sends (the request's body) is read and dropped until the client closes: closed with unread
    bytes, the kernel would reset the connection and the client could lose the answer before reading it. A client
    that sends no whole head, or does not close, is cut off after `REFUSAL_WAIT` (no keep-alive timeout applies)."""

    __slots__ = ("_answer", "_gate", "_head", "_timer", "_transport")

    def __init__(self, transport: asyncio.Transport, gate: ConnectionGate) -> None:
        self._transport = transport
        self._gate = gate
        self._head = bytearray()
        self._answer = gate.refusal  # b"" once written
        self._timer = gate.later(REFUSAL_WAIT, self.abort)

    def data_received(self, data: bytes) -> None:
        if not self._answer:
            return  # answered: the request's body, dropped
        searched = max(0, len(self._head) - len(_END_OF_HEAD) + 1)
        self._head += data
        if self._head.find(_END_OF_HEAD, searched) >= 0 or len(self._head) > MAX_HEAD:
            self._transport.write(self._answer)
            self._answer = b""
            self._head.clear()
            if self._transport.can_write_eof():
                self._transport.write_eof()  # the client reads the answer to its end, then closes

    def abort(self) -> None:
        """Cut the connection off now (no TLS close_notify to wait for)."""
        self._transport.abort()
        self.lost()

    def lost(self) -> None:
        self._timer.cancel()
        self._gate.refused(self)


def _closing_answer(status: int, reason: str, code: str, detail: str, retry_after: int) -> bytes:
    """A whole HTTP/1.1 problem answer that closes its connection, as `daemon.problems.problem` words its body."""
    body = problem_body(status, code, detail)
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        f"Content-Type: {PROBLEM_TYPE}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Retry-After: {retry_after}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class GatedSite(web.BaseSite):
    """`web.TCPSite` whose connections pass a `ConnectionGate` first."""

    __slots__ = ("_gate", "_handshake_timeout", "_host", "_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        gate: ConnectionGate,
        *,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = 128,
        handshake_timeout: float = TLS_HANDSHAKE,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._gate = gate
        self._handshake_timeout = handshake_timeout

    @property
    def name(self) -> str:
        return str(URL.build(scheme="https" if self._ssl_context else "http", host=self._host, port=self._port))

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None  # BaseSite refuses a runner not set up
        self._server = await asyncio.get_running_loop().create_server(
            self._gate.protocol_factory(server),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            ssl_handshake_timeout=self._handshake_timeout if self._ssl_context is not None else None,
            ssl_shutdown_timeout=TLS_SHUTDOWN if self._ssl_context is not None else None,
        )

    async def stop(self) -> None:
        await super().stop()
        self._gate.close_refusals()
