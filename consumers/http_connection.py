"""One kept-alive HTTP/1.1 connection of `consumers.http_client`: an `asyncio.Protocol` that writes a request and
feeds its answer to httptools, settling the request's one future with an `HttpAnswer`.

What it reads of an answer: the status, Retry-After, Content-Type, Location, and at most `max_body` bytes of body
(up to `DISCARD_LIMIT` more are read and dropped to keep the connection; beyond that it closes). It tells its
`Pool` when it can no longer be reused and when it is gone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from ssl import SSLContext
from typing import Final, Protocol, cast

import httptools

from topics.errors import HttpClientError, HttpConnectionError, HttpProtocolError

MAX_HEAD: Final = 64 * 1024  # bytes of an answer before its headers end
DISCARD_LIMIT: Final = 1024 * 1024  # body bytes past max_body read and dropped to keep the connection; more: closed


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """What a delivery reads of an answer: its status, Retry-After as sent, and at most `max_body` bytes of body;
    its Content-Type (an HTML page is no API's answer) and Location (a create's id, when the body has none)."""

    status: int
    retry_after: str | None
    body: bytes
    content_type: str | None = None
    location: str | None = None


class _Stop(Exception):
    """Raised from a parser callback to stop parsing: the answer is settled (or failed) and the connection is being
    closed."""


class Pool(Protocol):
    """What a connection tells the client that pools it."""

    def unpool(self, conn: Connection) -> None:
        """`conn` can no longer be reused (the peer closed it, or we did): it leaves the idle pool if it is there."""
        ...

    def untrack(self, conn: Connection) -> None:
        """`conn` is closed for good."""
        ...


class Origin:
    """One (scheme, host, port): where to connect, the head lines every request to it carries, its idle connections."""

    __slots__ = ("host", "idle", "lines", "name", "port", "ssl")

    def __init__(self, name: str, host: str, port: int, ssl: SSLContext | None, lines: str) -> None:
        self.name = name  # scheme://authority, for messages
        self.host = host
        self.port = port
        self.ssl = ssl
        self.lines = lines  # "Host: ...\r\nUser-Agent: ...\r\n"
        self.idle: deque[Connection] = deque()  # the oldest on the left; taken from the right


class Connection(asyncio.Protocol):
    """One connection: writes a request, feeds the answer to httptools (which calls the ``on_*`` methods), and
    settles the request's one future. `reusable` is True only between a whole kept-alive answer and the next request.
    """

    __slots__ = (
        "alive", "answer", "body_size", "chunks", "client", "content_type", "framed", "headers_done", "idle_since",
        "in_pool", "keep_alive", "location", "loop", "max_body", "origin", "parser", "received", "retry_after",
        "reusable", "status", "transport", "uses",
    )  # fmt: skip

    transport: asyncio.Transport
    retry_after: str | None
    content_type: str | None
    location: str | None
    chunks: list[bytes]

    def __init__(self, origin: Origin, loop: asyncio.AbstractEventLoop, client: Pool) -> None:
        self.origin = origin
        self.loop = loop
        self.client = client
        self.parser = httptools.HttpResponseParser(self)
        self.answer: asyncio.Future[HttpAnswer] | None = None  # the waiting request's
        self.alive = True  # until the peer closes, or we do
        self.reusable = False
        self.in_pool = False
        self.idle_since = 0.0
        self.uses = 0
        self.received = 0  # bytes of the current request's answer so far
        self.max_body = 0
        self.chunks = []  # the current answer's body, at most max_body bytes
        self._begin()

    def _begin(self) -> None:
        self.status = 0
        self.retry_after = self.content_type = self.location = None
        self.chunks.clear()
        self.body_size = 0
        self.framed = False  # Content-Length or chunked; else the body ends when the server closes
        self.headers_done = False
        self.keep_alive = False

    def exchange(self, data: bytes, max_body: int) -> asyncio.Future[HttpAnswer]:
        self.uses += 1
        self.reusable = False
        self.received = 0
        self._begin()  # else, until a byte of this answer arrives, `_ended` would read the last answer's state
        self.max_body = max_body
        self.answer = answer = self.loop.create_future()
        self.transport.write(data)
        return answer

    def abort(self, error: HttpClientError | None = None) -> None:
        """Close now. A request still waiting fails with `error` (by default: closed by this client)."""
        answer, self.answer = self.answer, None
        self.reusable = False
        if answer is not None and not answer.done():
            answer.set_exception(error or HttpConnectionError(f"{self.origin.name}: connection closed by this client"))
        self.transport.abort()

    # ---- asyncio.Protocol ---------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.abort(HttpProtocolError(f"{self.origin.name}: not an HTTP/1.1 answer ({exc})"))
            return
        except httptools.HttpParserUpgrade:
            self.abort(HttpProtocolError(f"{self.origin.name}: switched protocols unasked"))
            return
        if not self.headers_done and self.received > MAX_HEAD:
            self.abort(HttpProtocolError(f"{self.origin.name}: answer head longer than {MAX_HEAD} bytes"))

    def eof_received(self) -> bool:
        self._ended(None)
        return False  # close our side as well

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(exc)
        self.client.untrack(self)

    def _ended(self, exc: Exception | None) -> None:
        if self.alive:
            self.alive = False
            self.client.unpool(self)
        self.reusable = False
        answer = self.answer
        if answer is None:
            return
        if exc is None and self.headers_done and not self.framed and self.status >= 200:
            self._settle(keep_alive=False)  # a body delimited by the server closing, now whole
            return
        self.answer = None
        if not answer.done():
            cause = f"reset ({exc!r})" if exc is not None else "closed by the server"
            when = "after part of the answer" if self.received else "before any answer"
            answer.set_exception(HttpConnectionError(f"{self.origin.name}: connection {cause} {when}"))

    # ---- httptools callbacks ------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.answer is None:
            raise _Stop("bytes that answer no request")  # data_received closes the connection
        self._begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name)  # compare lengths first: most headers are none of these
        if size == 11:
            if self.retry_after is None and name.lower() == b"retry-after":
                self.retry_after = value.strip().decode("latin-1")
        elif size == 12:
            if self.content_type is None and name.lower() == b"content-type":
                self.content_type = value.strip().decode("latin-1")
        elif size == 8:
            if self.location is None and name.lower() == b"location":
                self.location = value.strip().decode("latin-1")
        elif size == 14:
            if name.lower() == b"content-length":
                self.framed = True
        elif size == 17 and name.lower() == b"transfer-encoding":
            self.framed = value.rstrip().lower().endswith(b"chunked")

    def on_headers_complete(self) -> None:
        self.status = status = self.parser.get_status_code()
        # llhttp takes any three digits. Below 100 it would wait, as for a 1xx, for an answer; from 600 up there is
        # no class to decide by (RFC 9110: 100-599), and the metrics' `http_responses` class had no "6xx": a 600
        # from a downstream ended the whole daemon.
        if not 100 <= status <= 599:
            self.abort(HttpProtocolError(f"{self.origin.name}: status {status:03d} is not an HTTP status"))
            raise _Stop("status outside 100-599")
        self.headers_done = True
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        room = self.max_body - self.body_size
        if room > 0:
            self.chunks.append(body if len(body) <= room else body[:room])
        self.body_size += len(body)
        if self.body_size > self.max_body + DISCARD_LIMIT:
            self._settle(keep_alive=False)  # too much to read and drop: answer with what we kept, and close
            raise _Stop("body over the discard limit")

    def on_message_complete(self) -> None:
        if self.status >= 200:  # 1xx (100 Continue, 103 Early Hints): the final answer follows
            self._settle(self.keep_alive)

    def _settle(self, keep_alive: bool) -> None:
        answer, self.answer = self.answer, None
        self.reusable = keep_alive and self.alive
        if answer is not None and not answer.done():
            chunks = self.chunks
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()  # an idle connection holds no body
            answer.set_result(HttpAnswer(self.status, self.retry_after, body, self.content_type, self.location))


__all__ = ["DISCARD_LIMIT", "MAX_HEAD", "Connection", "HttpAnswer", "Origin", "Pool"]
