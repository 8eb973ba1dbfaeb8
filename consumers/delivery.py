"""One HTTP attempt against a downstream system, and the one boundary where aiohttp's errors become ours.

An attempt ends in a `Reply` (the system answered, whatever the status) or a `TransportFailure` (it did not:
a timeout or a connection error). What either means is the policy's business, not this module's.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import Literal

import aiohttp

from consumers.sink import HttpRequest

BODY_EXCERPT = 1024


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    retry_after: str | None
    body: bytes
    elapsed: float

    @property
    def excerpt(self) -> str:
        return self.body[:BODY_EXCERPT].decode("utf-8", "replace")

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


@dataclass(frozen=True, slots=True)
class TransportFailure:
    kind: Literal["timeout", "connection"]
    detail: str
    elapsed: float


async def attempt(
    session: aiohttp.ClientSession,
    request: HttpRequest,
    *,
    idempotency_key: str,
    auth_headers: dict[str, str],
    timeout: float,
    max_body: int = 64 * 1024,
) -> Reply | TransportFailure:
    """Send `request` once with its idempotency key; never raises for network trouble."""
    headers = {**request.headers, **auth_headers, "Idempotency-Key": idempotency_key}
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            async with session.request(
                request.method, request.url, data=request.body, headers=headers, allow_redirects=False
            ) as response:
                body = await response.content.read(max_body)
                return Reply(response.status, response.headers.get("Retry-After"), body, time.perf_counter() - started)
    except TimeoutError:
        return TransportFailure("timeout", f"no answer within {timeout:g} s", time.perf_counter() - started)
    except aiohttp.ClientError as exc:
        return TransportFailure("connection", type(exc).__name__, time.perf_counter() - started)
    except OSError as exc:
        return TransportFailure("connection", type(exc).__name__, time.perf_counter() - started)
