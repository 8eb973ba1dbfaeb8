"""The webhook listener's connections, bounded: at most ``ingest.max_connections`` open at once.

Why: an open connection costs a file descriptor and 5-15 KB of memory (more while its body arrives), and nothing
else bounds them. A sender whose HTTP client opens a connection per request and never closes it leaves each one
open for the keep-alive timeout (75 s): at 100 requests a second, 7,500 connections. Past the process's limit of
open files every accept fails, and so does every new connection of the sinks to their downstream systems and to
Kafka: trouble on the webhook would have stopped the deliveries, and tens of thousands of connections the memory.

At the limit, a new connection

1. takes the place of the connection idle longest, which is closed, as its keep-alive timeout would have closed it
   (idle: no request under way on it, whether it waits for its next one or never sent one), or, when a request is
   under way on every one,
2. is answered ``503 too-many-connections`` with Retry-After to its first request and closed (`_Refusal`): a
   request under way is never cut off to make room.

Each is counted (``orderbus_ingest_connections_shed_total{action="closed_idle"|"refused"}``) and logged. A request
is under way from its handler's start to its end (`ConnectionGate.tracking`, around ``POST /v1/orders``: the
other routes answer within the loop turn that starts them). Connections in their TLS handshake are not counted yet
(the handshake is bounded by its own 60 s timeout).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Final, Protocol, cast

from aiohttp import web
from yarl import URL

from daemon.problems import PROBLEM_TYPE, problem_body
from topics.errors import ConfigError

log = logging.getLogger(__name__)

# How long a connection over the limit has to send its request head, and then to read the answer and close.
REFUSAL_WAIT: Final = 5.0
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


class ConnectionGate:
    """The bookkeeping of one listener's connections (see the module docstring).

    `protocol_factory` wraps aiohttp's server for ``loop.create_server`` (`GatedSite`); `tracking` wraps the handler
    whose requests take time. The connections are aiohttp's `web.RequestHandler`s, in two tables: the idle ones in
    the order they became idle (the first idle longest), and the ones with a request under way.
    """

    def __init__(
        self,
        limit: int,
        *,
        retry_after: int,
        shed: Shed | None = None,
        schedule: Scheduler | None = None,
    ) -> None:
        if limit < 1:
            raise ConfigError(f"ingest.max_connections: at least 1, not {limit}")
        self.limit = limit
        self._shed = shed
        self._schedule = schedule
        self._idle: dict[web.RequestHandler, None] = {}
        self._busy: set[web.RequestHandler] = set()
        detail = (
            f"this listener holds its limit of {limit} connections, each with a request under way; "
            f"send it again in {retry_after} s"
        )
        self.refusal = _closing_answer(503, "Service Unavailable", "too-many-connections", detail, retry_after)

    @property
    def open(self) -> int:
        """Connections open now (refused ones aside)."""
        return len(self._idle) + len(self._busy)

    @property
    def idle(self) -> int:
        """Of `open`, those without a request under way."""
        return len(self._idle)

    @property
    def busy(self) -> int:
        """Of `open`, those with a request under way."""
        return len(self._busy)

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """The protocol factory for ``loop.create_server``: each connection passes the gate first."""
        return lambda: _Gated(server(), self)

    def tracking(self, handler: Handler) -> Handler:
        """`handler`, whose connection counts as busy while it runs (so it is never closed to make room)."""
        idle, busy = self._idle, self._busy

        async def tracked(request: web.Request) -> web.StreamResponse:
            connection = request.protocol
            if connection not in idle:  # not through this gate (a test's own server), or lost meanwhile
                return await handler(request)
            del idle[connection]
            busy.add(connection)
            try:
                return await handler(request)
            finally:
                if connection in busy:  # not lost meanwhile: idle again, the most recently
                    busy.remove(connection)
                    idle[connection] = None

        return tracked

    def admit(self, connection: web.RequestHandler) -> bool:
        """Count a new connection in, closing the one idle longest if the limit is reached; False to refuse it."""
        if len(self._idle) + len(self._busy) >= self.limit:
            if not self._idle:
                log.warning(
                    "webhook connection refused: every connection has a request under way",
                    extra={"limit": self.limit},
                )
                self._count("refused")
                return False
            oldest = next(iter(self._idle))
            del self._idle[oldest]
            oldest.force_close()
            log.warning(
                "webhook connection limit reached: the connection idle longest closed for a new one",
                extra={"limit": self.limit},
            )
            self._count("closed_idle")
        self._idle[connection] = None
        return True

    def lost(self, connection: web.RequestHandler) -> None:
        self._idle.pop(connection, None)
        self._busy.discard(connection)

    def later(self, delay: float, callback: Callable[[], None]) -> Timer:
        if self._schedule is not None:
            return self._schedule(delay, callback)
        return asyncio.get_running_loop().call_later(delay, callback)

    def _count(self, action: str) -> None:
        if self._shed is not None:
            self._shed(action)


class _Gated(asyncio.Protocol):
    """aiohttp's protocol of one connection, behind the gate: admitted, it is served as ever; refused, `_Refusal`
    answers it."""

    __slots__ = ("_connection", "_gate", "_refusal")

    def __init__(self, connection: web.RequestHandler, gate: ConnectionGate) -> None:
        self._connection = connection
        self._gate = gate
        self._refusal: _Refusal | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._gate.admit(self._connection):
            self._connection.connection_made(transport)
        else:  # a stream transport (uvloop's are not `asyncio.Transport` subclasses)
            self._refusal = _Refusal(cast(asyncio.Transport, transport), self._gate)

    def data_received(self, data: bytes) -> None:
        if self._refusal is None:
            self._connection.data_received(data)
        else:
            self._refusal.data_received(data)

    def eof_received(self) -> bool | None:
        if self._refusal is None:
            self._connection.eof_received()  # aiohttp's: nothing (the transport closes)
            return None
        return self._refusal.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refusal is None:
            self._gate.lost(self._connection)
            self._connection.connection_lost(exc)
        else:
            self._refusal.connection_lost()

    def pause_writing(self) -> None:
        if self._refusal is None:
            self._connection.pause_writing()

    def resume_writing(self) -> None:
        if self._refusal is None:
            self._connection.resume_writing()


class _Refusal:
    """A connection over the limit: its first request head is answered with the gate's 503, then it is closed.

    The rest of what it sends (the request's body) is read and dropped until the client closes: closed with unread
    bytes, the kernel would reset the connection and the client could lose the answer before reading it. A client
    that sends no whole head, or does not close, is closed after `REFUSAL_WAIT` (no keep-alive timeout applies)."""

    __slots__ = ("_answer", "_head", "_timer", "_transport")

    def __init__(self, transport: asyncio.Transport, gate: ConnectionGate) -> None:
        self._transport = transport
        self._head = bytearray()
        self._answer = gate.refusal  # b"" once written
        self._timer = gate.later(REFUSAL_WAIT, transport.close)

    def data_received(self, data: bytes) -> None:
        if not self._answer:
            return  # answered: the request's body, dropped
        self._head += data
        if _END_OF_HEAD in self._head or len(self._head) > MAX_HEAD:
            self._transport.write(self._answer)
            self._answer = b""
            self._head.clear()
            if self._transport.can_write_eof():
                self._transport.write_eof()  # the client reads the answer to its end, then closes

    def eof_received(self) -> bool:
        return False  # the client is done: close

    def connection_lost(self) -> None:
        self._timer.cancel()


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

    __slots__ = ("_gate", "_host", "_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        gate: ConnectionGate,
        *,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._gate = gate

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
        )
