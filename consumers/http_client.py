"""A lean HTTP/1.1 client for one job: a delivery's small request to a known host over kept-alive connections.

Why not aiohttp's client, which the rest of orderbus uses: a profile put ~36 % of the daemon's CPU per delivery in
`ClientSession.request` (170-200 us on a 2-core machine), spent on what a delivery never needs (a URL object and a
header multidict per request, redirects, cookies, proxies, compression, streaming). A delivery sends one small body
and reads the status, the Retry-After header and at most `max_body` bytes of body. This client does that and no
more, on one `asyncio.Protocol` per connection (`consumers.http_connection`), parsing answers with httptools (llhttp,
the parser of Node.js and uvicorn). Left out on purpose: timeouts (the caller bounds `request`:
`consumers.deadlines`), redirects, proxies, compression, cookies, HTTP/2, ``Expect: 100-continue``, HEAD, and every
answer header but Retry-After.

Connections. At most `limit` exist at once over all origins (scheme, host, port); a request beyond that waits, first
come first served, and is handed the next connection or slot given back. A finished connection returns to its
origin's idle stack, where the most recently used is taken first (so the rest can age out), unless the answer said
``Connection: close``, was HTTP/1.0 without keep-alive, or ended with the server closing. An idle connection leaves
the pool when the server closes it, when it sat idle longer than `idle_timeout` (checked when one is taken, and for
the oldest when one is returned), and for a request to another origin when the limit is reached. A request cancelled
before its answer is whole closes its connection: the rest of that answer would otherwise be read as the next one's.

Retry once. A server may close a kept-alive connection just as we send on it (its own idle timeout). Such a request
(on a reused connection, and not one byte of answer received) is sent once more on a fresh connection, and that is
counted nowhere else. It is safe here although the server may have read the first copy: every delivery carries an
Idempotency-Key, and the downstream applies a repeated key once (it replays the first answer). Anything else (a fresh
connection, part of an answer received) fails, and the caller's policy decides what to do.

Errors (`topics.errors`): `InvalidRequestError` before anything is sent; `HttpConnectionError` when no whole answer
arrived; `HttpProtocolError` when what arrived is not an HTTP/1.1 answer. OSError (DNS, TLS, resets) and httptools'
errors are mapped here, the one boundary, and never escape.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from ssl import CERT_NONE, SSLContext, create_default_context
from typing import Final
from urllib.parse import quote, urlsplit

from consumers.http_connection import DISCARD_LIMIT, MAX_HEAD, Connection, HttpAnswer, Origin
from topics.errors import ConfigError, HttpConnectionError, InvalidRequestError

__all__ = ["DISCARD_LIMIT", "MAX_HEAD", "HttpAnswer", "HttpClient", "ascii_host"]

CLOSE_GRACE: Final = 1.0  # seconds `close` waits for aborted connections to report closed
_CACHED: Final = 256  # URL prefixes, header names and methods remembered as checked
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})  # these say Content-Length: 0 when they have no body
_OWN_HEADERS: Final = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "upgrade", "user-agent", "accept"}
)
# Every downstream answers JSON (a create's id, an error's detail): asked for, so a server that negotiates does not
# answer HTML or XML, which the sinks could not read the id from.
_ACCEPT: Final = "application/json"
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token: header names and methods
_HOST: Final = re.compile(r"[a-z0-9.\-_:%]+")  # after IDNA and lower-casing; ':' and '%' for IPv6 and its zones
_UNSAFE_TARGET: Final = re.compile(r"[^!-~]|#")  # anything but printable ASCII, or a fragment
_TARGET_SAFE: Final = "".join(map(chr, range(0x21, 0x7F)))  # quote() keeps these ('%' too: escapes stay escapes)


def ascii_host(host: str) -> str:
    """`host` (lower-case, as `urlsplit` gives it) as getaddrinfo and ssl will take it, IDNA-encoded with every
    label 1 to 63 characters, so that their UnicodeError never comes; else `InvalidRequestError` naming the host
    alone (the settings check URLs with it, and a URL may hold a password)."""
    try:
        encoded = host.encode("idna").decode("ascii")
    except UnicodeError:
        problem = "has an empty label or one over 63 characters" if host.isascii() else "is not a valid IDN"
        raise InvalidRequestError(f"host {host!r} {problem}") from None
    if not _HOST.fullmatch(encoded):
        raise InvalidRequestError(f"no usable host (got {host!r})")
    return encoded


_Waiter = tuple["asyncio.Future[Connection | None]", Origin]  # handed a connection to its origin, or a free slot


class HttpClient:
    """Keep-alive HTTP/1.1 requests to a few origins, at most `limit` connections in all (see the module docstring).

    `ssl`: True verifies servers with the default context, False verifies nothing (https still encrypts), or a
    context of your own. `clock` gives monotonic seconds for the idle timeout; tests pass a fake one.
    """

    def __init__(
        self,
        *,
        limit: int,
        ssl: SSLContext | bool = True,
        idle_timeout: float = 15.0,
        user_agent: str = "orderbus",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1:
            raise ConfigError(f"http client: limit must be at least 1, not {limit}")
        if not user_agent.isprintable():
            raise ConfigError(f"http client: user_agent must be printable, not {user_agent!r}")
        self._limit = limit
        self._ssl = ssl
        self._context: SSLContext | None = None  # made on the first https origin
        self._idle_timeout = idle_timeout
        self._user_agent = user_agent
        self._clock = clock
        self._origins: dict[tuple[str, str, int], Origin] = {}
        self._prefixes: dict[str, Origin] = {}  # "scheme://authority" as written in URLs -> its origin
        self._names: set[str] = set()  # header names known to be valid
        self._methods: set[str] = set()
        self._open = 0  # slots taken: connections dialling, in use or idle
        self._waiters: deque[_Waiter] = deque()
        self._connections: set[Connection] = set()
        self._closed = False
        self._drained: asyncio.Event | None = None

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def request(
        self, method: str, url: str, *, body: bytes | None, headers: Mapping[str, str], max_body: int = 64 * 1024
    ) -> HttpAnswer:
        """Send one request and read its answer. No timeout of its own: bound it (`consumers.deadlines`).

        `headers` follow the client's own Host, User-Agent, Accept and Content-Length lines; they may not set those, nor
        Transfer-Encoding, Connection or Upgrade. Raises `InvalidRequestError` (nothing sent), `HttpConnectionError`
        or `HttpProtocolError`.
        """
        origin, target = self._route(url)
        data = self._serialize(method, target, origin, body, headers)
        conn = await self._acquire(origin)
        try:
            try:
                return await conn.exchange(data, max_body)
            except HttpConnectionError:
                if conn.uses == 1 or conn.received or self._closed:
                    raise
            # Reused, and closed by the server before one byte of answer: once more, on a fresh connection in the
            # same slot (see "Retry once" in the module docstring). A failed dial releases the old one's slot below.
            conn = await self._dial(origin)
            return await conn.exchange(data, max_body)
        finally:
            self._release(conn)

    async def close(self) -> None:
        """Close every connection, idle or in use (a request in flight fails with `HttpConnectionError`)."""
        self._closed = True
        while self._waiters:
            waiter, _ = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(HttpConnectionError("the HTTP client was closed"))
        for origin in self._origins.values():
            origin.idle.clear()
        for conn in list(self._connections):
            conn.in_pool = False
            conn.abort()
        if self._connections:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_GRACE):
                    await self._drained.wait()

    # ---- slots and the pool -------------------------------------------------------------------------------------

    async def _acquire(self, origin: Origin) -> Connection:
        """A connection to `origin`. It holds one of the `limit` slots until `_release`."""
        if self._closed:
            raise HttpConnectionError("the HTTP client is closed")
        if not self._waiters:  # else queue behind them
            conn = self._take_idle(origin)
            if conn is not None:
                return conn
            if self._open < self._limit:
                self._open += 1
                return await self._dial_in_slot(origin)
            if self._evict_idle():
                return await self._dial_in_slot(origin)
        waiter: asyncio.Future[Connection | None] = asyncio.get_running_loop().create_future()
        entry = (waiter, origin)
        self._waiters.append(entry)
        try:
            handed = await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
            elif waiter.exception() is None:  # handed something just as we were cancelled: pass it on
                self._pass_on(waiter.result())
            raise
        if handed is not None and handed.alive:
            return handed
        return await self._dial_in_slot(origin)  # a slot, or a connection lost since: its slot

    def _take_idle(self, origin: Origin) -> Connection | None:
        idle = origin.idle
        if not idle:
            return None
        conn = idle.pop()
        conn.in_pool = False
        if self._clock() - conn.idle_since <= self._idle_timeout:
            return conn
        # The newest idle connection is too old, so the older ones are too: close them all.
        self._drop_idle(conn)
        while idle:
            self._drop_idle(idle.popleft())
        return None

    def _evict_idle(self) -> bool:
        """At the limit: close the oldest idle connection of another origin, keeping its slot for the caller."""
        for origin in self._origins.values():
            if origin.idle:
                conn = origin.idle.popleft()
                conn.in_pool = False
                conn.abort()
                return True
        return False

    def _release(self, conn: Connection) -> None:
        """Give `conn`'s slot back: to the first waiter (with `conn` itself if it wants its origin), else the pool."""
        if not conn.reusable or self._closed:
            conn.abort()
            self._free_slot()
            return
        while self._waiters:
            waiter, origin = self._waiters.popleft()
            if waiter.done():
                continue
            if origin is conn.origin:
                waiter.set_result(conn)
            else:
                conn.abort()
                waiter.set_result(None)
            return
        conn.in_pool = True
        conn.idle_since = now = self._clock()
        idle = conn.origin.idle
        idle.append(conn)
        while now - idle[0].idle_since > self._idle_timeout:  # close lazily: the oldest, when one comes back
            self._drop_idle(idle.popleft())

    def _pass_on(self, handed: Connection | None) -> None:
        if handed is None:
            self._free_slot()
        else:
            self._release(handed)

    def _drop_idle(self, conn: Connection) -> None:
        conn.in_pool = False
        conn.abort()
        self._free_slot()

    def _free_slot(self) -> None:
        while self._waiters:
            waiter, _ = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._open -= 1

    def unpool(self, conn: Connection) -> None:
        """The server closed `conn` (or we did): if it was idle, it leaves the pool and frees its slot."""
        if conn.in_pool:
            conn.in_pool = False
            conn.origin.idle.remove(conn)
            self._free_slot()

    def untrack(self, conn: Connection) -> None:
        """`conn` is closed for good (its connection_lost): `close` no longer waits for it."""
        self._connections.discard(conn)
        if self._drained is not None and not self._connections:
            self._drained.set()

    async def _dial_in_slot(self, origin: Origin) -> Connection:
        try:
            return await self._dial(origin)
        except BaseException:
            self._free_slot()
            raise

    async def _dial(self, origin: Origin) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(
                lambda: Connection(origin, loop, self), origin.host, origin.port, ssl=origin.ssl
            )
        except OSError as exc:  # refused, unreachable, DNS (gaierror), TLS (SSLError, certificate errors)
            raise HttpConnectionError(f"{origin.name}: cannot connect ({exc!r})") from exc
        self._connections.add(conn)
        if self._closed:
            conn.abort()
            raise HttpConnectionError("the HTTP client was closed")
        return conn

    # ---- URLs and request heads ---------------------------------------------------------------------------------

    def _route(self, url: str) -> tuple[Origin, str]:
        """The origin and request target of `url`. URLs differ in their paths, so their prefixes' parses are cached."""
        slash = url.find("/", 8)  # past "https://" and the first character of the host
        prefix, target = (url, "/") if slash < 0 else (url[:slash], url[slash:])
        origin = self._prefixes.get(prefix)
        if origin is None:
            origin, target = self._parse(url, prefix)
        if _UNSAFE_TARGET.search(target) is not None:
            target = quote(target.partition("#")[0], safe=_TARGET_SAFE)
        return origin, target

    def _parse(self, url: str, prefix: str) -> tuple[Origin, str]:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise InvalidRequestError(f"not a usable URL ({exc}): {url!r}") from None
        if parts.scheme not in ("http", "https"):
            raise InvalidRequestError(f"only http and https URLs are sent: {url!r}")
        if "@" in parts.netloc:  # the URL is not quoted: it may hold a password
            raise InvalidRequestError(f"URL with user info refused (credentials go in a header): host {parts.hostname}")
        origin = self._origin(parts.scheme, parts.hostname or "", port, url)
        if "?" not in prefix and "#" not in prefix:  # then `_route` splits URLs with this prefix as urlsplit does
            if len(self._prefixes) >= _CACHED:
                self._prefixes.clear()
            self._prefixes[prefix] = origin
        target = parts.path or "/"
        return origin, f"{target}?{parts.query}" if parts.query else target

    def _origin(self, scheme: str, host: str, port: int | None, url: str) -> Origin:
        try:
            host = ascii_host(host)
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"{exc}: {url!r}") from None
        default = 443 if scheme == "https" else 80
        port = default if port is None else port
        origin = self._origins.get((scheme, host, port))
        if origin is None:
            authority = f"[{host}]" if ":" in host else host
            if port != default:
                authority = f"{authority}:{port}"
            # Accept-Encoding: without it any coding is acceptable (RFC 9110 12.5.3), and this client inflates
            # none: a gzip answer's downstream id was lost to the order's later updates and cancels.
            lines = (
                f"Host: {authority}\r\nUser-Agent: {self._user_agent}\r\nAccept: {_ACCEPT}\r\n"
                "Accept-Encoding: identity\r\n"
            )
            tls = self._ssl_context() if scheme == "https" else None
            origin = self._origins[scheme, host, port] = Origin(f"{scheme}://{authority}", host, port, tls, lines)
        return origin

    def _ssl_context(self) -> SSLContext:
        if isinstance(self._ssl, SSLContext):
            return self._ssl
        if self._context is None:
            self._context = create_default_context()
            if not self._ssl:  # asked for: encrypt, but trust any certificate
                self._context.check_hostname = False
                self._context.verify_mode = CERT_NONE
        return self._context

    def _serialize(
        self, method: str, target: str, origin: Origin, body: bytes | None, headers: Mapping[str, str]
    ) -> bytes:
        if method not in self._methods:
            self._check_method(method)
        if not self._names.issuperset(headers):
            self._check_names(headers)
        fields = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        count = len(headers)
        # Each field ends in the one CR LF put there above: one more CR or LF means a value tried to add a line.
        if fields.count("\n") != count or fields.count("\r") != count or "\0" in fields:
            culprit = next(name for name, value in headers.items() if {"\r", "\n", "\0"} & set(value))
            raise InvalidRequestError(f"header {culprit!r} holds CR, LF or NUL")
        if body is None:
            length = "Content-Length: 0\r\n" if method in _BODY_METHODS else ""
        else:
            length = f"Content-Length: {len(body)}\r\n"
        try:
            head = f"{method} {target} HTTP/1.1\r\n{origin.lines}{length}{fields}\r\n".encode()
        except UnicodeEncodeError as exc:
            raise InvalidRequestError(f"a header is not encodable as UTF-8 ({exc.reason})") from None
        return head + body if body else head

    def _check_method(self, method: str) -> None:
        if not _TOKEN.fullmatch(method):
            raise InvalidRequestError(f"not an HTTP method: {method!r}")
        if len(self._methods) < _CACHED:
            self._methods.add(method)

    def _check_names(self, headers: Mapping[str, str]) -> None:
        for name in headers:
            if not _TOKEN.fullmatch(name):
                raise InvalidRequestError(f"not a header name: {name!r}")
            if name.lower() in _OWN_HEADERS:
                raise InvalidRequestError(f"header {name!r} is the client's to set")
            if len(self._names) < _CACHED:
                self._names.add(name)
