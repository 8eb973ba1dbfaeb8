"""The demo's shop: sample orders through the signed webhook at a steady pace, as a real shop sends them.

Every message is a Standard Webhooks request (`daemon.signature.sign`); its ``webhook-id`` is its idempotency
key. What `Plan` sends next is drawn from a seeded `random.Random`:

- mostly new orders (order.created), numbered ``SO-<run tag>-<n>`` so that runs never collide;
- updates (order.updated: paid now, another shipping address) and cancels (order.cancelled) of earlier orders,
  each only once the order's previous event was accepted, so one order's events reach Kafka in the order they
  happened;
- repeats: an accepted message sent again under its webhook-id (a shop retrying after a lost answer); the ingest
  answers from its idempotency store and publishes nothing.

A message that got no answer, a 409 (still in progress) or a 5xx is sent again, same webhook-id and body, before
anything new, as webhook senders retry; any other 4xx is counted and dropped (the message itself is wrong).

`Generator` paces the plan: message k is due at start + k / rate on the injected clock (a generator that falls
more than a second behind starts counting afresh instead of bursting), and at most `max_in_flight` requests are
under way. Nothing here prints or logs: the bodies are personal data; `GeneratorStats` holds counts only.
"""

from __future__ import annotations

import asyncio
import random
import string
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Final, Literal
from uuid import UUID

import aiohttp

from consumers.clock import Clock
from daemon.signature import ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from topics.envelope import EventType, OrderSubmission
from topics.order import Order
from topics.samples import sample_order, sample_submission

Kind = Literal["create", "update", "cancel", "repeat"]

# A generator this far behind its schedule (a slow ingest) starts counting afresh rather than bursting.
_MAX_BEHIND = 1.0
# Open orders kept for updates and cancels, and accepted messages kept for repeats: a long run stays small.
_MAX_OPEN: Final = 1000
_RECENT: Final = 64
# Answers after which the same message is sent again: none (connection error, timeout), in progress, server side.
_RETRYABLE: Final = frozenset({0, 409, 429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class Mix:
    """Shares of the messages that are updates, cancels and repeats; the rest are new orders."""

    update: float = 0.15
    cancel: float = 0.05
    repeat: float = 0.02

    def __post_init__(self) -> None:
        if min(self.update, self.cancel, self.repeat) < 0 or self.update + self.cancel + self.repeat > 1:
            raise ValueError(f"shares must be >= 0 and add up to at most 1: {self}")


@dataclass(frozen=True, slots=True)
class Message:
    """One webhook request: `body` is signed anew (fresh timestamp) on every attempt, under the same `msg_id`."""

    kind: Kind
    msg_id: str
    order: Order
    event_type: EventType
    body: bytes
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class Answer:
    """What the ingest said: the status (0: no answer at all) and whether it replayed an earlier answer."""

    status: int
    replayed: bool = False


Post = Callable[[Mapping[str, str], bytes], Awaitable[Answer]]


@dataclass(slots=True)
class GeneratorStats:
    """Counts only (never an order's content), for the live view and the summary."""

    requests: int = 0  # every POST: retries and repeats included
    created: int = 0  # events accepted (202) by kind
    updated: int = 0
    cancelled: int = 0
    repeats: int = 0  # repeats sent
    repeats_replayed: int = 0  # ... answered from the idempotency store (202 + Idempotent-Replayed): all of them
    retries: int = 0  # messages sent again after no answer, 409 or 5xx
    refused: int = 0  # other 4xx: dropped

    @property
    def accepted(self) -> int:
        """Events the ingest published: new orders, updates and cancels."""
        return self.created + self.updated + self.cancelled


class Plan:
    """What to send next and what the answers mean; no I/O and no clock, so every choice is reproducible."""

    def __init__(self, rng: random.Random, mix: Mix | None = None) -> None:
        self._rng = rng
        self._mix = mix or Mix()
        self.tag = "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(4))
        self.stats = GeneratorStats()
        self._created = 0
        self._open: dict[str, Order] = {}  # accepted and not cancelled, oldest first
        self._busy: set[str] = set()  # order numbers with a message under way
        self._recent: deque[Message] = deque(maxlen=_RECENT)
        self._again: deque[Message] = deque()

    def next(self) -> Message:
        """The next message: a retry first, else a draw from the mix (a new order when nothing else fits)."""
        if self._again:
            self.stats.retries += 1
            return self._again.popleft()
        draw = self._rng.random()
        mix = self._mix
        if draw < mix.repeat and self._recent:
            self.stats.repeats += 1
            return replace(self._rng.choice(self._recent), kind="repeat", attempt=1)
        eligible = [number for number in self._open if number not in self._busy]
        if eligible and draw < mix.repeat + mix.cancel:
            return self._change(self._rng.choice(eligible), "order.cancelled")
        if eligible and draw < mix.repeat + mix.cancel + mix.update:
            return self._change(self._rng.choice(eligible), "order.updated")
        return self._create()

    def answered(self, message: Message, answer: Answer) -> None:
        """Book the answer: accepted, sent again later, or dropped."""
        if answer.status in _RETRYABLE:
            self._again.append(replace(message, attempt=message.attempt + 1))
            return
        number = message.order.order_number
        if message.kind == "repeat":
            if answer.status == 202 and answer.replayed:
                self.stats.repeats_replayed += 1
            return
        self._busy.discard(number)
        if answer.status != 202:
            self.stats.refused += 1
            return
        self._recent.append(message)
        if message.kind == "cancel":
            self.stats.cancelled += 1
            self._open.pop(number, None)
            return
        if message.kind == "update":
            self.stats.updated += 1
        else:
            self.stats.created += 1
        self._open[number] = message.order
        if len(self._open) > _MAX_OPEN:
            oldest = next((number for number in self._open if number not in self._busy), None)
            if oldest is not None:
                del self._open[oldest]

    def _create(self) -> Message:
        self._created += 1
        number = f"SO-{self.tag}-{self._created:06d}"
        submission = sample_submission(self._rng, order_number=number, charges=True)
        return self._message("create", submission)

    def _change(self, number: str, event_type: EventType) -> Message:
        order = self._open[number]
        changes: dict[str, object] = {"updated_at": order.updated_at + timedelta(minutes=self._rng.randint(5, 600))}
        if event_type == "order.updated":
            # What shops update: the payment arrived, or the customer gave another shipping address.
            changes["paid"] = True
            if order.paid or self._rng.random() < 0.5:
                changes["shipping_address"] = sample_order(self._rng).shipping_address
        changed = order.model_copy(update=changes)
        submission = OrderSubmission(
            event_type=event_type, occurred_at=changed.updated_at, event_id=self._uuid(), order=changed
        )
        return self._message("update" if event_type == "order.updated" else "cancel", submission)

    def _message(self, kind: Kind, submission: OrderSubmission) -> Message:
        self._busy.add(submission.order.order_number)
        body = submission.model_dump_json().encode()
        msg_id = f"msg_{self._rng.getrandbits(128):032x}"
        return Message(kind, msg_id, submission.order, submission.event_type, body)

    def _uuid(self) -> UUID:
        return UUID(int=self._rng.getrandbits(128), version=4)


def signed_headers(secret: str, message: Message, timestamp: int) -> dict[str, str]:
    """The request headers of one attempt: JSON, and the Standard Webhooks id, timestamp and signature."""
    return {
        "Content-Type": "application/json",
        ID_HEADER: message.msg_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(secret, message.msg_id, timestamp, message.body),
    }


class Generator:
    """Sends `plan`'s messages at `rate` per second through `post`, signed with `secret`, until told to stop."""

    def __init__(
        self,
        post: Post,
        secret: str,
        *,
        rate: float,
        plan: Plan,
        clock: Clock,
        max_in_flight: int = 32,
    ) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0 messages per second, got {rate}")
        self._post = post
        self._secret = secret
        self._interval = 1.0 / rate
        self._plan = plan
        self._clock = clock
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def stats(self) -> GeneratorStats:
        return self._plan.stats

    async def run(self, stop: asyncio.Event, *, max_messages: int | None = None, grace: float = 15.0) -> None:
        """Send until `stop` is set (or `max_messages` were sent), then wait up to `grace` s for the answers."""
        stopped = asyncio.create_task(stop.wait(), name="generator-stop")
        due = self._clock.now()
        sent = 0
        try:
            while not stop.is_set() and (max_messages is None or sent < max_messages):
                if not await self._wait(due, stopped) or not await self._wait_for_slot(stopped):
                    break
                self._send(self._plan.next())
                sent += 1
                due = max(due + self._interval, self._clock.now() - _MAX_BEHIND)
        finally:
            stopped.cancel()
            await self._drain(grace)

    async def _wait(self, due: float, stopped: asyncio.Task[bool]) -> bool:
        """Sleep until `due`; False if told to stop first."""
        delay = due - self._clock.now()
        if delay <= 0:
            return not stopped.done()
        sleeper = asyncio.ensure_future(self._clock.sleep(delay))
        try:
            await asyncio.wait((sleeper, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
        return not stopped.done()

    async def _wait_for_slot(self, stopped: asyncio.Task[bool]) -> bool:
        if not self._slots.locked():
            await self._slots.acquire()
            return True
        slot = asyncio.ensure_future(self._slots.acquire())
        await asyncio.wait((slot, stopped), return_when=asyncio.FIRST_COMPLETED)
        if slot.done():
            return True
        slot.cancel()
        return False

    def _send(self, message: Message) -> None:
        task = asyncio.create_task(self._attempt(message), name="generator-post")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _attempt(self, message: Message) -> None:
        try:
            self._plan.stats.requests += 1
            headers = signed_headers(self._secret, message, int(self._clock.wall()))
            self._plan.answered(message, await self._post(headers, message.body))
        finally:
            self._slots.release()

    async def _drain(self, grace: float) -> None:
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def http_poster(session: aiohttp.ClientSession, url: str, *, timeout: float = 15.0) -> Post:
    """POST to the ingest at `url`; a connection error or a timeout is status 0 (the message is sent again)."""
    client_timeout = aiohttp.ClientTimeout(total=timeout)

    async def post(headers: Mapping[str, str], body: bytes) -> Answer:
        try:
            async with session.post(url, data=body, headers=dict(headers), timeout=client_timeout) as response:
                await response.read()
                return Answer(response.status, response.headers.get("Idempotent-Replayed") == "true")
        except (aiohttp.ClientError, TimeoutError):
            return Answer(0)

    return post
