"""The webhook ingest: ``POST /v1/orders`` checks an order and publishes it to Kafka, exactly once per key.

The checks run cheapest first, and every answer has one cause:

1. content type (415), declared body size (413);
2. the Standard Webhooks signature, when secrets are configured (401): its headers present and fresh before the
   body is read (the rest of it is dropped, and the connection closed), then the body's digest;
3. the idempotency key is well-formed (400): the signed ``webhook-id`` when signatures are on (an
   ``Idempotency-Key`` is ignored then), else ``Idempotency-Key``, else ``webhook-id``; a body with its own
   ``event_id`` is keyed by that instead, once parsed;
4. the body is a valid order submission (400 with field errors);
5. the key: a repeat gets the first answer and publishes nothing; another body under it is 422; a repeat while the
   first is still publishing is 409;
6. publish with acks=all; 202 ``{event_id, topic, partition, offset}`` only after the broker acknowledged;
   503 with Retry-After while Kafka is unreachable (nothing half-published: see `daemon.publisher`), or when the
   key store fails to claim the key (nothing published either).

Without an event id of its own, a submission's is derived from its idempotency key and body (without a key, from
a body that carries its ``occurred_at``; see `_event_id`), so even the one unavoidable republish (a crash between
the broker's ack and the answer reaching the key store's file, see `daemon.ingest_keys`), or a retry after a
publish that timed out, carries the same event id and is deduplicated by every sink.

Every answer is counted by status code (`daemon.ingest_metrics`) and logged as one event with its status, the
problem code and, once the body is parsed, the event id and order number; never the body, its field values or
the idempotency key, which a client may have built from personal data. A refusal is logged at INFO (WARNING when
Kafka is unavailable), an accepted order at DEBUG, as the sinks log each delivery: one INFO line per order would,
past a few hundred orders a second, exceed journald's default rate limit (10,000 messages in 30 s per service),
and journald would then drop the service's messages, warnings and errors included, until the burst ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from aiohttp import HttpVersion11, hdrs, web
from prometheus_client import CollectorRegistry

from consumers.clock import SystemClock
from consumers.deadlines import Deadlines
from daemon.ingest_keys import Busy, Claim, Claimed, Conflict, IngestKeyStore, Replay, body_sha256
from daemon.ingest_metrics import IngestMetrics
from daemon.problems import problem
from daemon.publisher import BrokerUnavailable, Published, Publisher, PublishPending, PublishRefused
from daemon.signature import SignatureError, Signed, WebhookVerifier
from topics.codec import encode, parse_submission
from topics.envelope import OrderSubmission, to_event
from topics.errors import ContractError, FieldError, OrderbusError, PublishError, StoreError

log = logging.getLogger(__name__)

# Derived event ids (`_event_id`): uuid5 in this namespace of the idempotency key and the body's digest.
EVENT_ID_NAMESPACE = uuid.UUID("6f1c2a52-0a7e-4d0e-9a51-3f0f3c1c9b10")
_KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,255}$")
_EVENT_KEY = "event_id:"  # the key of a submission that carries its own event_id (a UUID), after this prefix
_JSON_TYPES = ("application/json",)


@dataclass(frozen=True, slots=True)
class IngestConfig:
    """What the handler needs from `daemon.settings.IngestSettings`."""

    max_body_bytes: int = 1_048_576
    # The bodies of the requests under way, together (`Ingest._hold`): past it a request is 503.
    body_buffer_bytes: int = 64 * 1_048_576
    body_timeout: float = 30.0
    publish_timeout: float = 10.0
    retry_after: int = 5
    source: str = "webhook"


class Ingest:
    """The ``POST /v1/orders`` handler and the bookkeeping of publishes that outlive their request."""

    def __init__(
        self,
        publisher: Publisher,
        keys: IngestKeyStore,
        config: IngestConfig,
        *,
        verifier: WebhookVerifier | None = None,
        clock: Callable[[], float] = time.time,
        metrics: IngestMetrics | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        deadlines: Deadlines | None = None,
    ) -> None:
        """`metrics` defaults to a private registry (nothing scrapes it); `monotonic` times the publishes;
        `deadlines` bounds the reading of a body that does not arrive at once."""
        self._publisher = publisher
        self._keys = keys
        self._config = config
        self._verifier = verifier
        self._clock = clock
        self._metrics = metrics if metrics is not None else IngestMetrics(CollectorRegistry())
        self._monotonic = monotonic
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._deadlines = deadlines if deadlines is not None else Deadlines(SystemClock())
        self.buffered = 0  # bytes of the bodies held by requests under way (`_hold`)

    async def post_order(self, request: web.Request) -> web.Response:
        held = _Held()
        try:
            response = await self._answer(request, held)
        except web.HTTPException as exc:
            self._metrics.answered(exc.status)
            raise
        except Exception:
            self._metrics.answered(500)  # aiohttp answers 500 and logs the traceback
            raise
        finally:
            self.buffered -= held.bytes
        self._metrics.answered(response.status)
        return response

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: a body declared larger than the limit is refused before the client sends it
        (aiohttp's own handler asks for every body, then the 413 comes after the upload); otherwise as aiohttp's."""
        if request.version != HttpVersion11:
            return None
        expect = request.headers.get(hdrs.EXPECT, "")
        declared = request.content_length
        if expect.lower() != "100-continue":
            refusal = _refused(417, "expectation-failed", "the only Expect this server answers is 100-continue")
        elif isinstance(head := self._check_head(request), web.Response):  # the answers' order as without Expect
            refusal = head
        elif declared is not None and not self._fits(declared):
            refusal = self._buffer_full()
        else:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the answer's own bytes start after the interim response
            return None
        # The body was never sent: the connection closes, or its next request would be read as that body.
        refusal.force_close()
        self._metrics.answered(refusal.status)
        return refusal

    def _check_head(self, request: web.Request) -> Signed | web.Response | None:
        """What the request's head alone decides, before its body is read (with `Expect` too, before it is sent):
        the 415 of a body the ingest does not read, the 413 of one declared too large, the 401 of signature headers
        missing, stale or offering no ``v1`` entry; else the signature headers (None when signatures are off). So
        such a request takes no share of the body buffer (answered at once; aiohttp then reads and drops what is
        left of the body, 10 s at most, and closes the connection)."""
        if (unacceptable := _unacceptable(request)) is not None:
            return unacceptable
        if (declared := request.content_length) is not None and declared > self._config.max_body_bytes:
            return self._too_large()
        if self._verifier is None:
            return None
        try:
            return self._verifier.check_headers(request.headers)
        except SignatureError as exc:
            return _refused(401, "invalid-signature", str(exc))

    async def _answer(self, request: web.Request, held: _Held) -> web.Response:
        if isinstance(signed := self._check_head(request), web.Response):
            if signed.status == 401:  # an unsigned sender's connection is not kept for its next request
                signed.force_close()
            return signed
        try:
            body = await self._read_body(request, held)
        except _BufferFull:
            return self._buffer_full()
        except web.RequestPayloadError as exc:  # a malformed chunked body, for one
            return _refused(400, "unreadable-body", f"the body could not be read: {exc}")
        except ConnectionError:  # the client went away mid-body: not a 500, nor a malformed body (400)
            return _client_gone()
        except TimeoutError:
            timeout = self._config.body_timeout
            detail = (
                f"the body did not arrive whole within {timeout:g} s (or its chunked encoding broke); send it again"
            )
            response = _refused(408, "body-timeout", detail)
            response.force_close()  # the rest of the body may still come, and would be read as the next request
            return response
        if body is None:
            return self._too_large()
        if self._verifier is not None and signed is not None:
            try:
                self._verifier.matches(signed, body)
            except SignatureError as exc:
                return _refused(401, "invalid-signature", str(exc))
        key, header = _idempotency_key(request.headers, signed=self._verifier is not None)
        if key is not None and not _KEY_PATTERN.match(key):
            detail = f"{header}: an idempotency key is 1-255 visible ASCII characters (no space or control character)"
            return _refused(400, "invalid-idempotency-key", detail)

        try:
            submission = parse_submission(body)
        except ContractError as exc:
            # Only the count: a field path can hold a client's unknown key, and that can be anything.
            return _refused(
                400,
                "invalid-order",
                "the order breaks the contract",
                errors=exc.errors,
                context={"fields": len(exc.errors)},
            )
        digest = body_sha256(body)
        if submission.event_id is not None:
            # The sender's own id of the event keys it: sent again under another webhook-id or Idempotency-Key with
            # another body, it would be published, then skipped by every sink as the duplicate it claims to be.
            key = f"{_EVENT_KEY}{submission.event_id}"
        if key is None:
            return await self._publish(submission, None, digest)
        # Claimed inline, not in a coroutine of its own: each await level is paid again at every resumption.
        try:
            claim = await self._keys.claim(key, digest, self._clock())
        except StoreError as exc:  # nothing published, the key not taken: a retry with it is safe
            detail = "the idempotency key store failed; nothing was published"
            context = {"order": submission.order.order_number, "error": str(exc)}
            return self._unavailable(detail, context, "key-store-unavailable")
        if isinstance(claim, Claimed):
            return await self._publish(submission, key, digest)
        return self._unclaimed(key, claim, submission.order.order_number)

    async def _read_body(self, request: web.Request, held: _Held) -> bytes | None:
        """The whole body, or None once a chunked one exceeds the limit; `TimeoutError` if it has not
        arrived within ``body_timeout`` (a stalled client would otherwise hold its request, and the memory of what
        it sent, until TCP gives up on it: hours); `_BufferFull` if it does not fit in what is left of
        ``body_buffer_bytes`` (`_hold`)."""
        limit = self._config.max_body_bytes
        declared = request.content_length
        if declared is not None:  # within the limit (`_answer` refused it before)
            # Mostly all there already: then no deadline to keep (one per request would cost the hot path).
            head = request.content.read_nowait(declared)
            self._hold(held, len(head))  # what arrived, not what is declared: a head alone holds nothing
            if len(head) == declared:
                return head
            # The rest as it comes; a stream that ends early returns what came, which the checks refuse.
            body = bytearray(head)
            await self._read_into(body, declared, request, held)
            return bytes(body)
        # Chunked: up to one byte past the limit.
        body = bytearray()
        await self._read_into(body, limit + 1, request, held)
        return None if len(body) > limit else bytes(body)

    async def _read_into(self, body: bytearray, size: int, request: web.Request, held: _Held) -> None:
        """Read into `body` until it holds `size` bytes or the stream ends, each piece counted (`_hold`), within
        ``body_timeout`` (read(n) returns what has arrived, up to n bytes: a large body comes in several pieces)."""
        with self._deadlines.within(self._config.body_timeout):
            while len(body) < size and (piece := await request.content.read(size - len(body))):
                self._hold(held, len(piece))
                body += piece

    def _hold(self, held: _Held, size: int) -> None:
        """Count `size` more bytes of body for this request, or raise `_BufferFull` if they do not fit.

        Why: ``ingest.max_connections`` requests may each be reading a body of up to ``max_body_bytes`` (1,024 of 1
        MiB: a gigabyte), slowly, within ``body_timeout``; `body_buffer_bytes` bounds them together. A request
        refused here is answered 503 with Retry-After, and aiohttp reads the rest of its body and drops it."""
        if not self._fits(size):
            raise _BufferFull
        self.buffered += size
        held.bytes += size

    def _fits(self, size: int) -> bool:
        return self.buffered + size <= self._config.body_buffer_bytes

    def _unclaimed(self, key: str, claim: Claim, order: str) -> web.Response:
        """The answer to a request whose key another request has, or had: the first answer again, or a refusal."""
        match claim:
            case Replay(status=status, body=body):
                log.debug("answer replayed for a repeated idempotency key", extra={"status": status, "order": order})
                return web.Response(
                    status=status,
                    body=body,
                    content_type="application/json",
                    headers={"Idempotent-Replayed": "true"},
                )
            case Conflict():
                used = "this event_id" if key.startswith(_EVENT_KEY) else "this idempotency key"
                detail = (
                    f"{used} was used with another body (compared byte for byte: a retry sends the same bytes); "
                    "the first body's answer stands"
                )
                if used == "this event_id":
                    detail += "; a new event needs a new event_id"
                return _refused(422, "idempotency-key-reused", detail, context={"order": order})
            case Busy() if key in self._pending:
                return self._unavailable("the first request with this key is still waiting for Kafka", {"order": order})
            case Busy():
                detail = "a request with this idempotency key is in progress; send it again in a moment"
                headers = {"Retry-After": "1"}
                return _refused(409, "request-in-progress", detail, headers=headers, context={"order": order})
        raise AssertionError(f"unexpected claim {claim!r}")  # pragma: no cover

    async def _publish(self, submission: OrderSubmission, key: str | None, digest: str) -> web.Response:
        event = to_event(
            submission,
            event_id=_event_id(submission, key, digest),
            source=self._config.source,
            now=datetime.fromtimestamp(self._clock(), UTC),
        )
        ids = {"event_id": str(event.event_id), "order": event.order.order_number}
        started = self._monotonic()
        try:
            published = await self._publisher.publish(encode(event), timeout=self._config.publish_timeout)
        except PublishPending as pending:
            self._metrics.publish_seconds.observe(self._monotonic() - started)
            if key is not None:
                self._track(key, event.event_id, pending.future)
            detail = "kafka did not acknowledge in time; it may still publish the order: retry with the same request"
            if key is None and submission.event_id is None and submission.occurred_at is None:
                detail += " and an Idempotency-Key, or a retry may be a second order"
            return self._unavailable(detail, {**ids, "error": "publish pending"})
        except (BrokerUnavailable, PublishError) as exc:
            if key is not None:
                await self._keys.release(key)
            said = str(exc) if isinstance(exc, BrokerUnavailable | PublishRefused) else "kafka is unreachable"
            return self._unavailable(f"{said}; nothing was published", {**ids, "error": str(exc)})
        except BaseException:  # a bug (500) or a cancellation: the key must not stay held by a request that ended
            if key is not None:
                with contextlib.suppress(StoreError):  # a store closed at shutdown must not hide the first error
                    await self._keys.release(key)
            raise
        self._metrics.publish_seconds.observe(self._monotonic() - started)
        answer = _answer(ids["event_id"], published)
        if key is not None:
            await self._remember(key, answer)
        if log.isEnabledFor(logging.DEBUG):  # not even its fields are built per request at INFO
            log.debug(
                "order published",
                extra={**ids, "status": 202, "partition": published.partition, "offset": published.offset},
            )
        return web.Response(status=202, body=answer, content_type="application/json")

    async def _remember(self, key: str, answer: bytes) -> None:
        try:
            await self._keys.complete(key, 202, answer, self._clock())
        except StoreError as exc:
            # The record is on the topic; a retry after a restart republishes it with the same event id.
            log.error("could not store the answer for an idempotency key: %s", exc)

    def _track(self, key: str, event_id: uuid.UUID, future: asyncio.Future[Published]) -> None:
        """Keep `key` in flight until the late publish resolves, then store its answer or release the key."""
        task = asyncio.create_task(self._settle(key, event_id, future), name="ingest-settle")
        self._pending[key] = task
        task.add_done_callback(lambda _: self._pending.pop(key, None))

    async def _settle(self, key: str, event_id: uuid.UUID, future: asyncio.Future[Published]) -> None:
        try:
            published = await future
        except PublishError as exc:
            log.warning("late publish failed", extra={"event_id": str(event_id), "error": str(exc)})
            await self._keys.release(key)
            return
        except Exception:  # a bug: said with its traceback, and the key is free for a retry
            log.exception("late publish ended with an unexpected error", extra={"event_id": str(event_id)})
            await self._keys.release(key)
            return
        await self._remember(key, _answer(str(event_id), published))

    async def close(self) -> None:
        """Stop waiting for late publishes; their keys stay in flight and are re-claimable after a restart."""
        for task in list(self._pending.values()):
            task.cancel()
        await asyncio.gather(*self._pending.values(), return_exceptions=True)

    def _too_large(self) -> web.Response:
        return _refused(413, "body-too-large", f"the body exceeds {self._config.max_body_bytes} bytes")

    def _buffer_full(self) -> web.Response:
        detail = "the bodies of the requests under way fill this server's buffer; nothing was published"
        return self._unavailable(detail, {}, code="body-buffer-full")

    def _unavailable(self, detail: str, context: Mapping[str, object], code: str = "kafka-unavailable") -> web.Response:
        retry = str(self._config.retry_after)
        return _refused(503, code, detail, headers={"Retry-After": retry}, context=context)


class _Held:
    """The bytes of body one request holds of ``body_buffer_bytes`` (`Ingest._hold`), given back when it ends."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


class _BufferFull(OrderbusError):
    """A body does not fit in what is left of ``body_buffer_bytes``."""


# nginx's "client closed request": counted in ``orderbus_ingest_requests_total{code="499"}`` apart from the 400s of
# malformed bodies, and never read by anyone (the client is gone).
CLIENT_GONE: Final = 499


def _client_gone() -> web.Response:
    log.info("order not read: the client went away before its body arrived whole", extra={"status": CLIENT_GONE})
    response = web.Response(status=CLIENT_GONE, reason="Client Closed Request")
    response.force_close()
    return response


def _unacceptable(request: web.Request) -> web.Response | None:
    """The 415 of a body that is not JSON or that is compressed; None for one the ingest reads."""
    if request.content_type not in _JSON_TYPES:
        return _refused(415, "unsupported-media-type", "send the order as Content-Type: application/json")
    if request.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
        # aiohttp would inflate it, but the signature covers the bytes as sent and the limits the bytes read.
        return _refused(415, "unsupported-content-encoding", "send the body uncompressed (no Content-Encoding)")
    return None


def _refused(
    status: int,
    code: str,
    detail: str,
    *,
    errors: Sequence[FieldError] = (),
    headers: dict[str, str] | None = None,
    context: Mapping[str, object] | None = None,
) -> web.Response:
    """The problem answer, logged as one event: status, problem code, and `context` (ids and counts only)."""
    level = logging.WARNING if status >= 500 else logging.INFO
    log.log(level, "order refused", extra={"status": status, "problem": code, **(context or {})})
    return problem(status, code, detail, errors=errors, headers=headers)


def _idempotency_key(headers: Mapping[str, str], *, signed: bool) -> tuple[str | None, str]:
    """The request's idempotency key and the header it came from.

    Signed (``ingest.webhook_secrets`` set): the ``webhook-id`` the signature covers, which Standard Webhooks makes
    the message's idempotency key (the same on every retry of a message). An ``Idempotency-Key`` header is not
    signed and is ignored then: had it won, anyone who captured a signed request could send it again within the
    signature's 5 minutes under new keys, each a new event (an old ``order.updated`` state applied again).
    Unsigned: ``Idempotency-Key``, else ``webhook-id``.
    """
    if signed:
        return headers.get("webhook-id"), "webhook-id"
    key = headers.get("Idempotency-Key")
    if key is not None:
        return key, "Idempotency-Key"
    return headers.get("webhook-id"), "webhook-id"


def _event_id(submission: OrderSubmission, key: str | None, digest: str) -> uuid.UUID:
    """The submission's own event id, else one derived from its key and body (`digest`), or from a body that says
    when it happened (``occurred_at``); a new one for a body without a key and without a time.

    Derived, so a retry of the same request -- after a 503, a lost answer, a crash -- is the same event, which every
    sink recognises. The body is part of it because the key store forgets keys after its retention, shorter than the
    sinks': a key used again later for another order must not make that order a duplicate of the first. A body alone
    says which event it is only with its time: ``order.updated`` to state A, then B, then A again, sent without keys
    or times, are three events. The key's characters are printable ASCII without a newline, so the two parts of the
    name cannot run into each other.
    """
    if submission.event_id is not None:
        return submission.event_id
    if key is not None:
        return uuid.uuid5(EVENT_ID_NAMESPACE, f"{key}\n{digest}")
    if submission.occurred_at is not None:
        return uuid.uuid5(EVENT_ID_NAMESPACE, digest)
    return uuid.uuid4()


def _answer(event_id: str, published: Published) -> bytes:
    """The 202 body, as ``json.dumps`` writes it. Formatted directly (a sixth of json.dumps' cost): every value is
    JSON as it stands -- a UUID's text (`event_id`), a Kafka topic name (ASCII letters, digits, ``.``, ``_``,
    ``-``), integers."""
    return (
        f'{{"event_id": "{event_id}", "topic": "{published.topic}", '
        f'"partition": {published.partition:d}, "offset": {published.offset:d}}}'
    ).encode()
