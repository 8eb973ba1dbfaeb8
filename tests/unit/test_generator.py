"""The demo's generator: pace on an injected clock, valid signatures, idempotency keys, and the order of events.

`FakeIngest` stands in for ``POST /v1/orders``: it verifies each signature as the daemon does, answers a repeated
webhook-id with the stored answer, and keeps every order's accepted events in arrival order.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest

from consumers.clock import FakeClock
from daemon.generator import Answer, Generator, Message, Mix, Plan
from daemon.signature import WebhookVerifier
from topics.codec import parse_submission
from topics.envelope import OrderSubmission

SECRET = "whsec_dGVzdC1zZWNyZXQtb2YtdGhlLWdlbmVyYXRvcg"


@dataclass(frozen=True)
class Request:
    at: float
    msg_id: str
    body: bytes
    signature: str


@dataclass
class FakeIngest:
    """Verifies, replays repeated keys, records; `answers` scripts the status of a webhook-id's first attempts."""

    clock: FakeClock
    delay: float = 0.0
    first_delay: float | None = None  # the first request's, if other
    answers: dict[str, list[int]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    accepted: dict[str, bytes] = field(default_factory=dict)  # webhook-id -> digest of the body first accepted
    events: dict[str, list[str]] = field(default_factory=dict)  # order number -> event types, accepted order
    in_flight: int = 0
    most_in_flight: int = 0

    async def __call__(self, headers: Mapping[str, str], body: bytes) -> Answer:
        msg_id = WebhookVerifier([SECRET], clock=self.clock.wall).verify(headers, body)
        self.requests.append(Request(self.clock.now(), msg_id, body, headers["webhook-signature"]))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            first = len(self.requests) == 1 and self.first_delay is not None
            await self.clock.sleep(self.first_delay if first and self.first_delay is not None else self.delay)
        finally:
            self.in_flight -= 1
        scripted = self.answers.get(msg_id)
        if scripted:
            return Answer(scripted.pop(0))
        digest = hashlib.sha256(body).digest()
        if msg_id in self.accepted:
            return Answer(202 if self.accepted[msg_id] == digest else 422, replayed=True)
        self.accepted[msg_id] = digest
        submission = parse_submission(body)
        self.events.setdefault(submission.order.order_number, []).append(submission.event_type)
        return Answer(202)


def generator(
    ingest: FakeIngest, *, rate: float = 20.0, seed: int = 1, max_in_flight: int = 32, **mix: float
) -> Generator:
    plan = Plan(random.Random(seed), Mix(**mix) if mix else None)
    return Generator(ingest, SECRET, rate=rate, plan=plan, clock=ingest.clock, max_in_flight=max_in_flight)


async def run(gen: Generator, clock: FakeClock, messages: int) -> None:
    async with clock.autojump():
        await gen.run(asyncio.Event(), max_messages=messages)


async def test_messages_leave_at_a_steady_pace_on_the_injected_clock() -> None:
    clock = FakeClock(start=0.0)
    ingest = FakeIngest(clock)
    await run(generator(ingest, rate=20), clock, 100)
    assert [r.at for r in ingest.requests] == pytest.approx([i * 0.05 for i in range(100)])


async def test_a_slow_ingest_does_not_slow_the_pace_while_requests_run_side_by_side() -> None:
    clock = FakeClock(start=0.0)
    ingest = FakeIngest(clock, delay=1.0)  # 20/s with 1 s per answer: about 20 under way at once
    await run(generator(ingest, rate=20), clock, 60)
    assert [r.at for r in ingest.requests] == pytest.approx([i * 0.05 for i in range(60)])
    assert 19 <= ingest.most_in_flight <= 21


async def test_requests_under_way_are_bounded() -> None:
    clock = FakeClock(start=0.0)
    ingest = FakeIngest(clock, delay=3.0)
    await run(generator(ingest, rate=20, max_in_flight=4), clock, 40)
    assert ingest.most_in_flight == 4
    assert [r.at for r in ingest.requests[:8]] == pytest.approx([0, 0.05, 0.1, 0.15, 3, 3.05, 3.1, 3.15])


async def test_a_generator_held_up_for_3_s_catches_up_one_second_at_once_then_keeps_the_pace() -> None:
    clock = FakeClock(start=0.0)
    ingest = FakeIngest(clock, first_delay=3.0)  # the only slot is taken for 3 s: 60 messages fall due meanwhile
    await run(generator(ingest, rate=20, max_in_flight=1), clock, 60)
    times = [r.at for r in ingest.requests]
    burst = [t for t in times if t == 3.0]
    assert 20 <= len(burst) <= 22, "about one second's worth at once, not all 60"
    after = times[1 + len(burst) :]
    assert after == pytest.approx([3.0 + 0.05 * (i + 1) for i in range(len(after))])


async def test_every_request_carries_a_valid_signature_over_its_body() -> None:
    clock = FakeClock(start=0.0, wall_start=1_800_000_000.0)
    ingest = FakeIngest(clock)  # verifies with the daemon's own verifier, or raises
    await run(generator(ingest), clock, 50)
    assert len(ingest.requests) == 50
    assert all(r.signature.startswith("v1,") for r in ingest.requests)


async def test_each_message_has_its_own_key_and_a_repeat_reuses_one_with_the_same_body() -> None:
    clock = FakeClock(start=0.0)
    ingest = FakeIngest(clock)
    gen = generator(ingest, seed=7, repeat=0.1)
    await run(gen, clock, 400)
    bodies: dict[str, set[bytes]] = {}
    for request in ingest.requests:
        bodies.setdefault(request.msg_id, set()).add(request.body)
    assert all(len(b) == 1 for b in bodies.values()), "a webhook-id always comes with the same body"
    repeats = len(ingest.requests) - len(bodies)
    assert repeats == gen.stats.repeats > 20
    assert gen.stats.repeats_replayed == gen.stats.repeats, "every repeat was answered from the store"
    assert all(r.msg_id.startswith("msg_") and 30 < len(r.msg_id) < 256 for r in ingest.requests)


async def test_updates_and_cancels_follow_their_orders_accepted_create_in_order() -> None:
    clock = FakeClock(start=0.0)
    ingest = FakeIngest(clock, delay=0.4)  # answers take a while: the plan must not run ahead of them
    gen = generator(ingest, seed=3)
    await run(gen, clock, 2000)
    for number, events in ingest.events.items():
        assert events[0] == "order.created", number
        assert events.count("order.created") == 1, number
        assert "order.cancelled" not in events[:-1], f"{number}: an event after its cancel: {events}"
    kinds = Counter(event for events in ingest.events.values() for event in events)
    accepted = sum(kinds.values())
    assert (gen.stats.created, gen.stats.updated, gen.stats.cancelled) == (
        kinds["order.created"],
        kinds["order.updated"],
        kinds["order.cancelled"],
    )
    # The default mix: 15 % updates, 5 % cancels, 2 % repeats, the rest new orders.
    assert 0.11 < kinds["order.updated"] / accepted < 0.19
    assert 0.03 < kinds["order.cancelled"] / accepted < 0.07
    assert 0.005 < gen.stats.repeats / gen.stats.requests < 0.035


def test_bodies_are_valid_submissions_and_changes_keep_the_order_consistent() -> None:
    plan = Plan(random.Random(11), Mix(update=0.4, cancel=0.1, repeat=0.0))
    created: dict[str, OrderSubmission] = {}
    for _ in range(300):
        message = plan.next()
        submission = parse_submission(message.body)  # the contract: totals add up, times in order
        assert submission.event_type == message.event_type
        assert submission.event_id is not None
        number = submission.order.order_number
        if message.kind == "create":
            created[number] = submission
        else:
            first = created[number].order
            assert submission.order.created_at == first.created_at
            assert submission.order.updated_at > first.updated_at
            assert submission.order.line_items == first.line_items
            assert submission.order.shipping == first.shipping
        plan.answered(message, Answer(202))
    assert plan.stats.updated > 50
    # The demo's orders show the whole contract: discounts on some lines, a shipping charge on most orders.
    orders = [submission.order for submission in created.values()]
    assert sum(order.shipping is not None for order in orders) > len(orders) / 2
    assert any(line.discount_amount for order in orders for line in order.line_items)


def test_order_numbers_are_unique_and_a_seed_names_one_run() -> None:
    def numbers(seed: int) -> list[str]:
        plan = Plan(random.Random(seed), Mix(update=0, cancel=0, repeat=0))
        return [plan.next().order.order_number for _ in range(2000)]

    first = numbers(5)
    assert len(set(first)) == 2000
    assert numbers(5) == first
    assert not set(numbers(6)) & set(first), "another run, other numbers"


async def test_a_message_without_an_answer_is_sent_again_first_with_the_same_key_and_body() -> None:
    clock = FakeClock(start=0.0)
    ingest = FakeIngest(clock)
    plan = Plan(random.Random(2))
    first = plan.next()
    plan.answered(first, Answer(202))
    failing = plan.next()
    ingest.answers[failing.msg_id] = [0, 503, 409]  # no answer, Kafka away, still in progress
    plan.answered(failing, Answer(0))
    gen = Generator(ingest, SECRET, rate=10, plan=plan, clock=clock)
    await run(gen, clock, 5)
    assert [r.msg_id for r in ingest.requests[:3]] == [failing.msg_id] * 3
    assert {r.body for r in ingest.requests[:3]} == {failing.body}
    assert ingest.requests[3].msg_id == failing.msg_id, "accepted at the fourth attempt"
    assert gen.stats.retries == 4
    assert failing.order.order_number in ingest.events


def test_a_refused_message_is_counted_and_dropped_and_frees_its_order() -> None:
    plan = Plan(random.Random(4), Mix(update=1.0, cancel=0.0, repeat=0.0))
    create = plan.next()
    plan.answered(create, Answer(202))
    update = plan.next()
    assert (update.kind, update.order.order_number) == ("update", create.order.order_number)
    plan.answered(update, Answer(422))
    assert plan.stats.refused == 1
    assert plan.next().order.order_number == create.order.order_number, "the order can change again"


async def test_stop_ends_the_run_and_waits_for_the_answers_under_way() -> None:
    clock = FakeClock(start=0.0)
    ingest = FakeIngest(clock, delay=2.0)
    gen = generator(ingest, rate=20)
    stop = asyncio.Event()
    async with clock.autojump():
        running = asyncio.create_task(gen.run(stop))
        await clock.sleep(1.0)
        stop.set()
        await running
    assert len(ingest.requests) == 20
    assert gen.stats.accepted == 20, "every request under way got its answer"


def test_shares_must_leave_room_for_new_orders() -> None:
    with pytest.raises(ValueError, match="add up to at most 1"):
        Mix(update=0.6, cancel=0.3, repeat=0.2)
    with pytest.raises(ValueError, match=">= 0"):
        Mix(update=-0.1)


def test_a_repeat_keeps_the_webhook_id_and_the_body_of_the_message_it_repeats() -> None:
    plan = Plan(random.Random(9), Mix(update=0.0, cancel=0.0, repeat=1.0))
    original = plan.next()  # nothing accepted yet: a new order
    plan.answered(original, Answer(202))
    repeat: Message = plan.next()
    assert (repeat.kind, repeat.msg_id, repeat.body) == ("repeat", original.msg_id, original.body)
    plan.answered(repeat, Answer(202, replayed=True))
    assert (plan.stats.repeats, plan.stats.repeats_replayed, plan.stats.created) == (1, 1, 1)
