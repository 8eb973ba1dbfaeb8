"""Credentials per sink: the headers that tell a downstream system who is calling, and how they are renewed.

Every scheme implements `Auth`: `headers()` gives the headers of the next request, `refresh(rejected)` is called
once after a 401 and says whether sending again can help. Static credentials (`BearerToken`, `BasicAuth`,
`ApiKeyHeader`) never can; `OAuth2ClientCredentials` fetches a new token. Secrets appear in no repr and no log
line; the token endpoint's error codes are quoted only when they look like codes.

`authorized_attempt` is where credentials meet the engine: one attempt, and on a 401 one renewal and one resend
within that same attempt. A second 401 is the answer; the engine's policy pauses the sink. Credentials that
cannot be obtained end as an answer too, so the policy decides as it does for the downstream::

    OrderbusError (topics.errors)
    └── AuthError              no credentials could be obtained for a downstream system
        ├── CredentialsRefused the token endpoint refused our client (4xx) or answered without a usable token:
        │                      our configuration is wrong, so it becomes a 401 (the sink pauses, nothing is
        │                      dead-lettered for it)
        └── TokenUnavailable   the token endpoint could not be reached, timed out or failed (5xx, 408, 425, 429):
                               temporary, so it becomes a connection failure (retried with backoff)

OAuth2 tokens (RFC 6749 §4.4, client credentials grant) are cached and renewed `refresh_margin` seconds before
they expire (at most half their lifetime before), by one request however many deliveries need the token at that
moment. If that early renewal fails, the old token is used while it is still valid.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Final, Literal, Protocol
from urllib.parse import quote_plus, urlsplit

import aiohttp

from consumers.clock import Clock, SystemClock
from consumers.deadlines import Deadlines
from consumers.delivery import Reply, TransportFailure, attempt
from consumers.http_client import HttpClient
from consumers.identity import USER_AGENT
from consumers.sink import HttpRequest, canonical_json
from topics.errors import OrderbusError

log = logging.getLogger(__name__)

_MAX_TOKEN_ANSWER: Final = 64 * 1024
_TEMPORARY: Final = frozenset({408, 425, 429})
# RFC 6750 b64token: anything else (a newline, a space) would break the Authorization header.
_B64TOKEN: Final = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_ERROR_CODE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")

ClientAuthMethod = Literal["client_secret_basic", "client_secret_post"]


class AuthError(OrderbusError):
    """No credentials could be obtained for a downstream system."""


class CredentialsRefused(AuthError):
    """The token endpoint refused our client, or answered without a usable token: a configuration problem."""


class TokenUnavailable(AuthError):
    """The token endpoint could not be reached, timed out or failed: temporary."""


class Auth(Protocol):
    """How a sink proves who it is. Implementations are safe to share between concurrent deliveries."""

    async def headers(self) -> dict[str, str]:
        """The credential headers for the next request. Raises `AuthError` when none can be obtained."""
        ...

    async def refresh(self, rejected: Mapping[str, str] | None = None) -> bool:
        """After a 401 to a request sent with `rejected`: renew the credentials; True if sending again may help.

        Credentials renewed since `rejected` was handed out are not renewed again. Raises `AuthError`.
        """
        ...

    async def aclose(self) -> None:
        """Release what the scheme holds (the token endpoint's connections)."""
        ...


class _Static:
    """Credentials that never change: nothing to renew, nothing to close."""

    async def refresh(self, rejected: Mapping[str, str] | None = None) -> bool:
        return False

    async def aclose(self) -> None:
        return None


@dataclass(frozen=True)
class NoAuth(_Static):
    """A downstream that needs no credentials."""

    async def headers(self) -> dict[str, str]:
        return {}


@dataclass(frozen=True)
class BearerToken(_Static):
    """``Authorization: Bearer <token>`` with a fixed token."""

    token: str = field(repr=False)

    async def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass(frozen=True)
class BasicAuth(_Static):
    """``Authorization: Basic`` (RFC 7617), user and password as UTF-8."""

    username: str
    password: str = field(repr=False)

    async def headers(self) -> dict[str, str]:
        return {"Authorization": _basic(self.username, self.password)}


@dataclass(frozen=True)
class ApiKeyHeader(_Static):
    """An API key in a header of the system's choosing, such as ``X-Api-Key``."""

    header: str
    key: str = field(repr=False)

    async def headers(self) -> dict[str, str]:
        return {self.header: self.key}


@dataclass(frozen=True)
class OAuth2Client:
    """A registered OAuth2 client: where to ask for tokens and how to prove who we are there."""

    token_url: str
    client_id: str
    client_secret: str = field(repr=False)
    scope: str | None = None
    refresh_margin: float = 30.0
    client_auth: ClientAuthMethod = "client_secret_basic"


@dataclass(frozen=True, slots=True)
class _Token:
    value: str = field(repr=False)
    lifetime: float | None  # None: the endpoint named none; the token is kept until a 401
    expires_at: float | None
    refresh_at: float | None

    def due(self, now: float) -> bool:
        return self.refresh_at is not None and now >= self.refresh_at

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


class OAuth2ClientCredentials:
    """Bearer tokens from an OAuth2 token endpoint (client credentials grant), cached and renewed.

    One token request at a time: deliveries that need a token while one is being fetched wait for that one.
    The endpoint gets its own small connection pool (`tls` as the sink's), unless `session` is given.
    """

    def __init__(
        self,
        client: OAuth2Client,
        *,
        name: str = "",
        timeout: float = 10.0,
        clock: Clock | None = None,
        session: aiohttp.ClientSession | None = None,
        tls: ssl.SSLContext | bool = True,
    ) -> None:
        self._client = client
        self._name = name
        self._timeout = timeout
        self._clock = clock or SystemClock()
        self._session = session
        self._owns_session = session is None
        self._tls = tls
        self._token: _Token | None = None
        self._fetching: asyncio.Task[_Token] | None = None

    @property
    def client(self) -> OAuth2Client:
        return self._client

    def __repr__(self) -> str:
        client = self._client
        return f"OAuth2ClientCredentials(token_url={client.token_url!r}, client_id={client.client_id!r})"

    async def headers(self) -> dict[str, str]:
        token, now = self._token, self._clock.now()
        if token is None or token.due(now) or token.expired(now):
            token = await self._renew_early(token, now)
        return {"Authorization": f"Bearer {token.value}"}

    async def refresh(self, rejected: Mapping[str, str] | None = None) -> bool:
        current = self._token
        if rejected is not None and current is not None and rejected.get("Authorization") != f"Bearer {current.value}":
            return True  # another delivery renewed it since this request went out
        token = await self._fetch_once("refused")
        return current is None or token.value != current.value

    async def aclose(self) -> None:
        if self._fetching is not None and not self._fetching.done():
            self._fetching.cancel()
            await asyncio.wait([self._fetching])
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def _renew_early(self, token: _Token | None, now: float) -> _Token:
        """A new token; if that fails while `token` is still valid, `token`, and try again later. A refusal too (a
        client secret revoked or rotated at the endpoint): the system still takes the token it gave, so the sink
        goes on until it expires (said as an error: then the sink pauses) rather than pausing at once."""
        try:
            return await self._fetch_once("first" if token is None else "expiring")
        except (TokenUnavailable, CredentialsRefused) as exc:
            if token is None or token.expired(now) or token.expires_at is None:
                raise
            self._token = replace(token, refresh_at=now + max(1.0, (token.expires_at - now) / 2))
            refused = isinstance(exc, CredentialsRefused)
            log.log(
                logging.ERROR if refused else logging.WARNING,
                "oauth2 token renewal %s; using the current token until it expires",
                "refused" if refused else "failed",
                extra={"sink": self._name, "error": str(exc)},
            )
            return token

    async def _fetch_once(self, reason: Literal["first", "expiring", "refused"]) -> _Token:
        """Join the token request under way, or start one. A caller that gives up does not cancel it."""
        if self._fetching is None or self._fetching.done():
            self._fetching = asyncio.create_task(self._fetch(reason), name=f"oauth2-token-{self._name}")
        return await asyncio.shield(self._fetching)

    async def _fetch(self, reason: str) -> _Token:
        """One token request; its outcome is logged once, whoever waits for it (never the token itself)."""
        context = {"sink": self._name, "reason": reason}
        try:
            token = await self._request_token()
        except CredentialsRefused as exc:
            log.error("oauth2 token request refused", extra={**context, "error": str(exc)})
            raise
        except TokenUnavailable as exc:
            log.warning("oauth2 token request failed", extra={**context, "error": str(exc)})
            raise
        self._token = token
        log.info("oauth2 token obtained", extra={**context, "expires_in": token.lifetime})
        return token

    async def _request_token(self) -> _Token:
        client = self._client
        form = {"grant_type": "client_credentials"}
        if client.scope:
            form["scope"] = client.scope
        headers = {"Accept": "application/json"}
        if client.client_auth == "client_secret_basic":
            # RFC 6749 §2.3.1: both are form-encoded before they are joined for Basic.
            headers["Authorization"] = _basic(quote_plus(client.client_id), quote_plus(client.client_secret))
        else:
            form |= {"client_id": client.client_id, "client_secret": client.client_secret}
        sent = self._clock.now()
        try:
            async with asyncio.timeout(self._timeout):
                # No redirects: the request carries the client secret, and only token_url may see it.
                async with self._http().post(
                    client.token_url, data=form, headers=headers, allow_redirects=False
                ) as response:
                    status, body = response.status, await response.content.read(_MAX_TOKEN_ANSWER)
        except TimeoutError:
            raise self._unavailable(f"no answer within {self._timeout:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise self._unavailable(type(exc).__name__) from None
        return self._read(status, body, sent)

    def _read(self, status: int, body: bytes, sent: float) -> _Token:
        """The token in a token endpoint's answer (RFC 6749 §5.1), or the error it means (§5.2)."""
        if status in _TEMPORARY or status >= 500:
            raise self._unavailable(f"answered {status}{_error_code(body)}")
        if status != 200:
            raise self._refused(f"answered {status}{_error_code(body)}")
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than the parser's stack
            document = None
        if not isinstance(document, dict):
            raise self._refused("answered 200 without a JSON object")
        value, kind = document.get("access_token"), document.get("token_type", "Bearer")
        if not isinstance(value, str) or not _B64TOKEN.fullmatch(value):
            raise self._refused("answered 200 without a usable access_token")
        if not isinstance(kind, str) or kind.lower() != "bearer":
            raise self._refused("answered with a token that is not a bearer token")
        lifetime = _seconds(document.get("expires_in"))
        if lifetime is None:
            return _Token(value, None, None, None)
        margin = min(self._client.refresh_margin, lifetime / 2)
        return _Token(value, lifetime, sent + lifetime, sent + lifetime - margin)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Named as the deliveries are: identity providers log who asks for tokens, too.
            connector = aiohttp.TCPConnector(limit=2, ssl=self._tls)
            self._session = aiohttp.ClientSession(connector=connector, headers={"User-Agent": USER_AGENT})
        return self._session

    def _unavailable(self, detail: str) -> TokenUnavailable:
        return TokenUnavailable(f"token endpoint {_host(self._client.token_url)}: {detail}")

    def _refused(self, detail: str) -> CredentialsRefused:
        return CredentialsRefused(f"token endpoint {_host(self._client.token_url)}: {detail}")


async def authorized_attempt(
    client: HttpClient,
    request: HttpRequest,
    auth: Auth,
    *,
    idempotency_key: str | None,
    timeout: float,
    deadlines: Deadlines,
) -> Reply | TransportFailure:
    """Send `request` once with `auth`'s credentials; after a 401, renew them once and resend. Never raises.

    Credentials that are refused become a 401 of our own (body ``{"error": "credentials_refused", ...}``), so
    the sink pauses; credentials that are unavailable become a connection failure, so the delivery is retried.
    """
    started = time.perf_counter()
    try:
        headers = await auth.headers()
        outcome = await attempt(
            client, request, idempotency_key=idempotency_key, auth_headers=headers, timeout=timeout, deadlines=deadlines
        )
        if isinstance(outcome, Reply) and outcome.status == 401 and await auth.refresh(headers):
            headers = await auth.headers()
            outcome = await attempt(
                client,
                request,
                idempotency_key=idempotency_key,
                auth_headers=headers,
                timeout=timeout,
                deadlines=deadlines,
            )
    except CredentialsRefused as exc:
        body = canonical_json({"error": "credentials_refused", "detail": str(exc)})
        return Reply(401, None, body, time.perf_counter() - started)
    except AuthError as exc:
        return TransportFailure("connection", str(exc), time.perf_counter() - started)
    return replace(outcome, elapsed=time.perf_counter() - started)


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def _seconds(value: object) -> float | None:
    """``expires_in``: a positive number (some endpoints send it as a string); anything else: unknown."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 10**9:
        return None
    return float(value)


def _error_code(body: bytes) -> str:
    """`` (invalid_client)`` from an RFC 6749 §5.2 error answer; nothing else from the body is ever quoted."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return ""
    code = document.get("error") if isinstance(document, dict) else None
    return f" ({code})" if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else ""


def _host(url: str) -> str:
    return urlsplit(url).netloc.rpartition("@")[2] or "(no host)"
