"""The traffic of a chaos run: valid orders through the signed webhook and from a direct Kafka producer, and bad
input through both, each sent the way a real sender would across the daemon's and the broker's outages.

- A webhook is retried with the same ``webhook-id`` (and a fresh signature) after a connection error, a timeout,
  a 5xx or a 409 (the first request with that id is still in progress); an order counts as sent once it got a 202.
- A record counts as sent once the broker acknowledged it (acks=all); failed sends are sent again, with the same
  event, by a new producer if need be.
- `Gate` keeps the senders close to what the sinks have delivered, so orders flow for the whole run and every
  chaos event happens while they do.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from chaos.malformed import BadRecord, BadWebhook
from daemon.signature import ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from topics.codec import encode
from topics.envelope import OrderEvent

_RETRYABLE = frozenset({409, 429, 500, 502, 503, 504})
_POST_TIMEOUT = aiohttp.ClientTimeout(total=20)


@dataclass
class SendStats:
    """What the senders did; the report shows it."""

    webhook_sent: int = 0
    kafka_sent: int = 0
    webhook_attempts: int = 0
    webhook_answers: Counter[str] = field(default_factory=Counter)
    webhook_refused_valid: list[str] = field(default_factory=list)  # valid orders answered 4xx: must stay empty
    kafka_send_failures: int = 0
    bad_webhook_answers: Counter[str] = field(default_factory=Counter)
    bad_webhook_unexpected: list[dict[str, object]] = field(default_factory=list)
    bad_records_sent: int = 0
    sent_numbers: set[str] = field(default_factory=set)

    @property
    def valid_sent(self) -> int:
        return self.webhook_sent + self.kafka_sent


class Gate:
    """Paces the senders: at most `rate` orders per second (None: no limit), at most `ahead` orders before the
    slowest sink, and never past `cap` (the chaos events move it on)."""

    def __init__(
        self, rate: float | None, ahead: int, delivered: Callable[[], int], sent: Callable[[], int], cap: int
    ) -> None:
        self.ahead = ahead
        self.cap = cap
        self._interval = 1.0 / rate if rate else 0.0
        self._next = time.monotonic()
        self._delivered = delivered
        self._sent = sent

    async def wait(self, orders: int = 1) -> None:
        # Polls: `delivered` is a sample of the sandbox's counts, which nothing signals.
        while self._sent() >= self.cap or self._sent() - self._delivered() >= self.ahead:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        now = time.monotonic()
        self._next = max(self._next, now - 1.0) + orders * self._interval  # at most 1 s of unused pace carries over
        if self._next > now:
            await asyncio.sleep(self._next - now)


class WebhookSender:
    """POST /v1/orders like a Standard Webhooks sender: signed, retried with the same id until answered."""

    def __init__(self, url: str, secret: str, session: aiohttp.ClientSession, stats: SendStats) -> None:
        self.url = url
        self.secret = secret
        self.session = session
        self.stats = stats

    async def post(self, msg_id: str, body: bytes, content_type: str = "application/json") -> int:
        """The first answer that is not "try again": 202, or a 4xx."""
        delay = 0.1
        while True:
            timestamp = int(time.time())
            headers = {
                "Content-Type": content_type,
                ID_HEADER: msg_id,
                TIMESTAMP_HEADER: str(timestamp),
                SIGNATURE_HEADER: sign(self.secret, msg_id, timestamp, body),
            }
            self.stats.webhook_attempts += 1
            retry_after = None
            try:
                # A file object: aiohttp warns that large raw bytes might block the loop while it sends them.
                data = io.BytesIO(body)
                async with self.session.post(self.url, data=data, headers=headers, timeout=_POST_TIMEOUT) as answer:
                    await answer.read()
                    status = answer.status
                    retry_after = answer.headers.get("Retry-After")
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.stats.webhook_answers[type(exc).__name__] += 1
            else:
                self.stats.webhook_answers[str(status)] += 1
                if status not in _RETRYABLE:
                    return status
            wait = delay
            if retry_after is not None and retry_after.isdigit():
                wait = min(float(retry_after), 5.0)
            await asyncio.sleep(wait * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 2.0)

    async def send_order(self, number: str, body: bytes) -> None:
        status = await self.post(f"msg_{number}", body)
        if status == 202:
            self.stats.webhook_sent += 1
            self.stats.sent_numbers.add(number)
        else:
            self.stats.webhook_refused_valid.append(f"{number}: {status}")

    async def send_bad(self, index: int, case: BadWebhook) -> None:
        status = await self.post(f"msg_bad_{index:05d}", case.body, case.content_type)
        self.stats.bad_webhook_answers[str(status)] += 1
        if status != case.status:
            self.stats.bad_webhook_unexpected.append({"index": index, "kind": case.kind, "status": status})


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A record for the direct producer; valid ones (with a `number`) count as sent orders once acknowledged."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    number: str | None  # the order number of a valid record


def outgoing_event(event: OrderEvent) -> Outgoing:
    record = encode(event)
    return Outgoing(record.key, record.value, record.headers, event.order.order_number)


def outgoing_bad(record: BadRecord) -> Outgoing:
    return Outgoing(record.key, record.value, record.headers, None)


class KafkaSender:
    """An upstream producer (acks=all, idempotent) that sends each record until the broker acknowledges it."""

    def __init__(self, bootstrap: str, topic: str, stats: SendStats) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.stats = stats
        self._producer: AIOKafkaProducer | None = None

    async def _ensure(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                acks="all",
                enable_idempotence=True,
                linger_ms=5,
                request_timeout_ms=10_000,
                max_request_size=2 * 1_048_576,
            )
            try:
                await producer.start()
            except BaseException:
                await producer.stop()
                raise
            self._producer = producer
        return self._producer

    async def _reset(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 10)

    async def send(self, records: Sequence[Outgoing]) -> None:
        """Send `records` until every one is acknowledged (a batch at a time, order kept per key)."""
        pending = list(records)
        delay = 0.2
        while pending:
            try:
                producer = await self._ensure()
                futures = [
                    await producer.send(self.topic, value=r.value, key=r.key, headers=r.headers) for r in pending
                ]
                results = await asyncio.gather(*futures, return_exceptions=True)
            except (KafkaError, OSError, TimeoutError):
                self.stats.kafka_send_failures += 1
                await self._reset()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 3.0)
                continue
            failed = []
            for record, result in zip(pending, results, strict=True):
                if isinstance(result, BaseException):
                    failed.append(record)
                elif record.number is not None:
                    self.stats.kafka_sent += 1
                    self.stats.sent_numbers.add(record.number)
                else:
                    self.stats.bad_records_sent += 1
            if failed:
                self.stats.kafka_send_failures += len(failed)
                await self._reset()  # resend with a new producer: a failed idempotent producer may be fenced
                await asyncio.sleep(delay)
                delay = min(delay * 2, 3.0)
            pending = failed

    async def close(self) -> None:
        await self._reset()
