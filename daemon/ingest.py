"""The webhook ingest: ``POST /v1/orders`` checks an order and publishes it to Kafka, exactly once per key.

The checks run cheapest first, and every answer has one cause:

1. content type (415), body size (413);
2. the Standard Webhooks signature, when secrets are configured (401);
3. the idempotency key (``Idempotency-Key``, else ``webhook-id``) is well-formed (400);
4. the body is a valid order submission (400 with field errors);
5. the key: a repeat gets the first answer and publishes nothing; another body under it is 422; a repeat while the
   first is still publishing is 409;
6. publish with acks=all; 202 ``{event_id, topic, partition, offset}`` only after the broker acknowledged;
   503 with Retry-After while Kafka is unreachable (nothing half-published: see `daemon.publisher`).

The event id of a keyed submission is derived from the key, so even the one unavoidable republish (a crash
between the broker's ack and storing the answer) carries the same event id and is deduplicated by every sink.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web

from daemon.ingest_keys import Busy, Claimed, Conflict, IngestKeyStore, Replay
from daemon.problems import problem
from daemon.publisher import BrokerUnavailable, Published, Publisher, PublishPending
from daemon.signature import SignatureError, WebhookVerifier
from topics.codec import encode, parse_submission
from topics.envelope import OrderSubmission, to_event
from topics.errors import ContractError, PublishError, StoreError

log = logging.getLogger(__name__)

# Event ids of keyed submissions: uuid5 in this namespace of the idempotency key.
EVENT_ID_NAMESPACE = uuid.UUID("6f1c2a52-0a7e-4d0e-9a51-3f0f3c1c9b10")
_KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,255}$")
_JSON_TYPES = ("application/json",)


@dataclass(frozen=True, slots=True)
class IngestConfig:
    """What the handler needs from `daemon.settings.IngestSettings`."""

    max_body_bytes: int = 1_048_576
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
    ) -> None:
        self._publisher = publisher
        self._keys = keys
        self._config = config
        self._verifier = verifier
        self._clock = clock
        self._pending: dict[str, asyncio.Task[None]] = {}

    async def post_order(self, request: web.Request) -> web.Response:
        if request.content_type not in _JSON_TYPES:
            return problem(415, "unsupported-media-type", "send the order as Content-Type: application/json")
        body = await self._read_body(request)
        if body is None:
            return problem(413, "body-too-large", f"the body exceeds {self._config.max_body_bytes} bytes")
        if self._verifier is not None:
            try:
                self._verifier.verify(request.headers, body)
            except SignatureError as exc:
                return problem(401, "invalid-signature", str(exc))
        key = request.headers.get("Idempotency-Key") or request.headers.get("webhook-id")
        if key is not None and not _KEY_PATTERN.match(key):
            return problem(400, "invalid-idempotency-key", "an idempotency key is 1-255 printable ASCII characters")
        try:
            submission = parse_submission(body)
        except ContractError as exc:
            return problem(400, "invalid-order", "the order breaks the contract", errors=exc.errors)
        if key is None:
            return await self._publish(submission, None)
        return await self._publish_once(key, hashlib.sha256(body).hexdigest(), submission)

    async def _read_body(self, request: web.Request) -> bytes | None:
        limit = self._config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return None
        body = await request.content.read(limit + 1)
        return None if len(body) > limit else body

    async def _publish_once(self, key: str, digest: str, submission: OrderSubmission) -> web.Response:
        claim = await self._keys.claim(key, digest, self._clock())
        match claim:
            case Replay(status=status, body=body):
                return web.Response(
                    status=status,
                    body=body,
                    content_type="application/json",
                    headers={"Idempotent-Replayed": "true"},
                )
            case Conflict():
                return problem(422, "idempotency-key-reused", "this idempotency key was used with another body")
            case Busy() if key in self._pending:
                return self._unavailable("the first request with this key is still waiting for Kafka")
            case Busy():
                return problem(409, "request-in-progress", "a request with this idempotency key is in progress")
            case Claimed():
                return await self._publish(submission, key)
        raise AssertionError(f"unexpected claim {claim!r}")  # pragma: no cover

    async def _publish(self, submission: OrderSubmission, key: str | None) -> web.Response:
        event = to_event(
            submission,
            event_id=_event_id(submission, key),
            source=self._config.source,
            now=datetime.fromtimestamp(self._clock(), UTC),
        )
        try:
            published = await self._publisher.publish(encode(event), timeout=self._config.publish_timeout)
        except PublishPending as pending:
            if key is not None:
                self._track(key, event.event_id, pending.future)
            return self._unavailable("kafka did not acknowledge in time; retry with the same idempotency key")
        except (BrokerUnavailable, PublishError) as exc:
            log.warning("publish failed for event %s: %s", event.event_id, exc)
            if key is not None:
                await self._keys.release(key)
            return self._unavailable("kafka is unreachable; nothing was published")
        if key is not None:
            await self._remember(key, _answer(event.event_id, published))
        log.info(
            "order published",
            extra={
                "event_id": str(event.event_id),
                "partition": published.partition,
                "offset": published.offset,
            },
        )
        return web.Response(status=202, body=_answer(event.event_id, published), content_type="application/json")

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
            log.warning("late publish failed for event %s: %s", event_id, exc)
            await self._keys.release(key)
            return
        await self._remember(key, _answer(event_id, published))

    async def close(self) -> None:
        """Stop waiting for late publishes; their keys stay in flight and are re-claimable after a restart."""
        for task in list(self._pending.values()):
            task.cancel()
        await asyncio.gather(*self._pending.values(), return_exceptions=True)

    def _unavailable(self, detail: str) -> web.Response:
        retry = str(self._config.retry_after)
        return problem(503, "kafka-unavailable", detail, headers={"Retry-After": retry})


def _event_id(submission: OrderSubmission, key: str | None) -> uuid.UUID:
    if submission.event_id is not None:
        return submission.event_id
    if key is not None:
        return uuid.uuid5(EVENT_ID_NAMESPACE, key)
    return uuid.uuid4()


def _answer(event_id: uuid.UUID, published: Published) -> bytes:
    return json.dumps(
        {
            "event_id": str(event_id),
            "topic": published.topic,
            "partition": published.partition,
            "offset": published.offset,
        }
    ).encode()
