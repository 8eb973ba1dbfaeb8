"""One HTTP attempt against a downstream system, and where the HTTP client's errors become outcomes.

An attempt ends in a `Reply` (the system answered, whatever the status) or a `TransportFailure` (it did not:
a timeout, a connection error, or a request that could not be sent at all). What either means is the policy's
business, not this module's.
"""

from __future__ import annotations

import hashlib
import re
import ssl
import time
from dataclasses import dataclass
from typing import Literal

from consumers.deadlines import Deadlines
from consumers.http_client import HttpClient
from consumers.sink import HttpRequest
from topics.errors import HttpClientError, InvalidRequestError

BODY_EXCERPT = 1024
_HTML = re.compile(r"\s*(text/html|application/xhtml\+xml)\s*(;|$)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    retry_after: str | None
    body: bytes
    elapsed: float
    content_type: str | None = None
    location: str | None = None

    @property
    def html(self) -> bool:
        """Whether the answer is a web page: labelled so (``Content-Type: text/html``) and markup (its first byte but
        spaces is ``<``). No API's answer, but a site's, a login page's or a proxy's (a `base_url` that points at the
        wrong place). The label alone is not enough: Flask, Express and PHP label what they send text/html unless
        told otherwise, JSON and "OK" included."""
        return (
            self.content_type is not None
            and _HTML.match(self.content_type) is not None
            and self.body[:256].lstrip()[:1] == b"<"
        )

    @property
    def excerpt(self) -> str:
        return self.body[:BODY_EXCERPT].decode("utf-8", "replace")

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


@dataclass(frozen=True, slots=True)
class TransportFailure:
    kind: Literal["timeout", "connection", "invalid_request"]
    detail: str
    elapsed: float
    certificate_refused: bool = False  # the server's TLS certificate was not trusted: configuration, not the network


async def attempt(
    client: HttpClient,
    request: HttpRequest,
    *,
    idempotency_key: str | None,
    auth_headers: dict[str, str],
    timeout: float,
    deadlines: Deadlines,
    max_body: int = 64 * 1024,
) -> Reply | TransportFailure:
    """Send `request` once with its idempotency key (None: a read, which has none), within `timeout` (kept by
    `deadlines`); never raises for network trouble."""
    headers = {**request.headers, **auth_headers}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    started = time.perf_counter()
    try:
        with deadlines.within(timeout):
            answer = await client.request(
                request.method, request.url, body=request.body, headers=headers, max_body=max_body
            )
    except TimeoutError:
        return TransportFailure("timeout", f"no answer within {timeout:g} s", time.perf_counter() - started)
    except InvalidRequestError as exc:
        return TransportFailure("invalid_request", str(exc), time.perf_counter() - started)
    except HttpClientError as exc:
        refused = isinstance(exc.__cause__, ssl.SSLCertVerificationError)
        return TransportFailure("connection", f"{type(exc).__name__}: {exc}", time.perf_counter() - started, refused)
    elapsed = time.perf_counter() - started
    return Reply(answer.status, answer.retry_after, answer.body, elapsed, answer.content_type, answer.location)
