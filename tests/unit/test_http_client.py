"""consumers.http_client against real servers on loopback.

aiohttp's test server stands for a well-behaved downstream; raw asyncio servers (`RawServer`) write answers byte for
byte, misbehave on purpose (resets, garbage, early closes) and count the connections they accept. Nothing sleeps:
tests wait on the servers' state changes (`RawServer.until`), bounded so that a bug fails fast instead of hanging.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from support import free_port

from consumers.clock import SystemClock
from consumers.deadlines import Deadlines
from consumers.delivery import TransportFailure, attempt
from consumers.http_client import DISCARD_LIMIT, MAX_HEAD, HttpAnswer, HttpClient
from consumers.sink import HttpRequest
from topics.errors import HttpConnectionError, HttpProtocolError, InvalidRequestError

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
JSON = {"Content-Type": "application/json"}


class Peer:
    """One connection a `RawServer` accepted (`number` counts from 1): reads requests, writes whatever it is told."""

    def __init__(
        self, server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int
    ) -> None:
        self.server, self.reader, self.writer, self.number = server, reader, writer, number

    async def read(self) -> bytes | None:
        """The next request, head and body, or None once the client closed the connection."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        request = head + (await self.reader.readexactly(int(length[1])) if length else b"")
        self.server.requests.append(request)
        self.server.changed()
        return request

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def reset(self) -> None:
        """Close with a TCP RST instead of a FIN."""
        self.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Handler = Callable[[Peer], Awaitable[None]]


class RawServer:
    """A loopback server whose `handler` serves each connection; counts connections accepted and open."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = self.open = self.max_open = 0
        self.requests: list[bytes] = []
        self._listeners: list[asyncio.Event] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, tls: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=tls)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"

    async def stop(self) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def changed(self) -> None:
        for event in self._listeners:
            event.set()
        self._listeners.clear()

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(5):
            while not predicate():
                event = asyncio.Event()
                self._listeners.append(event)
                await event.wait()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        self.changed()
        try:
            await self.handler(Peer(self, reader, writer, self.accepted))
        except (ConnectionError, asyncio.CancelledError):
            pass  # cancelled by `stop`: ending normally spares us asyncio 3.11's log of a cancelled stream handler
        finally:
            writer.close()
            self.open -= 1
            self._tasks.discard(task)
            self.changed()


def answering(*answers: bytes) -> Handler:
    """Answer each request with the next of `answers`, the last one again and again, until the client closes."""

    async def handler(peer: Peer) -> None:
        for n in itertools.count():
            if await peer.read() is None:
                return
            await peer.write(answers[min(n, len(answers) - 1)])

    return handler


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def start(handler: Handler, tls: ssl.SSLContext | None = None) -> RawServer:
        server = RawServer(handler)
        await server.start(tls)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def client(serve: object) -> AsyncIterator[HttpClient]:
    """Depends on `serve` so that it closes before the servers stop."""
    async with HttpClient(limit=8) as http:
        yield http


async def post(client: HttpClient, url: str, body: bytes = b"{}", max_body: int = 64 * 1024) -> HttpAnswer:
    return await client.request("POST", url, body=body, headers=JSON, max_body=max_body)


# ---- requests and keep-alive ------------------------------------------------------------------------------------


async def test_sequential_requests_share_one_kept_alive_connection(client: HttpClient) -> None:
    peers: set[object] = set()
    seen: list[dict[str, str]] = []

    async def create(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername"))
        seen.append(dict(request.headers))
        return web.json_response({"id": (await request.json())["n"]}, status=201, headers={"Retry-After": "3"})

    app = web.Application()
    app.router.add_post("/crm/orders", create)
    async with TestServer(app) as server:
        url = str(server.make_url("/crm/orders"))
        for n in range(5):
            headers = {**JSON, "Idempotency-Key": f"key-{n}"}
            answer = await client.request("POST", url, body=json.dumps({"n": n}).encode(), headers=headers)
            assert answer == HttpAnswer(201, "3", json.dumps({"id": n}).encode(), "application/json; charset=utf-8")
    assert len(peers) == 1
    assert [headers["Idempotency-Key"] for headers in seen] == [f"key-{n}" for n in range(5)]
    assert seen[0]["Host"] == url.split("/")[2]
    assert seen[0]["User-Agent"] == "orderbus"
    assert seen[0]["Accept"] == "application/json"


@pytest.mark.parametrize(
    ("method", "body", "length"),
    [("POST", b"{}", b"Content-Length: 2\r\n"), ("PUT", None, b"Content-Length: 0\r\n"), ("DELETE", None, b"")],
)
async def test_request_head_is_written_as_documented(
    serve: Callable[[Handler], Awaitable[RawServer]], client: HttpClient, method: str, body: bytes | None, length: bytes
) -> None:
    server = await serve(answering(OK))
    await client.request(method, f"{server.url}/a/b?c=1#fragment", body=body, headers={"X-Event-Id": "e-1"})
    port = server.url.rpartition(":")[2]
    head = f"{method} /a/b?c=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: orderbus\r\n".encode()
    head += b"Accept: application/json\r\nAccept-Encoding: identity\r\n"
    assert server.requests == [head + length + b"X-Event-Id: e-1\r\n\r\n" + (body or b"")]


async def test_an_answers_content_type_and_location_are_read(
    serve: Callable[[Handler], Awaitable[RawServer]], client: HttpClient
) -> None:
    created = (
        b"HTTP/1.1 201 Created\r\nlocation: /crm/orders/crm-5\r\nContent-Type:  text/html; charset=utf-8 \r\n"
        b"X-Other-Header-Long: 1\r\nContent-Length: 0\r\n\r\n"
    )
    server = await serve(answering(created))
    answer = await post(client, f"{server.url}/orders")
    assert answer == HttpAnswer(201, None, b"", "text/html; charset=utf-8", "/crm/orders/crm-5")
    assert await post(client, f"{server.url}/orders") == answer, "and again on the kept-alive connection"


async def test_never_more_connections_than_the_limit(serve: Callable[[Handler], Awaitable[RawServer]]) -> None:
    gate = asyncio.Event()

    async def held(peer: Peer) -> None:
        while await peer.read() is not None:
            await gate.wait()
            await peer.write(OK)

    server = await serve(held)
    async with HttpClient(limit=4) as client:
        requests = [asyncio.create_task(post(client, f"{server.url}/orders")) for _ in range(50)]
        await server.until(lambda: len(server.requests) == 4)
        assert server.open == 4
        gate.set()
        answers = await asyncio.gather(*requests)
    assert {answer.status for answer in answers} == {200}
    assert (server.accepted, server.max_open, len(server.requests)) == (4, 4, 50)


async def test_waiting_requests_are_served_first_come_first_served(
    serve: Callable[[Handler], Awaitable[RawServer]],
) -> None:
    gate = asyncio.Event()

    async def held(peer: Peer) -> None:
        while await peer.read() is not None:
            await gate.wait()
            await peer.write(OK)

    server = await serve(held)
    async with HttpClient(limit=1) as client:
        first = asyncio.create_task(post(client, server.url, b'{"n": 0}'))
        await server.until(lambda: len(server.requests) == 1)
        # Tasks take their first step in the order they were created: each joins the queue before the next.
        queued = [asyncio.create_task(post(client, server.url, b'{"n": %d}' % n)) for n in range(1, 5)]
        gate.set()
        await asyncio.gather(first, *queued)
    assert [request[-8:] for request in server.requests] == [b'{"n": %d}' % n for n in range(5)]
    assert server.accepted == 1


async def test_a_full_pool_makes_room_for_another_origin(serve: Callable[[Handler], Awaitable[RawServer]]) -> None:
    first, second = await serve(answering(OK)), await serve(answering(OK))
    async with HttpClient(limit=1) as client:
        assert (await post(client, first.url)).body == b"ok"
        assert (await post(client, second.url)).body == b"ok"  # the idle connection to `first` makes room
        await first.until(lambda: first.open == 0)


async def test_a_waiting_request_to_another_origin_gets_the_slot(
    serve: Callable[[Handler], Awaitable[RawServer]],
) -> None:
    gate = asyncio.Event()

    async def held(peer: Peer) -> None:
        while await peer.read() is not None:
            await gate.wait()
            await peer.write(OK)

    first, second = await serve(held), await serve(answering(OK))
    async with HttpClient(limit=1) as client:
        one = asyncio.create_task(post(client, first.url))
        await first.until(lambda: len(first.requests) == 1)
        two = asyncio.create_task(post(client, second.url))
        cancelled = asyncio.create_task(post(client, second.url))
        await asyncio.sleep(0)  # let both queue behind `one`
        cancelled.cancel()
        gate.set()
        assert [(await one).body, (await two).body] == [b"ok", b"ok"]
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await first.until(lambda: first.open == 0)
        assert second.accepted == 1
        assert client._open == 1  # the cancelled waiter took no slot with it


async def test_idle_connections_expire(serve: Callable[[Handler], Awaitable[RawServer]]) -> None:
    now = [100.0]
    server = await serve(answering(OK))
    async with HttpClient(limit=2, idle_timeout=10.0, clock=lambda: now[0]) as client:
        await post(client, server.url)
        now[0] += 10.0
        await post(client, server.url)
        assert server.accepted == 1
        now[0] += 10.5
        await post(client, server.url)
        assert server.accepted == 2
        await server.until(lambda: server.open == 1)


# ---- answers --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "close", "connections"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", False, 1),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhe\r\n3;x=y\r\nllo\r\n0\r\n\r\n", False, 1),
        (b"HTTP/1.1 200 OK\r\n\r\nhello", True, 2),  # delimited by the server closing
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello", False, 2),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello", False, 2),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello", False, 1),
    ],
    ids=["content-length", "chunked", "until-close", "connection-close", "http-1.0", "http-1.0-keep-alive"],
)
async def test_bodies_and_which_connections_are_kept(
    serve: Callable[[Handler], Awaitable[RawServer]], client: HttpClient, answer: bytes, close: bool, connections: int
) -> None:
    async def handler(peer: Peer) -> None:
        while await peer.read() is not None:
            for byte in range(len(answer)):  # a byte at a time: the parser must carry state across reads
                await peer.write(answer[byte : byte + 1])
            if close:
                return

    server = await serve(handler)
    for _ in range(2):
        assert await post(client, server.url) == HttpAnswer(200, None, b"hello")
    assert server.accepted == connections


async def test_informational_answers_are_skipped(
    serve: Callable[[Handler], Awaitable[RawServer]], client: HttpClient
) -> None:
    early = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
    server = await serve(answering(early + b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"))
    assert await post(client, server.url) == HttpAnswer(201, None, b"ok")


@pytest.mark.parametrize("name", ["Retry-After", "retry-after", "RETRY-AFTER", "rEtRy-AfTeR"])
async def test_retry_after_is_found_whatever_its_case(
    serve: Callable[[Handler], Awaitable[RawServer]], client: HttpClient, name: str
) -> None:
    server = await serve(answering(f"HTTP/1.1 503 Busy\r\n{name}:  120 \r\nContent-Length: 0\r\n\r\n".encode()))
    assert await post(client, server.url) == HttpAnswer(503, "120", b"")


async def test_a_long_body_is_cut_at_max_body_and_the_rest_dropped(
    serve: Callable[[Handler], Awaitable[RawServer]], client: HttpClient
) -> None:
    body = bytes(range(256)) * 400
    server = await serve(answering(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)))
    for _ in range(2):
        assert (await post(client, server.url, max_body=1000)).body == body[:1000]
    assert server.accepted == 1  # the rest was read and dropped: the connection stayed usable


async def test_a_body_past_the_discard_limit_closes_the_connection(
    serve: Callable[[Handler], Awaitable[RawServer]], client: HttpClient
) -> None:
    body = b"x" * (1000 + DISCARD_LIMIT + 1)
    server = await serve(answering(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)))
    assert (await post(client, server.url, max_body=1000)).body == body[:1000]
    await server.until(lambda: server.open == 0)


@pytest.mark.parametrize(
    "garbage",
    [
        b"HELLO\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * MAX_HEAD,
        OK + b"unasked",
        b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n",  # llhttp takes it; no 1xx, yet no final answer
        b"HTTP/1.1 000 Zero\r\n\r\n",
        b"HTTP/1.1 600 Beyond\r\nContent-Length: 0\r\n\r\n",  # a daemon ended on it (KeyError: '6xx')
        b"HTTP/1.1 999 Beyond\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=[
        "not-http",
        "length-and-chunked",
        "bad-chunk",
        "upgrade",
        "huge-head",
        "bytes-after-answer",
        "status-099",
        "status-000",
        "status-600",
        "status-999",
    ],
)
async def test_a_malformed_answer_is_a_protocol_error(
    serve: Callable[[Handler], Awaitable[RawServer]], client: HttpClient, garbage: bytes
) -> None:
    server = await serve(answering(garbage))
    if garbage.startswith(OK):  # the answer itself is fine; the connection is not kept
        assert (await post(client, server.url)).body == b"ok"
    else:
        with pytest.raises(HttpProtocolError):
            async with asyncio.timeout(5):  # a request left waiting would be a timeout, not a protocol error
                await post(client, server.url)
    await server.until(lambda: server.open == 0)


# ---- connections that break ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "reset"])
@pytest.mark.parametrize(
    "first",
    [OK, b"HTTP/1.1 204 No Content\r\n\r\n", b"HTTP/1.1 304 Not Modified\r\n\r\n"],
    ids=["content-length", "204", "304"],  # 204 and 304 have no body, and (as aiohttp sends them) no Content-Length
)
async def test_a_reused_connection_closed_before_any_answer_is_retried_once(
    serve: Callable[[Handler], Awaitable[RawServer]], client: HttpClient, how: str, first: bytes
) -> None:
    async def closes_its_first_connection_on_the_second_request(peer: Peer) -> None:
        for n in itertools.count():
            if await peer.read() is None:
                return
            if peer.number == 1 and n == 1:
                if how == "reset":
                    peer.reset()
                return
            await peer.write(first if peer.number == 1 else OK)

    server = await serve(closes_its_first_connection_on_the_second_request)
    assert (await post(client, server.url, b'{"n": 1}')).status == int(first[9:12])
    # Not the first answer again, taken for this request's because its state outlived it.
    assert await post(client, server.url, b'{"n": 2}') == HttpAnswer(200, None, b"ok")
    assert server.accepted == 2
    assert [request.endswith(b'{"n": 2}') for request in server.requests] == [False, True, True]


async def test_a_server_closing_an_idle_connection_costs_nothing(
    serve: Callable[[Handler], Awaitable[RawServer]], client: HttpClient
) -> None:
    async def one_answer_per_connection(peer: Peer) -> None:
        await peer.read()
        await peer.write(OK)

    server = await serve(one_answer_per_connection)
    for _ in range(3):
        assert (await post(client, server.url)).body == b"ok"
    assert server.accepted == 3


@pytest.mark.parametrize(
    ("first", "then"),
    [
        (None, "reset"),  # a fresh connection: never retried
        (None, "close"),
        (OK, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel"),  # reused, but part of an answer arrived
        (None, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel"),  # a cut Content-Length body is not whole
        (None, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel"),
    ],
    ids=["fresh-reset", "fresh-close", "reused-partial", "content-length-cut", "chunked-cut"],
)
async def test_a_connection_broken_under_a_request_is_a_connection_error(
    serve: Callable[[Handler], Awaitable[RawServer]], client: HttpClient, first: bytes | None, then: bytes | str
) -> None:
    async def breaks(peer: Peer) -> None:
        if first is not None:
            await peer.read()
            await peer.write(first)
        await peer.read()
        if isinstance(then, bytes):
            await peer.write(then)
        if then == "reset":
            peer.reset()

    server = await serve(breaks)
    if first is not None:
        await post(client, server.url)
    with pytest.raises(HttpConnectionError, match="connection"):
        await post(client, server.url)
    assert (server.accepted, len(server.requests)) == (1, 2 if first else 1)


async def test_connection_refused_is_a_connection_error(client: HttpClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(HttpConnectionError, match="cannot connect"):
        await post(client, f"http://127.0.0.1:{port}/orders")


async def test_cancelling_a_request_closes_its_connection(
    serve: Callable[[Handler], Awaitable[RawServer]], client: HttpClient
) -> None:
    async def first_connection_never_answers(peer: Peer) -> None:
        while await peer.read() is not None:
            if peer.number > 1:
                await peer.write(OK)

    server = await serve(first_connection_never_answers)
    request = asyncio.create_task(post(client, server.url))
    await server.until(lambda: len(server.requests) == 1)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    await server.until(lambda: server.open == 0)
    assert (await post(client, server.url)).body == b"ok"
    assert server.accepted == 2


async def test_close_closes_every_connection(serve: Callable[[Handler], Awaitable[RawServer]]) -> None:
    gate = asyncio.Event()

    async def answers_only_the_first_request(peer: Peer) -> None:
        await peer.read()
        await gate.wait()
        await peer.write(OK)
        while await peer.read() is not None:
            pass

    server = await serve(answers_only_the_first_request)
    client = HttpClient(limit=8)
    done = [asyncio.create_task(post(client, server.url)) for _ in range(3)]
    await server.until(lambda: len(server.requests) == 3)
    gate.set()
    await asyncio.gather(*done)
    in_flight = asyncio.create_task(post(client, server.url))  # on a kept connection; the server won't answer
    await server.until(lambda: len(server.requests) == 4)
    await client.close()
    await server.until(lambda: server.open == 0)
    with pytest.raises(HttpConnectionError, match="closed by this client"):
        await in_flight
    with pytest.raises(HttpConnectionError, match="closed"):
        await post(client, server.url)


# ---- what is refused before sending ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("POST", "/x", {"X-Evil": "1\r\nX-Injected: 1"}),
        ("POST", "/x", {"X-Evil": "1\nX-Injected: 1"}),
        ("POST", "/x", {"X-Evil": "1\rX-Injected: 1"}),
        ("POST", "/x", {"X-Evil": "1\0"}),
        ("POST", "/x", {"X-Evil\r\nX-Injected": "1"}),
        ("POST", "/x", {"Bad Name": "1"}),
        ("POST", "/x", {"": "1"}),
        ("POST", "/x", {"Host": "elsewhere"}),
        ("POST", "/x", {"content-length": "0"}),
        ("POST", "/x", {"Connection": "close"}),
        ("GET /admin HTTP/1.1\r\nX:", "/x", {}),
    ],
)
async def test_headers_and_methods_that_could_inject_are_refused(
    serve: Callable[[Handler], Awaitable[RawServer]],
    client: HttpClient,
    method: str,
    path: str,
    headers: dict[str, str],
) -> None:
    server = await serve(answering(OK))
    with pytest.raises(InvalidRequestError) as refused:
        await client.request(method, server.url + path, body=b"{}", headers=headers)
    assert isinstance(refused.value, ValueError)
    assert "Injected: 1" not in str(refused.value)  # values (maybe secrets) are never quoted
    assert server.accepted == 0


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/x",
        "127.0.0.1:8080/x",
        "http://user:s3cret@127.0.0.1:8080/x",
        "http:///x",
        "http://[::1/x",
        "http://127.0.0.1:99999/x",
        "http://exa mple.com/x",
        "http://" + "a" * 64 + "ü.example/x",  # a label too long for IDNA
        "http://a..b/x",  # ASCII, yet getaddrinfo's IDNA encoding would raise UnicodeError: an empty label
        "http://" + "a" * 64 + ".example/x",  # and a label over 63 characters
        "https://./x",
    ],
)
async def test_unusable_urls_are_refused(client: HttpClient, url: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        await post(client, url)
    assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize(
    ("url", "authority", "target"),
    [
        ("http://Bücher.example:8080/a b/ü?q=1#top", "xn--bcher-kva.example:8080", "/a%20b/%C3%BC?q=1"),
        ("https://example.com:443/orders/by-number/SO%2F1", "example.com", "/orders/by-number/SO%2F1"),
        ("http://[::1]:8080", "[::1]:8080", "/"),
        ("http://example.com?x=1", "example.com", "/?x=1"),
    ],
)
def test_urls_become_a_host_header_and_a_target(url: str, authority: str, target: str) -> None:
    client = HttpClient(limit=1)
    for _ in range(2):  # the second time from the cache of URL prefixes
        origin, sent_target = client._route(url)
        assert (origin.lines.partition("\r\n")[0], sent_target) == (f"Host: {authority}", target)


# ---- TLS ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA and a server certificate for 127.0.0.1 that it signed, made with the openssl command."""
    folder = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    signed = ["-out", "server.pem", "-days", "2", "-extfile", "server.ext"]
    (folder / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )
    for argv in (
        ["req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=orderbus test CA"],
        ["req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"],
        ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", *signed],
    ):
        subprocess.run(["openssl", *argv], cwd=folder, check=True, capture_output=True)
    return folder


@pytest.fixture
async def tls_server(serve: Callable[..., Awaitable[RawServer]], certificates: Path) -> RawServer:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificates / "server.pem", certificates / "server.key")
    return await serve(answering(OK), context)


@pytest.mark.parametrize("trust", ["nothing", "the test CA"])
async def test_https_with_our_ca_or_without_verification(tls_server: RawServer, certificates: Path, trust: str) -> None:
    context = ssl.create_default_context(cafile=certificates / "ca.pem")
    async with HttpClient(limit=2, ssl=False if trust == "nothing" else context) as client:
        for _ in range(2):
            assert await post(client, tls_server.url) == HttpAnswer(200, None, b"ok")
    assert tls_server.accepted == 1


async def test_https_refuses_a_certificate_the_default_context_does_not_trust(tls_server: RawServer) -> None:
    async with HttpClient(limit=2) as client:
        with pytest.raises(HttpConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            await post(client, tls_server.url)
    await client.close()  # again: nothing left to do


async def test_a_delivery_to_an_untrusted_certificate_says_so_and_a_refused_connection_does_not(
    tls_server: RawServer,
) -> None:
    # The lane logs a refused certificate at ERROR (configuration, not the network); it learns it from this flag.
    deadlines = Deadlines(SystemClock())
    async with HttpClient(limit=2) as client:
        outcomes = [
            await attempt(
                client,
                HttpRequest("POST", url, b"{}", JSON),
                idempotency_key="k",
                auth_headers={},
                timeout=5.0,
                deadlines=deadlines,
            )
            for url in (tls_server.url, f"http://127.0.0.1:{free_port()}/orders")
        ]
    assert [(o.kind, o.certificate_refused) for o in outcomes if isinstance(o, TransportFailure)] == [
        ("connection", True),
        ("connection", False),
    ]
