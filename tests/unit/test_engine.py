"""The delivery engine with fakes of its real ports: a Kafka consumer twin, a scripted downstream, the in-memory
dedup store and a recording dead-letter writer, on virtual time (FakeClock.autojump: no real sleeps)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from aiokafka.errors import KafkaConnectionError
from prometheus_client import CollectorRegistry
from support import FakeStateTopic

from consumers.backoff import Backoff
from consumers.blocks import encode_chain
from consumers.clock import FakeClock
from consumers.deadletter import DeadLetter, read_headers
from consumers.dedup import DeliveryState, MemoryDedupStore
from consumers.delivery import Reply, TransportFailure
from consumers.engine import SETTLE_FLOOR, EngineConfig, SinkEngine
from consumers.expiry import Move
from consumers.lag import LagMeter
from consumers.membership import JOIN_WAIT, ChurnWatch, Membership
from consumers.metrics import EngineMetrics
from consumers.offsets import OffsetTracker
from consumers.order_state import SharedStateStore, StateTopic
from consumers.policy import DEFAULT_POLICY
from consumers.sink import HttpRequest, RestSink
from consumers.work import idempotency_key
from topics.codec import encode
from topics.envelope import EventType
from topics.errors import PublishError
from topics.samples import sample_event

TOPIC = "orders"
TP0 = (TOPIC, 0)
TP1 = (TOPIC, 1)


@dataclass
class FakeRecord:
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int = 1_799_999_999_000
    headers: tuple[tuple[str, bytes | None], ...] = ()


@dataclass
class FakeConsumer:
    """Implements `consumers.consumer_port.ConsumerPort` over in-memory partitions."""

    clock: FakeClock
    partitions: dict[tuple[str, int], list[FakeRecord]] = field(default_factory=dict)
    paused: set[tuple[str, int]] = field(default_factory=set)
    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    commits: int = 0
    position: dict[tuple[str, int], int] = field(default_factory=dict)
    max_paused: int = 0
    skips: Mapping[tuple[str, int], Sequence[tuple[int, int]]] = field(default_factory=dict)
    moves: dict[tuple[str, int], Move] = field(default_factory=dict)  # as `consumers.expiry` leaves them

    async def getmany(self, timeout_ms: int, max_records: int) -> Mapping[tuple[str, int], list[Any]]:
        batch: dict[tuple[str, int], list[Any]] = {}
        room = max_records
        for tp, records in sorted(self.partitions.items()):
            if tp in self.paused or room <= 0:
                continue
            start = self.position.get(tp, 0)
            taken = records[start : start + room]
            if taken:
                batch[tp] = taken
                self.position[tp] = start + len(taken)
                room -= len(taken)
        if not batch:
            await self.clock.sleep(timeout_ms / 1000)
        return batch

    async def commit(self, offsets: Mapping[tuple[str, int], int]) -> None:
        for tp, offset in offsets.items():
            assert offset >= self.committed.get(tp, 0), "commits never go backwards"
            self.committed[tp] = offset
        self.commits += 1

    def pause(self, tps: Iterable[tuple[str, int]]) -> None:
        self.paused |= set(tps)
        self.max_paused = max(self.max_paused, len(self.paused))

    def resume(self, tps: Iterable[tuple[str, int]]) -> None:
        self.paused -= set(tps)

    def assignment(self) -> set[tuple[str, int]]:
        return set(self.partitions)

    def skip_unreadable(self, skips: Mapping[tuple[str, int], Sequence[tuple[int, int]]]) -> None:
        self.skips = skips

    def unreadable(self) -> Mapping[tuple[str, int], int]:
        return {}

    async def end_offsets(self, tps: Iterable[tuple[str, int]]) -> Mapping[tuple[str, int], int]:
        return {tp: len(self.partitions.get(tp, [])) for tp in tps}

    async def beginning_offsets(self, tps: Iterable[tuple[str, int]]) -> Mapping[tuple[str, int], int]:
        return dict.fromkeys(tps, 0)

    async def committed_offset(self, tp: tuple[str, int]) -> int | None:
        return self.committed.get(tp)

    def moved(self) -> Mapping[tuple[str, int], Move]:
        moved, self.moves = self.moves, {}
        return moved


Script = Callable[[HttpRequest, int], Reply | TransportFailure]


@dataclass
class Downstream:
    """A scripted downstream: `script(request, nth attempt of this idempotency key)` decides each answer."""

    clock: FakeClock
    script: Script | None = None
    latency: float = 0.01
    calls: list[tuple[float, str, str, str]] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0

    async def __call__(self, request: HttpRequest, key: str) -> Reply | TransportFailure:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self.clock.sleep(self.latency)
        finally:
            self.in_flight -= 1
        self.attempts[key] = self.attempts.get(key, 0) + 1
        self.calls.append((self.clock.now(), request.method, request.url, key))
        if self.script is not None:
            return self.script(request, self.attempts[key])
        return ok()

    def order_of(self, order_number: str) -> list[str]:
        return [key for _, _, url, key in self.calls if order_number in url or url.endswith("/orders")]


def ok(status: int = 201, body: bytes = b'{"id": "d-1"}') -> Reply:
    return Reply(status, None, body, 0.01)


def answer(status: int, retry_after: str | None = None, body: bytes = b"{}") -> Reply:
    return Reply(status, retry_after, body, 0.01)


@dataclass
class DeadLetters:
    letters: list[DeadLetter] = field(default_factory=list)
    failures_left: int = 0

    async def write(self, letter: DeadLetter) -> None:
        if self.failures_left:
            self.failures_left -= 1
            raise PublishError("broker unreachable")
        self.letters.append(letter)


@dataclass
class Harness:
    clock: FakeClock
    consumer: FakeConsumer
    downstream: Downstream
    store: MemoryDedupStore
    dead: DeadLetters
    registry: CollectorRegistry
    engine: SinkEngine

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, {"sink": "crm", **labels})
        return 0.0 if value is None else value

    async def run_until(self, finished: int, *, limit: float = 3600.0) -> None:
        """Run the engine until `finished` more records are terminal; fail after `limit` virtual seconds."""
        finished += self.engine.finished
        stop = asyncio.Event()

        async def watchdog() -> None:
            await self.clock.sleep(limit)
            stop.set()

        guard = asyncio.create_task(watchdog())
        try:
            await self.engine.run(stop, max_records=finished)
        finally:
            guard.cancel()
        assert self.engine.finished >= finished, f"only {self.engine.finished} of {finished} finished in {limit} s"

    async def wait_finished(self, count: int) -> None:
        while self.engine.finished < count:
            await self.clock.sleep(0.1)


def record(
    offset: int, order_number: str, event_type: EventType = "order.created", seed: int | None = None
) -> FakeRecord:
    event = sample_event(random.Random(seed if seed is not None else offset), order_number=order_number)
    event = event.model_copy(update={"event_type": event_type})
    encoded = encode(event)
    return FakeRecord(offset, encoded.key, encoded.value, headers=tuple(encoded.headers))


@pytest.fixture
async def harness_factory() -> AsyncIterator[Callable[..., Harness]]:
    clock = FakeClock()
    made: list[Harness] = []

    def make(
        partitions: dict[tuple[str, int], list[FakeRecord]],
        script: Script | None = None,
        *,
        sink: RestSink | None = None,
        shared: StateTopic | None = None,
        **config: Any,
    ) -> Harness:
        consumer = FakeConsumer(clock, partitions)
        downstream = Downstream(clock, script)
        store = MemoryDedupStore()
        dead = DeadLetters()
        registry = CollectorRegistry()
        settings = {"backoff": Backoff(base=1.0, cap=8.0, max_attempts=5, max_elapsed=600.0), **config}
        engine = SinkEngine(
            sink if sink is not None else RestSink("crm", "http://crm.test"),
            consumer,
            downstream,
            store if shared is None else SharedStateStore(store, shared),
            dead,
            EngineMetrics(registry),
            clock,
            EngineConfig(**settings),
            rng=random.Random(1),
        )
        harness = Harness(clock, consumer, downstream, store, dead, registry, engine)
        made.append(harness)
        return harness

    async with clock.autojump():
        yield make


async def test_every_record_is_delivered_and_the_offsets_committed(harness_factory: Callable[..., Harness]) -> None:
    h = harness_factory({TP0: [record(i, f"SO-{i % 7}", seed=i) for i in range(50)], TP1: [record(0, "SO-X")]})
    await h.run_until(51)
    assert len(h.downstream.calls) == 51
    assert h.consumer.committed == {TP0: 50, TP1: 1}
    assert h.metric("orderbus_deliveries_total", outcome="delivered") == 51
    assert h.dead.letters == []
    called = {key for _, _, _, key in h.downstream.calls}
    rows = {s.key: s.order_ref for s in h.store.tables.deliveries.values() if s.key in called}
    assert set(rows) == called
    states = await h.store.get_many(rows)
    assert {state.status for state in states.values()} == {"done"}


async def test_each_state_keeps_its_events_type(harness_factory: Callable[..., Harness]) -> None:
    # `orderbus reconcile` expects an order whose cancel was delivered last to be gone, not lost.
    records = [record(0, "SO-1"), record(1, "SO-1", "order.cancelled", seed=1), FakeRecord(2, b"SO-2", b"not json")]
    h = harness_factory({TP0: records})
    await h.run_until(3)
    kinds = sorted((s.order_ref, s.status, s.event_type) for s in h.store.tables.deliveries.values())
    assert kinds == [("SO-1", "done", "order.cancelled"), ("SO-1", "done", "order.created"), ("SO-2", "dead", None)]


async def test_one_keys_records_arrive_in_order_across_retries_while_other_keys_flow(
    harness_factory: Callable[..., Harness],
) -> None:
    first_of_a = idempotency_key("crm", str(sample_event(random.Random(0), order_number="SO-A").event_id))

    def script(request: HttpRequest, nth: int) -> Reply:
        # The first event of SO-A fails twice with 503, everything else succeeds at once.
        if request.headers.get("X-Event-Id") and first_of_a.endswith(request.headers["X-Event-Id"]) and nth < 3:
            return answer(503)
        return ok()

    records = [
        record(0, "SO-A", "order.created", seed=0),
        record(1, "SO-B", "order.created", seed=1),
        record(2, "SO-A", "order.updated", seed=2),
        record(3, "SO-A", "order.cancelled", seed=3),
        record(4, "SO-B", "order.updated", seed=4),
    ]
    h = harness_factory({TP0: records}, script)
    await h.run_until(5)
    a_calls = [
        (t, m) for t, m, url, key in h.downstream.calls if key.startswith("orderbus:crm:") and _order(h, key) == "SO-A"
    ]
    assert [m for _, m in a_calls] == ["POST", "POST", "POST", "PUT", "DELETE"]
    b_done = max(t for t, m, url, key in h.downstream.calls if _order(h, key) == "SO-B")
    assert b_done < a_calls[2][0], "SO-B was delivered while SO-A was parked"
    assert h.metric("orderbus_retries_total", reason="5xx") == 2
    assert h.consumer.committed == {TP0: 5}


def _order(h: Harness, key: str) -> str:
    for records in h.consumer.partitions.values():
        for rec in records:
            if rec.value and key.split(":")[-1].encode() in rec.value:
                return (rec.key or b"").decode()
    return "?"


async def test_a_400_is_dead_lettered_at_once_and_the_orders_later_events_follow_it(
    harness_factory: Callable[..., Harness],
) -> None:
    def script(request: HttpRequest, nth: int) -> Reply:
        if request.method == "POST" and b"SO-BAD" in (request.body or b""):
            return answer(400, body=b'{"error": "vat_id is malformed"}')
        return ok()

    records = [record(0, "SO-BAD"), record(1, "SO-BAD", "order.updated"), record(2, "SO-OK")]
    h = harness_factory({TP0: records}, script)
    await h.run_until(3)
    assert [letter.reason for letter in h.dead.letters] == ["rejected", "dead-lettered-predecessor"]
    first = h.dead.letters[0]
    meta = read_headers(first.record_headers())
    assert meta["http-status"] == "400"
    assert "vat_id is malformed" in meta["body-excerpt"]
    assert meta["rule"] == "bad-request"
    assert meta["attempts"] == "1"
    assert (meta["topic"], meta["partition"], meta["offset"]) == (TOPIC, "0", "0")
    assert first.value == records[0].value, "the original value is kept byte for byte"
    assert len([c for c in h.downstream.calls if c[1] == "POST"]) == 2, "no retry of the 400"
    assert h.consumer.committed == {TP0: 3}
    assert await h.store.blocked_orders(["SO-BAD", "SO-OK"]) == {"SO-BAD"}


async def test_an_orders_id_and_block_reach_the_instance_that_takes_its_partition(
    harness_factory: Callable[..., Harness],
) -> None:
    def script(request: HttpRequest, nth: int) -> Reply:
        return answer(400) if b"SO-BAD" in (request.body or b"") else ok(body=b'{"id": "d-7"}')

    topic = FakeStateTopic()
    first = harness_factory({TP1: [record(0, "SO-1"), record(1, "SO-BAD")]}, script, shared=topic)
    await first.run_until(2)
    assert [(e.partition, e.key) for e in topic.entries] == [(1, b"id:SO-1"), (1, b"block:SO-BAD")]

    later = [record(2, "SO-1", "order.updated", seed=20), record(3, "SO-BAD", "order.updated", seed=30)]
    second = harness_factory({TP1: later}, script, shared=topic)  # another instance: a file of its own
    paused_while_read: list[set[tuple[str, int]]] = []
    topic.on_read = lambda: paused_while_read.append(set(second.consumer.paused))
    await second.engine.restore({TP1})
    assert topic.read_partitions == [[1]]
    assert paused_while_read == [{TP1}], "nothing of them fetched before their state is read"
    assert second.consumer.paused == set()
    await second.run_until(2)
    assert [(method, url) for _, method, url, _ in second.downstream.calls] == [("PUT", "http://crm.test/orders/d-7")]
    assert [letter.reason for letter in second.dead.letters] == ["dead-lettered-predecessor"]


async def test_a_state_read_that_fails_is_counted_and_said_and_the_partition_goes_on_with_the_file(
    harness_factory: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    topic = FakeStateTopic()
    h = harness_factory({TP1: [record(0, "SO-1")]}, shared=topic)
    topic.failing = "not authorized to read orders.state.crm"
    await h.engine.restore({TP1})
    assert h.metric("orderbus_state_read_failures_total") == 1
    (said,) = [r for r in caplog.records if r.getMessage().startswith("order state not read from the state topic")]
    assert said.levelname == "ERROR"
    assert said.__dict__["error"] == "not authorized to read orders.state.crm"
    assert h.consumer.paused == set(), "resumed: delivered with what the file knows"
    topic.failing = None
    await h.run_until(1)
    assert len(h.downstream.calls) == 1


async def test_records_finish_on_the_files_flush_and_the_state_topic_is_written_by_the_commit(
    harness_factory: Callable[..., Harness],
) -> None:
    # Finished records free their place in the buffer (and the fetch) without waiting for the brokers; their
    # offsets wait for the topic's acknowledgement, which the commit's flush asks for.
    topic = FakeStateTopic()
    h = harness_factory({TP0: [record(n, f"SO-{n}") for n in range(3)]}, shared=topic)
    topic.failing = "not acknowledged within 10 s"
    stop = asyncio.Event()
    running = asyncio.create_task(h.engine.run(stop))
    await h.wait_finished(3)
    assert h.engine.buffered == 0
    await h.clock.sleep(3 * h.engine.config.commit_interval)
    assert h.consumer.committed == {}, "nothing committed while the ids are not on the topic"
    assert h.metric("orderbus_commit_failures_total") >= 1
    topic.failing = None
    await h.clock.sleep(3 * h.engine.config.commit_interval)
    assert sorted(entry.key for entry in topic.entries) == [b"id:SO-0", b"id:SO-1", b"id:SO-2"]
    assert h.consumer.committed == {TP0: 3}
    stop.set()
    await running
    assert len(h.downstream.calls) == 3


async def test_a_state_topic_that_does_not_answer_holds_the_commit_as_a_refused_commit_would(
    harness_factory: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    topic = FakeStateTopic()
    h = harness_factory({TP0: [record(0, "SO-1")]}, shared=topic)
    topic.failing = "not acknowledged within 10 s"
    stop = asyncio.Event()

    async def stop_later() -> None:
        await h.clock.sleep(5.0)
        stop.set()

    stopping = asyncio.create_task(stop_later())
    await h.engine.run(stop)
    await stopping  # delivered, its state not shared: not finished; the stop's commit fails as a commit
    assert len(h.downstream.calls) == 1
    assert h.consumer.committed == {}
    assert h.metric("orderbus_commit_failures_total") >= 1
    assert "commit failed, will retry" in caplog.text, "a warning, and the run ends as a stop, not as a failure"


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "TEXT/HTML", "application/xhtml+xml"])
async def test_a_web_page_for_an_answer_is_a_dead_letter_not_a_delivery(
    harness_factory: Callable[..., Harness], content_type: str
) -> None:
    # Review (downstream owner): a base_url at the system's web site (an SPA answers 200 with its index.html for
    # every path), a login page or a captive portal: every order counted as delivered, and none was.
    page = b"<!doctype html><title>Sign in</title>"

    def script(request: HttpRequest, nth: int) -> Reply:
        body = request.body or b""
        if b"SO-PAGE" in body:
            return Reply(200, None, page, 0.01, content_type)
        if b"SO-FLASK" in body:  # what Flask, Express or PHP label text/html unless told otherwise: JSON, "OK"
            return Reply(201, None, b' {"id": "c-1"}', 0.01, "text/html; charset=utf-8")
        if request.method == "DELETE":  # a framework's error page to a cancel the operator counts as done
            return Reply(404, None, page, 0.01, content_type)
        return Reply(204, None, b"", 0.01, "text/html")  # no page in it: an answer like any 204

    records = [
        record(0, "SO-PAGE"),
        record(1, "SO-OK"),
        record(2, "SO-FLASK"),
        record(3, "SO-OK", "order.cancelled"),
    ]
    sink = RestSink("crm", "http://crm.test", policy=DEFAULT_POLICY.with_overrides({"DELETE 404": "duplicate"}))
    h = harness_factory({TP0: records}, script, sink=sink)
    await h.run_until(4)
    [letter] = h.dead.letters
    meta = read_headers(letter.record_headers())
    assert (letter.reason, meta["rule"], meta["http-status"]) == ("rejected", "html-answer", "200")
    assert "Sign in" in meta["body-excerpt"]
    assert h.metric("orderbus_deliveries_total", outcome="delivered") == 2
    assert h.metric("orderbus_deliveries_total", outcome="duplicate") == 1, "the override's 404, as it says"


async def test_retries_exhausted_become_a_dead_letter(harness_factory: Callable[..., Harness]) -> None:
    h = harness_factory({TP0: [record(0, "SO-1")]}, lambda request, nth: TransportFailure("timeout", "slow", 10.0))
    await h.run_until(1)
    [letter] = h.dead.letters
    assert letter.reason == "retries-exhausted"
    assert letter.attempts == 5
    assert h.metric("orderbus_http_responses_total", status_class="timeout") == 5


async def test_a_request_that_cannot_be_sent_is_dead_lettered_with_the_clients_reason(
    harness_factory: Callable[..., Harness],
) -> None:
    refused = "header 'X-Tenant': value holds CR, LF or NUL"
    h = harness_factory(
        {TP0: [record(0, "SO-1")]}, lambda request, nth: TransportFailure("invalid_request", refused, 0)
    )
    await h.run_until(1)
    [letter] = h.dead.letters
    assert (letter.reason, letter.rule, letter.attempts, letter.detail) == ("rejected", "invalid-request", 1, refused)
    assert h.consumer.committed == {TP0: 1}


async def test_poison_records_are_dead_lettered_as_invalid_and_nothing_stalls(
    harness_factory: Callable[..., Harness],
) -> None:
    poison = [
        FakeRecord(0, b"SO-1", b"not json"),
        FakeRecord(1, b"SO-2", None),
        FakeRecord(2, b"SO-3", b'{"schema_version": 1}'),
        FakeRecord(3, None, b"\xff\xfe"),
    ]
    h = harness_factory({TP0: [*poison, record(4, "SO-4")]})
    await h.run_until(5)
    assert [letter.reason for letter in h.dead.letters] == ["invalid"] * 4
    assert "value" in read_headers(h.dead.letters[0].record_headers())["detail"]
    assert len(h.downstream.calls) == 1
    assert h.consumer.committed == {TP0: 5}


async def test_a_redelivered_record_is_skipped_and_counted(harness_factory: Callable[..., Harness]) -> None:
    rec = record(0, "SO-1")
    h = harness_factory({TP0: [rec, record(1, "SO-2")]})
    event_id = sample_event(random.Random(0), order_number="SO-1").event_id
    key = idempotency_key("crm", str(event_id))
    h.store.put(DeliveryState(key, str(event_id), "SO-1", "done", 1, 201, 1.0, 1.0, "d-1", None, None, 1.0))
    await h.store.flush()
    await h.run_until(2)
    assert key not in [k for _, _, _, k in h.downstream.calls]
    assert h.metric("orderbus_dedup_hits_total") == 1
    assert h.consumer.committed == {TP0: 2}


async def test_the_same_event_twice_in_one_lane_is_sent_once(harness_factory: Callable[..., Harness]) -> None:
    # Regression (chaos run): an event on the topic twice (the ingest republishes after a crash between the broker's
    # ack and storing its answer) came in one fetch; both copies were sent, the second as a duplicate request.
    first = record(0, "SO-1", seed=7)
    h = harness_factory({TP0: [first, dataclasses.replace(first, offset=1), record(2, "SO-2")]})
    await h.run_until(3)
    key = idempotency_key("crm", str(sample_event(random.Random(7), order_number="SO-1").event_id))
    assert [k for *_, k in h.downstream.calls].count(key) == 1
    assert h.metric("orderbus_dedup_hits_total") == 1
    assert h.metric("orderbus_deliveries_total", outcome="duplicate") == 1
    assert h.consumer.committed == {TP0: 3}


async def test_a_429_with_retry_after_holds_the_whole_sink(harness_factory: Callable[..., Harness]) -> None:
    def script(request: HttpRequest, nth: int) -> Reply:
        if b"SO-ONE" in (request.body or b"") and nth == 1:
            return answer(429, retry_after="2")
        return ok()

    records = [record(0, "SO-ONE"), *[record(i, f"SO-OTHER-{i}") for i in range(1, 6)]]
    h = harness_factory({TP0: records}, script, max_in_flight=1)
    await h.run_until(6)
    answered_429 = h.downstream.calls[0][0]
    assert h.downstream.calls[0][2].endswith("/orders")
    later = [t for t, *_ in h.downstream.calls[1:]]
    # Answers are recorded after the downstream's latency; every request after the 429 started >= 2 s later.
    assert len(later) == 6
    assert min(later) - h.downstream.latency >= answered_429 + 2.0
    assert h.metric("orderbus_last_retry_after_seconds") == 2.0
    assert h.metric("orderbus_throttled_seconds_total") >= 1.9
    assert h.metric("orderbus_retries_total", reason="throttled") == 1
    assert h.metric("orderbus_retries_total", reason="4xx") == 0


async def test_a_burst_of_429s_with_retry_after_paces_the_sink_but_leaves_the_circuit_closed(
    harness_factory: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    # Regression (chaos run): a rate limiter answers 429 to every request while over its limit. Each 429 counted as
    # a circuit failure, so one burst opened the circuit for `circuit_open_for` (30 s) instead of the 1 s asked.
    def script(request: HttpRequest, nth: int) -> Reply:
        if b"SO-BURST" in (request.body or b"") and nth == 1:
            return answer(429, retry_after="1")
        return ok()

    caplog.set_level(logging.INFO, logger="consumers.lane")
    records = [record(i, f"SO-BURST-{i}") for i in range(12)] + [record(i, f"SO-LATER-{i}") for i in range(12, 20)]
    h = harness_factory({TP0: records}, script, max_in_flight=20, circuit_open_for=30.0)
    started = h.clock.now()
    await h.run_until(20)
    assert h.engine.circuit_state == "closed"
    assert h.metric("orderbus_retries_total", reason="throttled") == 12
    assert h.clock.now() - started < 10.0  # the 1 s hold plus backoff, not 30 s of an open circuit
    # Said once for the burst's hold (it was said nowhere: a 60 s hold looked like a sink with nothing to do).
    [held] = [r for r in caplog.records if r.getMessage() == "sink held by the downstream's Retry-After"]
    assert held.seconds == 1.0  # type: ignore[attr-defined]
    assert not hasattr(held, "asked"), "within the cap: the seconds are what it asked"


async def test_a_retry_after_the_cap_cut_is_said_with_what_the_downstream_asked(
    harness_factory: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    # Review (operator): a downstream asked for 100000 s (27 hours); the log and the gauge said 300, nothing more.
    def script(request: HttpRequest, nth: int) -> Reply:
        return answer(429, retry_after="100000") if nth == 1 else ok()

    caplog.set_level(logging.INFO, logger="consumers.lane")
    h = harness_factory({TP0: [record(0, "SO-1")]}, script, retry_after_cap=300.0)
    await h.run_until(1, limit=4000)
    [held] = [r for r in caplog.records if r.getMessage() == "sink held by the downstream's Retry-After"]
    said = (held.seconds, held.asked, held.capped_by)  # type: ignore[attr-defined]
    assert said == (300.0, "100000", "retry_after_cap")
    assert h.metric("orderbus_last_retry_after_seconds") == 300.0


async def test_a_burst_of_429s_without_retry_after_still_opens_the_circuit(
    harness_factory: Callable[..., Harness],
) -> None:
    # Without a Retry-After the pacer has nothing to hold the sink by (an unlimited rate stays unlimited): the
    # circuit is then the sink-wide brake.
    def script(request: HttpRequest, nth: int) -> Reply:
        return answer(429) if b"SO-BURST" in (request.body or b"") and nth == 1 else ok()

    records = [record(i, f"SO-BURST-{i}") for i in range(12)]
    h = harness_factory({TP0: records}, script, max_in_flight=20, circuit_open_for=30.0)
    started = h.clock.now()
    await h.run_until(12)
    assert h.clock.now() - started >= 30.0


@pytest.mark.parametrize(
    ("failure", "said"),
    [
        (TransportFailure("connection", "shipping: answer head longer than 65536 bytes", 0.01),
         "connection: shipping: answer head longer than 65536 bytes"),
        (TransportFailure("timeout", "no answer within 5 s", 5.0), "timeout: no answer within 5 s"),
        (answer(503), "status 503"),
    ],
)  # fmt: skip
async def test_the_circuits_opening_says_what_the_last_failure_was(
    harness_factory: Callable[..., Harness],
    caplog: pytest.LogCaptureFixture,
    failure: Reply | TransportFailure,
    said: str,
) -> None:
    # A downstream that hung, sent garbage or reset was said as "circuit closed -> open" alone: why, nowhere.
    records = [record(i, f"SO-{i}") for i in range(12)]
    h = harness_factory({TP0: records}, lambda request, nth: failure if nth == 1 else ok())
    await h.run_until(12)
    changes = {r.getMessage(): r for r in caplog.records if r.getMessage().startswith("circuit ")}
    assert changes["circuit closed -> open"].last_failure == said  # type: ignore[attr-defined]
    assert not hasattr(changes["circuit open -> half_open"], "last_failure"), "said once, at the opening"


async def test_a_half_open_probe_answered_400_closes_the_circuit(harness_factory: Callable[..., Harness]) -> None:
    # A 400 is the downstream working on bad data: as a probe's answer it closes the circuit (the record is
    # dead-lettered); recorded as no probe's, the circuit would stay half-open with its one slot taken for good.
    def script(request: HttpRequest, nth: int) -> Reply:
        return answer(503) if nth == 1 else answer(400, body=b'{"error": "bad vat id"}')

    h = harness_factory(
        {TP0: [record(0, "SO-Q")]},
        script,
        circuit_window=1,
        circuit_min_calls=1,
        circuit_failure_ratio=1.0,
        circuit_open_for=5.0,
    )
    await h.run_until(1, limit=60)
    assert [letter.reason for letter in h.dead.letters] == ["rejected"]
    assert h.engine.circuit_state == "closed"


async def test_a_late_failure_of_a_request_sent_before_the_circuit_opened_does_not_decide_its_probe(
    harness_factory: Callable[..., Harness],
) -> None:
    # SO-Q's request left while the circuit was closed and fails after the circuit's pause (a request timeout longer
    # than circuit_open_for), while SO-X's probe is out: the probe decides, and it succeeds.
    def script(request: HttpRequest, nth: int) -> Reply:
        return answer(503) if nth == 1 else ok()  # each order's first request fails

    h, started = probe_beside_a_late_answer(harness_factory, script)
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    await h.clock.sleep(10.5)
    assert [order for _, order in started[:3]] == ["SO-X", "SO-Q", "SO-X"]
    assert h.engine.circuit_state == "closed", "SO-X's successful probe closed it; SO-Q's old 503 did not reopen it"
    stop.set()
    await runner


async def test_a_paced_answer_leaves_another_lanes_half_open_probe_out(
    harness_factory: Callable[..., Harness],
) -> None:
    # SO-Q's first request left while the circuit was closed and is answered, paced, while SO-X's probe is out:
    # that answer must not free SO-X's probe slot, or SO-Q's retry probes beside it and SO-X's failed probe is
    # ignored (a half-open circuit counts only the outcomes of the probes it let out).
    def script(request: HttpRequest, nth: int) -> Reply:
        if b"SO-Q" in (request.body or b""):
            return answer(429, retry_after="1") if nth == 1 else ok()
        return answer(503)

    h, started = probe_beside_a_late_answer(harness_factory, script)
    begin = h.clock.now()
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    await h.clock.sleep(12)
    assert started[2][0] - begin < 7.0, "SO-X's probe was out when SO-Q's paced answer came"
    assert [order for _, order in started] == ["SO-X", "SO-Q", "SO-X"], "SO-Q's retry waits for SO-X's probe"
    assert h.engine.circuit_state == "open", "SO-X's failed probe opened the circuit again"
    stop.set()
    await runner


async def test_401_pauses_the_sink_without_dead_letters_and_resumes(harness_factory: Callable[..., Harness]) -> None:
    def script(request: HttpRequest, nth: int) -> Reply:
        return answer(401) if nth == 1 else ok()

    h = harness_factory({TP0: [record(i, f"SO-{i}") for i in range(3)]}, script, auth_pause=30.0)
    await h.run_until(3)
    assert h.dead.letters == []
    assert h.metric("orderbus_auth_failures_total") >= 1
    assert h.metric("orderbus_deliveries_total", outcome="delivered") == 3
    assert h.clock.now() - 1000.0 >= 30.0, "the probe came after the auth pause"


async def test_refused_credentials_count_against_no_records_retry_budget(
    harness_factory: Callable[..., Harness],
) -> None:
    # Review (downstream owner): every 401 counted as an attempt, so once the credentials were fixed a record used
    # its budget up in two 503s, and an auth outage longer than max_elapsed dead-lettered at the first 5xx.
    def script(request: HttpRequest, nth: int) -> Reply:
        return answer(401) if nth <= 3 else answer(503) if nth <= 5 else ok()

    h = harness_factory(
        {TP0: [record(0, "SO-1")]},
        script,
        auth_pause=1.0,
        backoff=Backoff(base=1.0, cap=8.0, max_attempts=3, max_elapsed=2.0),
    )
    await h.run_until(1)
    assert h.dead.letters == []
    assert h.metric("orderbus_deliveries_total", outcome="delivered") == 1
    assert len(h.downstream.calls) == 6  # three refused, then two 503s and the 201: the record's own three


async def test_a_refused_tls_certificate_is_said_at_error_once_a_minute(
    harness_factory: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    # Review (downstream owner): a self-signed downstream without ca_bundle showed only DEBUG retries and then
    # dead letters; the cause was in `dlq show` alone.
    refused = (
        "HttpConnectionError: https://crm.test: cannot connect (SSLCertVerificationError(1, '[SSL: "
        "CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate (_ssl.c:1006)'))"
    )

    def script(request: HttpRequest, nth: int) -> Reply | TransportFailure:
        return TransportFailure("connection", refused, 0.01, certificate_refused=True) if nth <= 4 else ok()

    h = harness_factory({TP0: [record(0, "SO-1")]}, script, circuit_min_calls=10)
    with caplog.at_level(logging.ERROR, logger="consumers.lane"):
        await h.run_until(1)
    said = [r for r in caplog.records if r.getMessage().startswith("the downstream's TLS certificate is refused")]
    assert len(h.downstream.calls) == 5
    assert 1 <= len(said) < 4, "said, not at every attempt"
    assert "CERTIFICATE_VERIFY_FAILED" in said[0].error  # type: ignore[attr-defined]


async def test_a_circuit_that_opens_stops_the_requests_queued_behind_it(
    harness_factory: Callable[..., Harness],
) -> None:
    # Review (downstream owner): lanes queued for a request slot or the pace sent all the same after the circuit
    # opened, one request each: an open circuit protected nothing until that queue had drained.
    def script(request: HttpRequest, nth: int) -> Reply:
        return answer(503) if b"SO-DOWN" in (request.body or b"") else ok()

    h = harness_factory(
        {TP0: [record(0, "SO-DOWN", seed=10)], TP1: [record(i, f"SO-{i}") for i in range(6)]},
        script,
        max_in_flight=1,
        circuit_window=1,
        circuit_min_calls=1,
        circuit_failure_ratio=1.0,
        circuit_open_for=5.0,
    )
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    await h.clock.sleep(4.9)
    assert h.engine.circuit_state == "open"
    assert len(h.downstream.calls) == 1, "only SO-DOWN's 503: the queued records wait for the probe"
    await h.wait_finished(6)  # the probe (one of them) closes the circuit; SO-DOWN's retries are 503 still
    stop.set()
    await runner


async def test_a_credentials_probe_refused_again_pauses_the_sink_for_twice_as_long(
    harness_factory: Callable[..., Harness],
) -> None:
    # The probe's own 401 decides the half-open pause: it reopens it, doubled (recorded as no probe's answer, the
    # pause would stay half-open with its one probe slot taken, and the sink would never send again).
    def script(request: HttpRequest, nth: int) -> Reply:
        return answer(401) if nth <= 2 else ok()

    h = harness_factory({TP0: [record(0, "SO-0")]}, script, auth_pause=30.0)
    started: list[float] = []
    original = h.engine._context.deliver

    async def timed(request: HttpRequest, key: str) -> Reply | TransportFailure:
        started.append(h.clock.now())
        return await original(request, key)

    h.engine._context.deliver = timed
    await h.run_until(1, limit=600)
    assert h.dead.letters == []
    assert len(started) == 3
    assert started[1] - started[0] >= 30.0
    assert started[2] - started[1] >= 60.0, "the refused probe doubled the pause"


async def test_a_credentials_probe_answered_503_ends_the_pause(
    harness_factory: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    # A 503 says nothing against the credentials: the probe's answer closes the pause, and the record is retried.
    def script(request: HttpRequest, nth: int) -> Reply:
        return {1: answer(401), 2: answer(503)}.get(nth, ok())

    h = harness_factory({TP0: [record(0, "SO-0")]}, script, auth_pause=30.0)
    with caplog.at_level(logging.INFO, "consumers.engine"):
        await h.run_until(1, limit=600)
    assert h.metric("orderbus_deliveries_total", outcome="delivered") == 1
    assert not h.engine.auth_paused
    # Review (downstream owner): the pause was an ERROR line, its end nothing: did the rotated credentials work?
    resumed = [r for r in caplog.records if r.getMessage() == "downstream accepts our credentials again; sink resumed"]
    assert [getattr(r, "sink", None) for r in resumed] == ["crm"]


async def test_buffer_stays_bounded_and_partitions_pause(harness_factory: Callable[..., Harness]) -> None:
    h = harness_factory(
        {TP0: [record(i, f"SO-{i}") for i in range(200)], TP1: [record(i, f"SO-B{i}") for i in range(200)]},
        max_buffered=20,
        max_in_flight=4,
    )
    h.downstream.latency = 0.5
    peak = 0
    original = h.downstream.__call__

    async def observed(request: HttpRequest, key: str) -> Reply | TransportFailure:
        nonlocal peak
        peak = max(peak, h.engine.buffered)
        return await original(request, key)

    h.engine._context.deliver = observed
    await h.run_until(400)
    assert peak <= 20
    assert h.consumer.max_paused == 2, "both partitions were paused while the buffer was full"
    assert h.downstream.max_in_flight <= 4
    assert h.consumer.committed == {TP0: 200, TP1: 200}


async def test_commits_stop_at_the_oldest_unfinished_record(harness_factory: Callable[..., Harness]) -> None:
    blocked = asyncio.Event()

    def script(request: HttpRequest, nth: int) -> Reply:
        return answer(503) if b"SO-STUCK" in (request.body or b"") and not blocked.is_set() else ok()

    h = harness_factory(
        {TP0: [record(0, "SO-OK0"), record(1, "SO-STUCK"), *[record(i, f"SO-{i}") for i in range(2, 10)]]}, script
    )
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    await h.wait_finished(9)
    await h.clock.sleep(5)
    assert h.consumer.committed == {TP0: 1}, "nothing past the stuck record is committed"
    blocked.set()
    await h.wait_finished(10)
    await h.clock.sleep(5)
    assert h.consumer.committed == {TP0: 10}
    stop.set()
    await runner


async def test_a_dead_letter_that_cannot_be_written_holds_the_offset(harness_factory: Callable[..., Harness]) -> None:
    h = harness_factory({TP0: [FakeRecord(0, b"SO-1", b"junk")]})
    h.dead.failures_left = 3
    await h.run_until(1)
    assert len(h.dead.letters) == 1
    assert h.consumer.committed == {TP0: 1}


async def test_stop_drains_requests_under_way_and_commits(harness_factory: Callable[..., Harness]) -> None:
    h = harness_factory({TP0: [record(i, f"SO-{i}") for i in range(10)]}, max_in_flight=10)
    h.downstream.latency = 1.0
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    while h.downstream.in_flight < 10:
        await h.clock.sleep(0.01)
    stop.set()
    await runner
    assert len(h.downstream.calls) == 10
    assert h.consumer.committed == {TP0: 10}
    assert h.store.pending_writes == 0


async def test_stop_cancels_the_requests_still_under_way_after_the_grace_period(
    harness_factory: Callable[..., Harness],
) -> None:
    h = harness_factory({TP0: [record(0, "SO-1")]}, shutdown_grace=5.0)
    h.downstream.latency = 3600.0
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    while h.downstream.in_flight < 1:
        await h.clock.sleep(0.01)
    stopped = h.clock.now()
    stop.set()
    await runner
    assert 5.0 <= h.clock.now() - stopped < 6.0, "the grace period is on the engine's clock, not the loop's"
    assert h.downstream.calls == []
    assert TP0 not in h.consumer.committed


async def test_a_stop_waits_for_settling_records_only_what_is_left_of_the_grace_period(
    harness_factory: Callable[..., Harness],
) -> None:
    # Review (operator): the settling wait had a grace period of its own after the requests' one, so a stop could
    # take twice `shutdown_grace` before the commit, past the TimeoutStopSec sized for one.
    h = harness_factory({TP0: [record(0, "SO-1")]}, shutdown_grace=5.0)
    stalled = asyncio.Event()

    async def flush_stalled() -> int:  # a disk that stalls for a minute
        stalled.set()
        await h.clock.sleep(60.0)
        return 0

    h.store.flush = flush_stalled  # type: ignore[method-assign]
    commits: list[float] = []
    commit = h.engine.commit

    async def timed_commit(only: Iterable[tuple[str, int]] | None = None) -> None:
        commits.append(h.clock.now())
        await commit(only=only)

    h.engine.commit = timed_commit  # type: ignore[method-assign]
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    await stalled.wait()  # SO-1 answered: its settling waits for the disk
    h.downstream.latency = 3600.0
    h.consumer.partitions[TP1] = [record(0, "SO-2")]  # and SO-2, sent now, stays under way
    while h.downstream.in_flight < 1:
        await h.clock.sleep(0.01)
    stopped = h.clock.now()
    stop.set()
    await runner
    assert commits, "the stop commits"
    assert commits[0] - stopped <= 5.0 + SETTLE_FLOOR + 0.5, commits[0] - stopped  # 10.3 s before


async def test_stop_ends_the_run_while_a_fetch_never_returns(harness_factory: Callable[..., Harness]) -> None:
    # As aiokafka's getmany while its group rebalances and cannot rejoin: it waits for the assignment, unbounded.
    h = harness_factory({TP0: [record(0, "SO-1")]}, fetch_wait=0.2, shutdown_grace=5.0)
    await h.run_until(1)
    waiters: list[asyncio.Future[Mapping[tuple[str, int], list[Any]]]] = []

    async def stuck(timeout_ms: int, max_records: int) -> Mapping[tuple[str, int], list[Any]]:
        waiters.append(asyncio.get_running_loop().create_future())  # a new one each call, as aiokafka's
        return await waiters[-1]

    h.consumer.getmany = stuck  # type: ignore[method-assign]
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    await h.clock.sleep(10)
    stop.set()
    await h.clock.sleep(0.2 + 2.0)  # fetch_wait, then the fetch's slack (up to 1.5 s) and a commit
    ended = runner.done()
    if not ended:
        waiters[-1].set_result({})  # the rebalance ends after all: let the run finish
    await runner
    assert ended, "the run ended within fetch_wait and its slack after the stop"
    assert h.consumer.committed == {TP0: 1}


async def test_the_rate_limit_is_reported_as_0_while_unlimited_and_as_the_rate_in_force_when_limited(
    harness_factory: Callable[..., Harness],
) -> None:
    # The gauge's help says 0 is unlimited; it was set to +Inf.
    unlimited = harness_factory({TP0: []})
    unlimited.engine._report()
    assert unlimited.metric("orderbus_sink_rate_limit") == 0
    assert unlimited.engine.status()["rate_limit"] is None

    def script(request: HttpRequest, nth: int) -> Reply:
        return answer(429, retry_after="1") if nth == 1 else ok()

    limited = harness_factory({TP0: [record(0, "SO-1")]}, script, rate=100.0)
    await limited.run_until(1)
    limited.engine._report()
    assert 50 <= limited.metric("orderbus_sink_rate_limit") < 100  # halved by the 429, recovering
    assert limited.engine.status()["rate_limit"] == limited.metric("orderbus_sink_rate_limit")


@pytest.mark.parametrize(
    ("status", "retry_after", "slowed"),
    [(429, None, True), (429, "1", True), (503, "1", True), (503, None, False)],
)
async def test_a_429_or_a_503_with_retry_after_slows_the_sink_and_a_bare_503_does_not(
    harness_factory: Callable[..., Harness], status: int, retry_after: str | None, slowed: bool
) -> None:
    # A 503 without Retry-After is an outage (the circuit and the key's backoff): lowering the rate for each one
    # took a sink to its least rate under 5 % of them.
    def script(request: HttpRequest, nth: int) -> Reply:
        return answer(status, retry_after=retry_after) if nth == 1 else ok()

    h = harness_factory({TP0: [record(0, "SO-1")]}, script, rate=100.0)
    await h.run_until(1)
    assert (h.engine._context.pacer.current_rate < 100.0) is slowed


async def test_outcomes_and_attempts_are_counted_per_status_class(harness_factory: Callable[..., Harness]) -> None:
    def script(request: HttpRequest, nth: int) -> Reply:
        body = request.body or b""
        if b"SO-BAD" in body:
            return answer(400)
        return answer(503) if b"SO-FLAKY" in body and nth <= 2 else ok()

    h = harness_factory({TP0: [record(0, "SO-FLAKY"), record(1, "SO-BAD"), record(2, "SO-OK")]}, script)
    await h.run_until(3)
    assert h.metric("orderbus_records_consumed_total") == 3
    assert h.metric("orderbus_deliveries_total", outcome="delivered") == 2
    assert h.metric("orderbus_deliveries_total", outcome="dead_lettered") == 1
    assert h.metric("orderbus_dead_letters_total", reason="rejected") == 1
    assert h.metric("orderbus_http_responses_total", status_class="5xx") == 2
    assert h.metric("orderbus_http_responses_total", status_class="4xx") == 1
    assert h.metric("orderbus_http_responses_total", status_class="2xx") == 2
    assert h.metric("orderbus_retries_total", reason="5xx") == 2
    assert h.metric("orderbus_attempt_duration_seconds_count") == 5
    assert h.metric("orderbus_end_to_end_seconds_count") == 2
    assert h.metric("orderbus_commits_total") >= 1
    assert h.metric("orderbus_in_flight_requests") == 0
    assert h.metric("orderbus_buffered_records") == 0


async def test_lag_is_reported_per_partition_and_forgotten_when_a_partition_moves(
    harness_factory: Callable[..., Harness],
) -> None:
    gate = asyncio.Event()

    def script(request: HttpRequest, nth: int) -> Reply:
        return ok() if gate.is_set() else answer(500)  # retried with backoff, the keys parked meanwhile

    h = harness_factory(
        {TP0: [record(i, f"SO-{i}") for i in range(5)], TP1: [record(0, "SO-B")]},
        script,
        lag_interval=1.0,
        backoff=Backoff(base=0.5, cap=1.0, max_attempts=1000, max_elapsed=3600.0),
        circuit_min_calls=1000,
        circuit_window=1000,
    )
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    await h.clock.sleep(3)
    assert h.metric("orderbus_consumer_lag", partition="0") == 5
    assert h.metric("orderbus_consumer_lag", partition="1") == 1
    assert h.metric("orderbus_parked_keys") >= 1
    assert h.metric("orderbus_oldest_pending_seconds") > 0
    await h.engine.on_revoked({TP1})
    del h.consumer.partitions[TP1]
    assert h.registry.get_sample_value("orderbus_consumer_lag", {"sink": "crm", "partition": "1"}) is None
    gate.set()
    await h.wait_finished(5)
    await h.clock.sleep(3)
    assert h.metric("orderbus_consumer_lag", partition="0") == 0
    stop.set()
    await runner


async def test_kafka_silence_grows_while_the_lag_cannot_be_measured(harness_factory: Callable[..., Harness]) -> None:
    h = harness_factory({TP0: [record(0, "SO-1")]}, lag_interval=1.0)
    down = False
    measure = h.consumer.end_offsets

    async def end_offsets(tps: Iterable[tuple[str, int]]) -> Mapping[tuple[str, int], int]:
        if down:
            raise KafkaConnectionError("broker gone")
        return await measure(tps)

    h.consumer.end_offsets = end_offsets  # type: ignore[method-assign]
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    await h.clock.sleep(3)
    assert h.engine.kafka_silence <= 1.5
    down = True
    await h.clock.sleep(5)
    assert h.engine.kafka_silence >= 4
    down = False
    await h.clock.sleep(2)
    assert h.engine.kafka_silence <= 1.5
    stop.set()
    await runner


async def test_an_instance_without_partitions_still_notices_an_unreachable_broker() -> None:
    # Review: with no partition the meter took the broker as seen at every measurement, so a spare member (more
    # instances than partitions), ready since it joined, stayed ready with Kafka gone.
    clock = FakeClock()
    consumer = FakeConsumer(clock)  # nothing assigned
    asked: list[list[tuple[str, int]]] = []
    down = False

    async def end_offsets(tps: Iterable[tuple[str, int]]) -> Mapping[tuple[str, int], int]:
        asked.append(list(tps))
        if down:
            raise KafkaConnectionError("broker gone")
        return dict.fromkeys(asked[-1], 0)

    consumer.end_offsets = end_offsets  # type: ignore[method-assign]
    meter = LagMeter(consumer, OffsetTracker(), clock, interval=1.0, sink="crm", contact=("orders.replay.crm", 0))
    await meter.measure()
    assert (meter.silence, meter.lag, asked) == (0.0, {}, [[("orders.replay.crm", 0)]])
    down = True
    await clock.advance(5.0)
    await meter.measure()
    assert meter.silence == 5.0
    down = False
    await meter.measure()
    assert meter.silence == 0.0


async def test_a_revoke_drains_and_commits_only_those_partitions(harness_factory: Callable[..., Harness]) -> None:
    def script(request: HttpRequest, nth: int) -> Reply:
        return answer(503) if b"SO-PARKED" in (request.body or b"") else ok()

    h = harness_factory(
        {TP0: [record(0, "SO-A0"), record(1, "SO-PARKED"), record(2, "SO-A2")], TP1: [record(0, "SO-B0")]}, script
    )
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    await h.wait_finished(3)
    await h.engine.on_revoked({TP0})
    assert h.consumer.committed[TP0] == 1, "committed up to the parked record, not past it"
    assert h.engine.buffered == 0, "the parked record was let go: the next owner gets it"
    calls = len(h.downstream.calls)
    await h.clock.sleep(30)
    assert len(h.downstream.calls) == calls, "no attempts for a revoked partition"
    stop.set()
    await runner
    assert h.consumer.committed[TP1] == 1


async def test_a_revoke_whose_commit_cannot_flush_still_lets_the_partition_go_and_it_can_come_back(
    harness_factory: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:

    down = True

    def script(request: HttpRequest, nth: int) -> Reply:
        return answer(503) if down and b"SO-PARKED" in (request.body or b"") else ok()

    h = harness_factory(
        {TP0: [record(0, "SO-PARKED"), record(1, "SO-PARKED", "order.updated")], TP1: [record(0, "SO-B", seed=10)]},
        script,
    )
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    await h.wait_finished(1)
    fail_flushes(h, 1)
    await h.engine.on_revoked({TP0})
    assert "revoked partitions could not be committed" in caplog.text
    assert h.engine.buffered == 0, "TP0's two records were let go all the same"
    down = False
    h.consumer.position[TP0] = h.consumer.committed.get(TP0, 0)  # assigned back: read again from its commit
    h.engine.on_assigned({TP0})
    await h.clock.sleep(30)
    assert not runner.done(), "the run goes on"
    assert h.engine.finished == 3
    stop.set()
    await runner
    assert h.consumer.committed == {TP0: 2, TP1: 1}


async def test_records_of_a_partition_revoked_during_their_lookup_are_dropped(
    harness_factory: Callable[..., Harness],
) -> None:
    h = harness_factory({TP0: [record(0, "SO-A0"), record(1, "SO-A1")], TP1: [record(0, "SO-B0")]})
    looking_up, release = asyncio.Event(), asyncio.Event()
    lookup = h.store.get_many

    async def slow_get_many(keys: Mapping[str, str]) -> dict[str, DeliveryState]:
        looking_up.set()
        await release.wait()
        return await lookup(keys)

    h.store.get_many = slow_get_many  # type: ignore[method-assign]
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    await looking_up.wait()
    await h.engine.on_revoked({TP0})  # the rebalance arrives while the fetched batch is being looked up
    release.set()
    await h.wait_finished(1)
    await h.clock.sleep(5)
    stop.set()
    await runner
    assert [url for _, _, url, _ in h.downstream.calls] == ["http://crm.test/orders"], "only TP1's record"
    assert h.engine.finished == 1
    assert TP0 not in h.consumer.committed, "nothing committed for a partition no longer ours"


async def test_a_commit_that_cannot_flush_the_dedup_table_fails_the_run(
    harness_factory: Callable[..., Harness],
) -> None:
    from topics.errors import StoreError

    h = harness_factory({TP0: [record(0, "SO-1")]})
    await h.run_until(1)

    async def broken_flush() -> int:
        raise StoreError("dedup store crm: flush failed: disk I/O error")

    h.store.flush = broken_flush  # type: ignore[method-assign]
    with pytest.raises(StoreError, match="disk I/O error"):
        await h.engine.run(asyncio.Event())


async def test_a_consumer_whose_group_coordination_ended_fails_the_run_instead_of_retrying_for_ever(
    harness_factory: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    # aiokafka raises this from every fetch once its coordination task ended (a static member fenced by another
    # under its name): retried, the sink fetched nothing for ever; read as an unreadable batch, it was held.
    from aiokafka.errors import KafkaError

    from topics.errors import BrokerError

    h = harness_factory({TP0: [record(0, "SO-1")]})
    await h.run_until(1)
    ended = KafkaError("Unexpected error during coordination KafkaError('Unexpected exception in heartbeat task')")

    async def getmany(timeout_ms: int, max_records: int) -> Mapping[tuple[str, int], list[Any]]:
        raise ended

    h.consumer.getmany = getmany  # type: ignore[method-assign]
    ended_run = r"^sink crm: the Kafka client's group coordination ended .*group_instance_id"
    async with asyncio.timeout(10):  # retried, the run would wait for a clock nobody moves: fail, not hang
        with pytest.raises(BrokerError, match=ended_run):
            await h.engine.run(asyncio.Event())
    assert not [r for r in caplog.records if r.getMessage() == "fetch failed, retrying"]
    assert h.consumer.committed == {TP0: 1}, "the drain still commits what was delivered"


async def test_a_fetch_the_brokers_refuse_for_an_acl_is_said_once_and_held_as_the_sinks_reason_until_allowed(
    harness_factory: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    # Review (ACL experiment): without Read on its group, a sink logged "fetch failed, retrying" 5 times a second
    # and /readyz said "joining its consumer group (or kafka unreachable)".
    from aiokafka.errors import GroupAuthorizationFailedError

    h = harness_factory({TP0: [record(0, "SO-1")]})
    fetch = h.consumer.getmany
    refusals: list[float] = []
    held: list[str | None] = []

    async def getmany(timeout_ms: int, max_records: int) -> Mapping[tuple[str, int], list[Any]]:
        if len(refusals) < 3:
            refusals.append(h.clock.now())
            held.append(h.engine.refused)
            raise GroupAuthorizationFailedError("orderbus.crm")
        return await fetch(timeout_ms, max_records)

    h.consumer.getmany = getmany  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO, "consumers.engine"):
        await h.run_until(1)
    refused = (
        "kafka does not let this daemon's principal use consumer group orderbus.crm (GroupAuthorizationFailedError): "
        "grant it what `orderbus topics acls` prints for these settings"
    )
    assert held == [None, refused, refused], "held as the sink's reason (readiness says it) while refused"
    assert h.engine.refused is None
    assert [b - a for a, b in itertools.pairwise(refusals)] == [5.0, 5.0], "asked again every 5 s, not every 0.2"
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "kafka" in r.getMessage()]
    assert said == [
        ("WARNING", f"kafka refuses this sink's fetch: {refused}"),
        ("INFO", "kafka allows this sink's fetch again"),
    ]


async def test_a_revoke_with_nothing_to_commit_keeps_a_refused_commit_said(
    harness_factory: Callable[..., Harness],
) -> None:
    from aiokafka.errors import GroupAuthorizationFailedError

    h = harness_factory({TP0: [record(0, "SO-1")]})

    async def refused(offsets: Mapping[tuple[str, int], int]) -> None:
        raise GroupAuthorizationFailedError("orderbus.crm")

    h.consumer.commit = refused  # type: ignore[method-assign]
    await h.run_until(1)
    reason = h.engine.refused
    assert reason is not None
    assert "orderbus.crm" in reason
    await h.engine.commit(only={TP1})  # a revoke of a partition with nothing of its own to commit
    assert h.engine.refused == reason, "the refusal of the others' commits still holds"
    await h.engine.commit()
    assert h.engine.refused is None, "nothing left to commit anywhere: the refused offsets are gone"


async def test_a_stop_does_not_wait_for_the_next_ask_of_a_refused_fetch(
    harness_factory: Callable[..., Harness],
) -> None:
    # Review: the 5 s between two asks did not watch `stop`: a SIGTERM waited for it before the drain.
    from aiokafka.errors import GroupAuthorizationFailedError

    h = harness_factory({TP0: [record(0, "SO-1")]})

    async def getmany(timeout_ms: int, max_records: int) -> Mapping[tuple[str, int], list[Any]]:
        raise GroupAuthorizationFailedError("orderbus.crm")

    h.consumer.getmany = getmany  # type: ignore[method-assign]
    stop = asyncio.Event()
    running = asyncio.create_task(h.engine.run(stop))
    await h.clock.sleep(1.0)  # refused, and 1 s into the 5 s before the next ask
    assert h.engine.refused is not None
    stopped_at = h.clock.now()
    stop.set()
    await running
    assert h.clock.now() - stopped_at < 1.0, "the drain began at once, not after the rest of the 5 s"


async def test_a_lane_that_fails_unexpectedly_fails_the_run_and_its_record_stays_unfinished(
    harness_factory: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    from topics.errors import StoreError

    h = harness_factory({TP0: [record(0, "SO-1", "order.updated"), record(1, "SO-2")]})

    async def broken_downstream_id(order_ref: str) -> str | None:
        raise StoreError("dedup store crm: downstream_id failed: disk I/O error")

    h.store.downstream_id = broken_downstream_id  # type: ignore[method-assign]
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    await h.clock.sleep(5)
    assert runner.done(), "the run fails without being stopped"
    stop.set()
    with pytest.raises(StoreError, match="disk I/O error"):
        await runner
    assert [method for _, method, _, _ in h.downstream.calls] == ["POST"], "SO-2's create; SO-1's update never left"
    assert TP0 not in h.consumer.committed, "SO-1's update comes again after the restart"
    failures = [r for r in caplog.records if r.levelname == "ERROR" and r.exc_info]
    assert [r.getMessage() for r in failures] == [
        "delivery failed unexpectedly; the record stays unfinished and the sink stops"
    ]


def hold_flushes(h: Harness, *, first_only: bool = False) -> asyncio.Event:
    """Make the dedup store's flushes wait until the returned event is set (only its first flush, if `first_only`)."""
    release = asyncio.Event()
    flush = h.store.flush
    calls = 0

    async def held_flush() -> int:
        nonlocal calls
        calls += 1
        if calls == 1 or not first_only:
            await release.wait()
        return await flush()

    h.store.flush = held_flush  # type: ignore[method-assign]
    return release


async def test_a_record_finishes_once_its_state_is_durable_and_its_keys_next_record_waits_for_that(
    harness_factory: Callable[..., Harness],
) -> None:
    h = harness_factory({TP0: [record(0, "SO-1"), record(1, "SO-1", "order.updated"), record(2, "SO-2")]})
    release = hold_flushes(h)
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    await h.clock.sleep(5)
    assert [method for _, method, _, _ in h.downstream.calls] == ["POST", "POST"], "SO-1's update waits"
    assert h.engine.finished == 0, "nothing is finished before its state is durable"
    assert h.consumer.committed == {}
    release.set()
    await h.wait_finished(3)
    assert [method for _, method, _, _ in h.downstream.calls] == ["POST", "POST", "PUT"]
    stop.set()
    await runner
    assert h.consumer.committed == {TP0: 3}
    assert h.metric("orderbus_deliveries_total", outcome="delivered") == 3


async def test_stop_waits_for_the_records_settling_and_commits_them(harness_factory: Callable[..., Harness]) -> None:
    h = harness_factory({TP0: [record(0, "SO-1"), record(1, "SO-2")]})
    release = hold_flushes(h)
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    await h.clock.sleep(1)
    assert len(h.downstream.calls) == 2
    stop.set()
    await h.clock.sleep(1)
    assert not runner.done(), "the drain waits for the states being made durable"
    release.set()
    await runner
    assert h.engine.finished == 2
    assert h.consumer.committed == {TP0: 2}


async def test_a_record_settling_after_its_partition_was_let_go_finishes_nothing(
    harness_factory: Callable[..., Harness],
) -> None:
    h = harness_factory({TP0: [record(0, "SO-A")], TP1: [record(0, "SO-B")]}, shutdown_grace=2.0)
    release = hold_flushes(h, first_only=True)  # the group flush of both records hangs; later flushes pass
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    await h.clock.sleep(1)
    assert len(h.downstream.calls) == 2
    await h.engine.on_revoked({TP0})  # waits the grace period for the settling records, then lets TP0 go
    assert TP0 not in h.consumer.committed
    assert h.engine.buffered == 1, "TP1's record is still held"
    release.set()
    await h.wait_finished(1)
    assert h.engine.finished == 1, "TP1's record; TP0's belongs to its next owner"
    assert h.engine.buffered == 0
    stop.set()
    await runner
    assert h.consumer.committed == {TP1: 1}


async def test_a_probe_stopped_while_it_waits_for_a_place_gives_its_slot_back(
    harness_factory: Callable[..., Harness],
) -> None:
    def script(request: HttpRequest, nth: int) -> Reply:
        return answer(503) if b"SO-DOWN" in (request.body or b"") else ok()

    h = harness_factory(
        {TP0: [record(0, "SO-DOWN", seed=10)], TP1: [record(i, f"SO-{i}") for i in range(4)]},
        script,
        max_in_flight=2,  # 4 places for records sent and not yet durable
        # Opens at the fifth call, once the four records are out: a lane queued when the circuit opens sends
        # nothing but a probe, and SO-DOWN's lane is to hold the probe here.
        circuit_window=5,
        circuit_min_calls=5,
        circuit_failure_ratio=0.2,
        circuit_open_for=5.0,
        shutdown_grace=1.0,
    )
    release = hold_flushes(h)  # the 4 records answered while SO-DOWN's 503 opened the circuit hold every place
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    await h.clock.sleep(6)
    assert len(h.downstream.calls) == 5
    assert h.engine.circuit_state == "half_open", "SO-DOWN's lane took the probe and waits for a place"
    revoke = asyncio.create_task(h.engine.on_revoked({TP0}))
    await h.clock.sleep(1.5)  # past the grace period: SO-DOWN's lane was cancelled while it waited
    assert h.engine.circuit_state == "half_open"
    release.set()
    await revoke
    h.consumer.partitions[TP1].append(record(4, "SO-4"))
    await h.clock.sleep(60)
    assert h.engine.finished == 5, "SO-4 went out as the probe: the cancelled lane gave its slot back"
    assert h.engine.circuit_state == "closed"
    stop.set()
    await runner


async def test_a_record_whose_state_could_not_be_flushed_finishes_with_a_later_flush_and_is_sent_once(
    harness_factory: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:

    h = harness_factory({TP0: [record(0, "SO-1")]}, commit_interval=10.0)
    fail_flushes(h, 3)  # its group flush and the next two tries (1 s, then 2 s later); the 4 s one passes
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    await h.clock.sleep(5)
    assert h.engine.finished == 0, "not finished while its state is not durable"
    h.consumer.partitions[TP0] += [record(1, "SO-1", "order.updated"), record(2, "SO-2")]
    await h.clock.sleep(10)
    assert [method for _, method, _, _ in h.downstream.calls] == ["POST", "POST", "PUT"], "SO-1's create went once"
    assert h.engine.finished == 3
    assert h.consumer.committed == {TP0: 3}, "the periodic commit moved past it"
    stop.set()
    await runner
    assert "could not be recorded in the dedup table; trying again" in caplog.text


async def test_a_record_whose_state_could_not_be_flushed_when_its_partition_is_drained_stays_unfinished(
    harness_factory: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    from topics.errors import StoreError

    h = harness_factory({TP0: [record(0, "SO-1")]}, commit_interval=3600.0)
    release = asyncio.Event()

    async def failing() -> int:
        await release.wait()
        raise StoreError("dedup store crm: flush failed: disk I/O error")

    h.store.flush = failing  # type: ignore[method-assign]
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    await h.clock.sleep(1)
    stop.set()
    await h.clock.sleep(1)
    release.set()  # the flush the drain waits for fails: the drain does not try again
    with pytest.raises(StoreError):
        await runner  # its commit flushes too
    assert len(h.downstream.calls) == 1
    assert h.engine.finished == 0
    assert TP0 not in h.consumer.committed, "its offset waits for a redelivery"
    assert "could not be recorded in the dedup table; it stays unfinished" in caplog.text


async def test_group_flush_shares_one_flush_and_reports_failures() -> None:
    from consumers.group_flush import GroupFlush
    from topics.errors import StoreError

    class CountingStore(MemoryDedupStore):
        flushes = 0
        fail = False

        async def flush(self) -> int:
            self.flushes += 1
            if self.fail:
                raise StoreError("disk full")
            return await super().flush()

    store = CountingStore()
    group = GroupFlush(store)
    for i in range(10):
        store.put(DeliveryState(f"k{i}", "e", "o", "done", 1, 200, 1.0, 1.0, None, None, None, 1.0))
    await asyncio.gather(*(group.batch() for _ in range(10)))
    assert store.flushes == 1
    assert len(await MemoryDedupStore(store.tables).get_many({f"k{i}": "o" for i in range(10)})) == 10
    store.fail = True
    with pytest.raises(StoreError):
        await group.batch()


async def test_group_flush_starts_the_next_flush_without_waiting_for_the_one_under_way() -> None:
    from consumers.group_flush import GroupFlush

    class SlowStore(MemoryDedupStore):
        started = 0
        release = asyncio.Event()

        async def flush(self) -> int:
            self.started += 1
            await self.release.wait()
            return await super().flush()

    async def turns(count: int = 5) -> None:
        for _ in range(count):
            await asyncio.sleep(0)

    store = SlowStore()
    group = GroupFlush(store)
    first = group.batch()
    await turns()
    second = group.batch()
    await turns()
    assert store.started == 2, "the second turn's records did not wait for the first flush"
    third = group.batch()
    fourth = group.batch()
    await turns()
    assert store.started == 2, "two flushes under way at most: later records gather for the next one"
    assert not any(waiter.done() for waiter in (first, second, third, fourth))
    store.release.set()
    await asyncio.gather(first, second, third, fourth)
    assert store.started == 3, "the records that gathered shared one flush"


async def test_a_replayed_dead_letter_is_delivered_in_order_and_unblocks_its_order(
    harness_factory: Callable[..., Harness],
) -> None:
    fixed = asyncio.Event()

    def script(request: HttpRequest, nth: int) -> Reply:
        if b"SO-BAD" in (request.body or b"") and request.method == "POST" and not fixed.is_set():
            return answer(400, body=b'{"error": "bad vat id"}')
        return ok()

    replay = ("orders.replay.crm", 0)
    h = harness_factory({TP0: [record(0, "SO-BAD"), record(1, "SO-BAD", "order.updated")], replay: []}, script)
    h.engine.replay_topic = "orders.replay.crm"
    await h.run_until(2)
    assert [letter.reason for letter in h.dead.letters] == ["rejected", "dead-lettered-predecessor"]

    # The downstream was fixed; the operator replays both dead letters, in their order.
    fixed.set()
    for offset, letter in enumerate(h.dead.letters):
        h.consumer.partitions[replay].append(
            FakeRecord(offset, letter.key, letter.value, headers=tuple(letter.record_headers()))
        )
    await h.run_until(2)
    applied = [(method, key) for _, method, _, key in h.downstream.calls if h.downstream.attempts[key] >= 1]
    assert [method for method, _ in applied][-2:] == ["POST", "PUT"]
    # The same idempotency keys as the first attempts.
    assert {key for _, key in applied[-2:]} == {letter.idempotency_key for letter in h.dead.letters}
    assert await h.store.blocked_orders(["SO-BAD"]) == set()
    assert len(h.dead.letters) == 2, "nothing new dead-lettered"


async def test_an_unblock_whose_flush_failed_during_a_drain_is_settled_by_the_next_flush(
    harness_factory: Callable[..., Harness],
) -> None:
    # The replayed head of an order's chain is delivered; the flush of its state (and the order's unblock) fails
    # while a revoke drains the replay partition. The failed flush's writes go with the next one, the drain's
    # commit: from then on the order is no longer blocked, and its next event is delivered, not dead-lettered.
    from topics.errors import StoreError

    phase = {"create": 400}
    replay = ("orders.replay.crm", 0)
    h = harness_factory({TP0: [record(0, "SO-BAD")], replay: []}, bad_create(phase), commit_interval=3600.0)
    h.engine.replay_topic = "orders.replay.crm"
    await h.run_until(1)
    [letter] = h.dead.letters
    phase["create"] = 201  # fixed downstream
    h.consumer.partitions[replay].append(
        FakeRecord(0, letter.key, letter.value, headers=tuple(letter.record_headers()))
    )
    flush, release, flushes = h.store.flush, asyncio.Event(), [0]

    async def first_fails_late() -> int:
        flushes[0] += 1
        if flushes[0] == 1:  # the group flush of the replayed record's state
            await release.wait()
            raise StoreError("dedup store crm: flush failed: disk I/O error")
        return await flush()

    h.store.flush = first_fails_late  # type: ignore[method-assign]
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    while flushes[0] == 0:
        await h.clock.sleep(0.01)
    revoke = asyncio.create_task(h.engine.on_revoked({replay}))
    await h.clock.sleep(0.1)
    release.set()
    await revoke
    assert await h.store.blocked_orders(["SO-BAD"]) == set(), "the drain's commit flushed the unblock"
    h.consumer.partitions[TP0].append(record(1, "SO-BAD", "order.updated"))
    await h.clock.sleep(5)
    stop.set()
    await runner
    assert [letter.reason for letter in h.dead.letters] == ["rejected"], "the update was delivered"
    assert [method for _, method, _, _ in h.downstream.calls][-1] == "PUT"


async def test_a_replay_that_fails_again_returns_with_its_history(harness_factory: Callable[..., Harness]) -> None:
    def script(request: HttpRequest, nth: int) -> Reply:
        return answer(422, body=b'{"error": "still wrong"}')

    replay = ("orders.replay.crm", 0)
    h = harness_factory({TP0: [record(0, "SO-BAD")], replay: []}, script)
    h.engine.replay_topic = "orders.replay.crm"
    await h.run_until(1)
    first = h.dead.letters[0]
    h.consumer.partitions[replay].append(FakeRecord(0, first.key, first.value, headers=tuple(first.record_headers())))
    await h.run_until(1)
    again = read_headers(h.dead.letters[1].record_headers())
    assert again["reason"] == "rejected"
    history = json.loads(again["history"])
    assert [(entry["reason"], entry["http-status"]) for entry in history] == [("rejected", "422")]
    assert again["topic"] == "orders.replay.crm"


REPLAY = ("orders.replay.crm", 0)


def replay_letters(h: Harness, letters: Iterable[DeadLetter]) -> None:
    """What `orderbus dlq replay` does: the dead letters, unchanged, appended to the sink's replay topic."""
    records = h.consumer.partitions[REPLAY]
    for letter in letters:
        records.append(FakeRecord(len(records), letter.key, letter.value, headers=tuple(letter.record_headers())))


def bad_order(h: Harness) -> list[str]:
    """The methods the downstream got for SO-BAD, in order (the other orders' calls left out)."""
    return [method for _, method, _, key in h.downstream.calls if _order(h, key) == "SO-BAD"]


def reasons(h: Harness) -> list[str]:
    return [letter.reason for letter in h.dead.letters]


def probe_beside_a_late_answer(
    harness_factory: Callable[..., Harness], script: Script
) -> tuple[Harness, list[tuple[float, str]]]:
    """SO-X on TP0 and SO-Q on TP1, a circuit that one failure opens for 5 s; SO-Q's first request is answered at
    t+7 and SO-X's second (the half-open probe, from t+5) at t+10. Returns the harness and the requests' starts."""
    h = harness_factory(
        {TP0: [record(0, "SO-X")], TP1: [record(0, "SO-Q", seed=10)]},
        script,
        max_in_flight=2,
        circuit_window=1,
        circuit_min_calls=1,
        circuit_failure_ratio=1.0,
        circuit_open_for=5.0,
    )
    started: list[tuple[float, str]] = []

    async def timed(request: HttpRequest, key: str) -> Reply | TransportFailure:
        order = "SO-Q" if b"SO-Q" in (request.body or b"") else "SO-X"
        started.append((h.clock.now(), order))
        nth = sum(1 for _, seen in started if seen == order)
        if (order, nth) in {("SO-Q", 1), ("SO-X", 2)}:
            await h.clock.sleep(7.0 if order == "SO-Q" else 5.0)
        return await h.downstream(request, key)

    h.engine._context.deliver = timed
    return h, started


def fail_flushes(h: Harness, times: int) -> list[int]:
    """Make the store's next `times` flushes fail ("database is locked"); returns how many are left to fail, as a
    one-item list the test can read."""
    from topics.errors import StoreError

    flush, left = h.store.flush, [times]

    async def failing() -> int:
        if left[0]:
            left[0] -= 1
            raise StoreError("dedup store crm: flush failed: database is locked")
        return await flush()

    h.store.flush = failing  # type: ignore[method-assign]
    return left


def bad_create(phase: dict[str, int]) -> Script:
    """A downstream that answers SO-BAD's create with ``phase["create"]`` (the test changes it), everything else 2xx."""

    def script(request: HttpRequest, nth: int) -> Reply:
        if b"SO-BAD" in (request.body or b"") and request.method == "POST":
            return answer(phase["create"])
        return ok()

    return script


async def blocked_by_a_400(harness_factory: Callable[..., Harness], script: Script) -> Harness:
    """SO-BAD's create was refused (400) and its update followed it: both are in the dead-letter topic."""
    h = harness_factory({TP0: [record(0, "SO-BAD"), record(1, "SO-BAD", "order.updated")], REPLAY: []}, script)
    h.engine.replay_topic = REPLAY[0]
    await h.run_until(2)
    assert reasons(h) == ["rejected", "dead-lettered-predecessor"]
    return h


async def test_a_new_event_of_an_order_whose_replay_is_still_retrying_follows_it_to_the_dead_letter_topic(
    harness_factory: Callable[..., Harness],
) -> None:
    # Found in review: the replay of the record that blocked the order lifted the block before any attempt, so a
    # cancel arriving while the replayed create was being retried went out (DELETE), and then the create was
    # dead-lettered again: the downstream got the cancel while the create was still in the dead-letter topic.
    phase = {"create": 400}
    script = bad_create(phase)

    h = await blocked_by_a_400(harness_factory, script)
    phase["create"] = 503  # the downstream now fails the create for a while
    replay_letters(h, h.dead.letters)
    running = asyncio.create_task(h.run_until(3))
    await h.clock.sleep(2)  # the replayed create is being retried
    assert set(bad_order(h)[1:]) == {"POST"}
    h.consumer.partitions[TP0].append(record(2, "SO-BAD", "order.cancelled", seed=99))
    await running
    assert set(bad_order(h)) == {"POST"}, "nothing of SO-BAD went out before its create was delivered"
    assert reasons(h)[:3] == ["rejected", "dead-lettered-predecessor", "dead-lettered-predecessor"]  # the cancel
    assert reasons(h)[3:] == ["retries-exhausted", "dead-lettered-predecessor"]  # the create again, its update
    assert await h.store.blocked_orders(["SO-BAD"]) == {"SO-BAD"}

    # Fixed for good: the operator replays every dead letter in their order; each is applied once, in order.
    phase["create"] = 201
    replay_letters(h, h.dead.letters)
    await h.run_until(5)
    assert bad_order(h)[-3:] == ["POST", "PUT", "DELETE"]
    assert [method for method in bad_order(h) if method != "POST"] == ["PUT", "DELETE"], "each applied once"
    assert len(h.dead.letters) == 5, "the second copies of the create and update were skipped, not dead-lettered"
    assert await h.store.blocked_orders(["SO-BAD"]) == set()
    assert h.consumer.committed[REPLAY] == 7


async def test_an_order_stays_blocked_until_its_last_dead_letter_is_delivered(
    harness_factory: Callable[..., Harness],
) -> None:
    # Delivering the replayed create must not let a new event pass the replayed update queued behind it.
    phase = {"create": 400, "update": 503}

    def script(request: HttpRequest, nth: int) -> Reply:
        if b"SO-BAD" in (request.body or b"") and request.method == "POST":
            return answer(phase["create"])
        if request.method == "PUT" and nth <= 2:
            return answer(phase["update"])
        return ok()

    h = await blocked_by_a_400(harness_factory, script)
    phase["create"] = 201
    replay_letters(h, h.dead.letters)
    running = asyncio.create_task(h.run_until(3))
    while "PUT" not in bad_order(h):  # the create is delivered; the update is being retried
        await h.clock.sleep(0.1)
    h.consumer.partitions[TP0].append(record(2, "SO-BAD", "order.cancelled", seed=99))
    await running
    assert bad_order(h) == ["POST", "POST", "PUT", "PUT", "PUT"], "no DELETE while the update was still on its way"
    assert reasons(h)[2:] == ["dead-lettered-predecessor"]
    assert await h.store.blocked_orders(["SO-BAD"]) == {"SO-BAD"}, "the cancel is still in the dead-letter topic"
    replay_letters(h, h.dead.letters[2:])
    await h.run_until(1)
    assert bad_order(h)[-1] == "DELETE"
    assert await h.store.blocked_orders(["SO-BAD"]) == set()


async def test_an_order_whose_unblock_was_flushed_at_the_second_try_is_unblocked(
    harness_factory: Callable[..., Harness],
) -> None:
    # Found in review: the order was unblocked in memory only by the first flush of the replayed record's state;
    # when that flush failed and a later one made it durable, the order stayed blocked in memory (an empty chain),
    # and every new event of it was dead-lettered, and the order blocked again in the file.

    phase = {"create": 400}
    script = bad_create(phase)

    h = harness_factory({TP0: [record(0, "SO-BAD")], REPLAY: []}, script)
    h.engine.replay_topic = REPLAY[0]
    await h.run_until(1)
    assert reasons(h) == ["rejected"]
    phase["create"] = 201
    left = fail_flushes(h, 1)  # the group flush of the replayed create's state; the lane's next try passes
    replay_letters(h, h.dead.letters)
    await h.run_until(1)
    assert left == [0]
    assert await h.store.blocked_orders(["SO-BAD"]) == set()
    h.consumer.partitions[TP0].append(record(1, "SO-BAD", "order.updated", seed=99))
    await h.run_until(1)
    assert bad_order(h) == ["POST", "POST", "PUT"], "the update after the delivered replay went out"
    assert reasons(h) == ["rejected"]
    assert await h.store.blocked_orders(["SO-BAD"]) == set()


async def test_an_unreadable_record_is_dead_lettered_without_blocking_its_order(
    harness_factory: Callable[..., Harness],
) -> None:
    # Found in review: an invalid record blocked its order, and its replay failed as invalid again, at the chain's
    # head: every later event of the order was dead-lettered for good, with no way to unblock it.
    h = harness_factory({TP0: [FakeRecord(0, b"SO-1", b"not json"), record(1, "SO-1")], REPLAY: []})
    h.engine.replay_topic = REPLAY[0]
    await h.run_until(2)
    assert reasons(h) == ["invalid"]
    assert [method for _, method, _, _ in h.downstream.calls] == ["POST"], "the order's valid event went out"
    assert await h.store.blocked_orders(["SO-1"]) == set()
    replay_letters(h, h.dead.letters)  # fails as invalid again, and still blocks nothing
    h.consumer.partitions[TP0].append(record(2, "SO-1", "order.updated", seed=99))
    await h.run_until(2)
    assert reasons(h) == ["invalid", "invalid"]
    assert [method for _, method, _, _ in h.downstream.calls] == ["POST", "PUT"]
    assert await h.store.blocked_orders(["SO-1"]) == set()


async def test_replaying_an_unreadable_record_that_blocked_its_order_before_unblocks_it(
    harness_factory: Callable[..., Harness],
) -> None:
    # A block written by an earlier version, whose chain is the unreadable record: its replay takes it off.
    h = harness_factory({TP0: [FakeRecord(0, b"SO-1", b"not json")], REPLAY: []})
    h.engine.replay_topic = REPLAY[0]
    await h.run_until(1)
    [letter] = h.dead.letters
    h.store.block_order("SO-1", encode_chain([letter.idempotency_key]))
    await h.store.flush()
    h.consumer.partitions[TP0].append(record(1, "SO-1"))
    await h.run_until(1)
    assert reasons(h) == ["invalid", "dead-lettered-predecessor"], "blocked, as that version left it"
    replay_letters(h, h.dead.letters)  # the unreadable record, then the create that followed it
    await h.run_until(2)
    assert reasons(h) == ["invalid", "dead-lettered-predecessor", "invalid"]
    assert [method for _, method, _, _ in h.downstream.calls] == ["POST"], "the create went out after it"
    assert await h.store.blocked_orders(["SO-1"]) == set()


async def test_replaying_only_the_rejected_record_keeps_the_order_blocked_across_a_restart(
    harness_factory: Callable[..., Harness],
) -> None:
    # `orderbus dlq replay --reason rejected` replays the record that blocked the order, not the events that
    # followed it: those must still be applied before any newer event, after a restart too (the block is durable).
    phase = {"create": 400}
    script = bad_create(phase)

    h = await blocked_by_a_400(harness_factory, script)
    create, update = h.dead.letters
    replay_letters(h, [update])  # the follower alone, before its predecessor: it follows again
    await h.run_until(1)
    assert reasons(h)[2:] == ["dead-lettered-predecessor"]
    phase["create"] = 201
    replay_letters(h, [create])
    await h.run_until(1)
    assert bad_order(h) == ["POST", "POST"]
    assert await h.store.blocked_orders(["SO-BAD"]) == {"SO-BAD"}, "its update is still in the dead-letter topic"

    # A restart: a new engine over what the first one made durable.
    await h.store.flush()
    again = harness_factory({TP0: [*h.consumer.partitions[TP0], record(2, "SO-BAD", "order.cancelled", seed=99)]})
    again.store.tables = h.store.tables
    again.consumer.committed = dict(h.consumer.committed)
    again.consumer.position = {TP0: h.consumer.committed[TP0]}
    again.consumer.partitions[REPLAY] = list(h.consumer.partitions[REPLAY])
    again.consumer.position[REPLAY] = len(again.consumer.partitions[REPLAY])
    again.engine.replay_topic = REPLAY[0]
    again.downstream.script = script
    await again.run_until(1)
    assert again.downstream.calls == [], "the cancel did not pass the update still in the dead-letter topic"
    assert reasons(again) == ["dead-lettered-predecessor"]
    replay_letters(again, [h.dead.letters[2], *again.dead.letters])  # the update (its latest copy), the cancel
    await again.run_until(2)
    assert [method for _, method, _, _ in again.downstream.calls] == ["PUT", "DELETE"]
    assert await again.store.blocked_orders(["SO-BAD"]) == set()


async def test_a_commit_the_broker_never_answers_gives_up_after_its_timeout_and_the_stop_ends(
    harness_factory: Callable[..., Harness],
) -> None:
    # aiokafka retries a commit until the group coordinator takes it; after a broker restart a SIGTERM's drain once
    # waited on one past a test's limit. Now a commit waits `commit_timeout` at most, and the stop goes on.
    h = harness_factory({TP0: [record(0, "SO-1")]}, commit_timeout=5.0)
    never = asyncio.Event()

    async def unanswered(offsets: Mapping[tuple[str, int], int]) -> None:
        await never.wait()

    h.consumer.commit = unanswered  # type: ignore[method-assign]
    started = h.clock.now()
    await h.run_until(1)  # the run's end drains and commits: it must end
    assert h.clock.now() - started < 60
    assert h.metric("orderbus_commit_failures_total") >= 1
    assert h.consumer.committed == {}


async def test_a_record_keyed_by_another_orders_number_is_dead_lettered_and_reaches_no_order(
    harness_factory: Callable[..., Harness],
) -> None:
    # SO-X's create is keyed right; then an update of SO-X and a cancel of SO-Y come keyed by a customer.
    x = dataclasses.replace(record(1, "SO-X", "order.updated"), key=b"CUST-1")
    y = dataclasses.replace(record(2, "SO-Y", "order.cancelled"), key=b"CUST-1")
    h = harness_factory({TP0: [record(0, "SO-X"), x, y]})
    await h.run_until(3)
    assert [call[1:3] for call in h.downstream.calls] == [("POST", "http://crm.test/orders")]
    assert [(letter.reason, letter.offset, letter.key) for letter in h.dead.letters] == [
        ("invalid", 1, b"CUST-1"),
        ("invalid", 2, b"CUST-1"),
    ]
    detail = read_headers(h.dead.letters[1].record_headers())["detail"]
    assert detail.startswith("key: must be the order number")
    assert "CUST-1" not in detail
    assert h.consumer.committed == {TP0: 3}


async def test_assigned_and_revoked_partitions_are_logged_apart_per_topic(
    harness_factory: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    # Regression: one list of numbers, "partitions": [0, 0, 1, 1], mixed the orders topic's and the replay topic's.
    h = harness_factory({TP0: [], TP1: [], REPLAY: []})
    h.engine.replay_topic = REPLAY[0]
    caplog.set_level(logging.INFO)
    h.engine.on_assigned({TP0, TP1, REPLAY})
    await h.engine.on_revoked({TP1, REPLAY})
    logged = {
        r.getMessage(): (getattr(r, "partitions", None), getattr(r, "replay_partitions", None))
        for r in caplog.records
        if r.getMessage() in ("partitions assigned", "partitions revoked")
    }
    assert logged == {"partitions assigned": ([0, 1], [0]), "partitions revoked": ([1], [0])}
    apart = [r for r in caplog.records if r.getMessage().startswith("replay partitions assigned apart")]
    assert [(r.levelname, getattr(r, "partitions", None), getattr(r, "replay_partitions", None)) for r in apart] == [
        ("WARNING", [0, 1], [0])
    ]
    caplog.clear()
    h.engine.on_assigned({TP1, (REPLAY[0], 1)})  # together, as `consumers.assignment` deals them
    assert not [r for r in caplog.records if r.getMessage().startswith("replay partitions assigned apart")]


async def test_after_an_outage_the_sink_ramps_up_instead_of_sending_everything_at_once(
    harness_factory: Callable[..., Harness],
) -> None:
    # Review (downstream owner): once the probe closed the circuit, every lane parked behind it sent at once,
    # `max_in_flight` requests at a system just back from an outage. Now 2 at first, one more per success.
    def script(request: HttpRequest, nth: int) -> Reply:
        return answer(503) if h.clock.now() < recovered else ok()

    records = {TP0: [record(i, f"SO-A{i}", seed=i) for i in range(150)]}
    records[TP1] = [record(i, f"SO-B{i}", seed=1000 + i) for i in range(150)]
    patient = Backoff(base=1.0, cap=8.0, max_attempts=100, max_elapsed=3600.0)
    h = harness_factory(records, script, max_in_flight=64, backoff=patient, circuit_open_for=5.0)
    recovered = h.clock.now() + 20.0
    starts = record_starts(h)
    await h.run_until(300, limit=3600)
    assert h.dead.letters == []
    before = [under_way for at, under_way, _ in starts if at < recovered]
    assert max(before) == 64, "before the outage was seen, the sink sent at full concurrency"
    assert_ramped_up([(under_way, limit) for at, under_way, limit in starts if at >= recovered])
    assert h.engine._context.ramp.limit is None


def record_starts(h: Harness) -> list[tuple[float, int, int | None]]:
    """Every request's (start, requests under way with it, the ramp's limit then), as the harness runs."""
    starts: list[tuple[float, int, int | None]] = []
    original = h.engine._context.deliver

    async def counted(request: HttpRequest, key: str) -> Reply | TransportFailure:
        starts.append((h.clock.now(), h.downstream.in_flight + 1, h.engine._context.ramp.limit))
        return await original(request, key)

    h.engine._context.deliver = counted
    return starts


def assert_ramped_up(after: list[tuple[int, int | None]]) -> None:
    """The requests after a gate closed, as (under way, the ramp's limit): the probe alone, then a slow start."""
    assert after[0][0] == 1, "the probe"
    assert max(under_way for under_way, _ in after[:6]) <= 3, "then two, then one more per success"
    assert all(limit is None or under_way <= limit for under_way, limit in after)
    assert max(under_way for under_way, _ in after) == 64, "and back at full concurrency"


async def test_after_a_credentials_pause_the_sink_ramps_up_too(harness_factory: Callable[..., Harness]) -> None:
    # Review (downstream owner): a 401 pause that ended (the credentials fixed, the probe answered 2xx) let every
    # lane parked behind it send at once, as the circuit's close did before it had a slow start.
    def script(request: HttpRequest, nth: int) -> Reply:
        return answer(401) if h.clock.now() < fixed else ok()

    h = harness_factory(outage_records(150), script, max_in_flight=64, auth_pause=5.0)
    fixed = h.clock.now() + 20.0
    starts = record_starts(h)
    await h.run_until(300, limit=3600)
    assert h.dead.letters == []
    assert_ramped_up([(under_way, limit) for at, under_way, limit in starts if at >= fixed])
    assert h.engine._context.ramp.limit is None


async def test_a_retry_after_hold_of_a_sink_without_a_rate_ends_in_a_slow_start(
    harness_factory: Callable[..., Harness],
) -> None:
    # Review (downstream owner): a sink without a `rate` held by a 503's Retry-After sent every lane parked meanwhile,
    # up to max_in_flight, the moment the hold ended, at a system that had just said "wait" (and at each hold's end).
    def script(request: HttpRequest, nth: int) -> Reply:
        return answer(503, "30") if h.clock.now() < back else ok()

    h = harness_factory(outage_records(150), script, max_in_flight=64)
    back = h.clock.now() + 10.0
    starts = record_starts(h)
    await h.run_until(300, limit=3600)
    assert h.dead.letters == []
    held = h.engine._context.pacer.held_until
    assert held > back, "the hold outlasted the outage: everything after it waited for its end"
    before = [under_way for at, under_way, _ in starts if at < back]
    assert max(before) == 64, "before the first answer, the sink sent at full concurrency"
    after = [(under_way, limit) for at, under_way, limit in starts if at >= back]
    assert [under_way for under_way, _ in after[:6]] == [1, 2, 1, 2, 3, 4], "two at first, then one more per success"
    assert all(limit is None or under_way <= limit for under_way, limit in after)
    assert max(under_way for under_way, _ in after) == 64, "and back at full concurrency"


async def test_a_409_with_retry_after_is_a_request_still_in_progress_and_is_sent_again(
    harness_factory: Callable[..., Harness],
) -> None:
    # Review (downstream owner): a retry that overtook its first request (a timeout, a reset connection) gets
    # "409, in progress, Retry-After" from a system that follows the IETF Idempotency-Key draft; counted done, the
    # order was lost if that first request then failed. A 409 without Retry-After still means "it exists".
    so_1: list[float] = []

    def script(request: HttpRequest, nth: int) -> Reply:
        if b'"SO-1"' in (request.body or b""):
            so_1.append(h.clock.now())
            return answer(409, "2") if nth == 1 else ok()
        return answer(409)

    h = harness_factory({TP0: [record(0, "SO-1"), record(1, "SO-2")]}, script)
    await h.run_until(2)
    assert len(h.downstream.calls) == 3, "SO-1 twice, SO-2 once"
    first, again = so_1
    assert again - first >= 2.0, "sent again no sooner than the Retry-After"
    assert h.metric("orderbus_deliveries_total", outcome="delivered") == 1
    assert h.metric("orderbus_deliveries_total", outcome="duplicate") == 1
    assert h.dead.letters == []
    assert h.engine._context.pacer.held_until <= first, "a key's 409 does not hold the whole sink"


async def test_a_409_in_progress_for_ever_ends_as_retries_exhausted_and_one_with_retry_after_0_is_done(
    harness_factory: Callable[..., Harness],
) -> None:
    def script(request: HttpRequest, nth: int) -> Reply:
        return answer(409, "1" if b'"SO-1"' in (request.body or b"") else "0")

    h = harness_factory({TP0: [record(0, "SO-1"), record(1, "SO-2")]}, script)
    await h.run_until(2)
    [letter] = h.dead.letters
    assert (letter.rule, letter.attempts) == ("409-in-progress", 5), "the backoff's max_attempts, then a dead letter"
    assert h.metric("orderbus_deliveries_total", outcome="duplicate") == 1, "Retry-After 0 sets no wait: it exists"
    assert h.engine._context.circuit.state == "closed", "a key's wait is not an outage"


async def test_a_409_to_a_cancel_is_a_dead_letter_when_the_sink_says_so_and_a_create_s_409_stays_a_duplicate(
    harness_factory: Callable[..., Harness],
) -> None:
    # Review (downstream owner): a system that cannot cancel an order it has shipped answers the DELETE with 409;
    # the policy is per status, so the cancel counted as done ("already exists") and was silently lost.
    policy = DEFAULT_POLICY.with_overrides({"DELETE 409": "dead_letter"})
    sink = RestSink("crm", "http://crm.test", policy=policy)

    def script(request: HttpRequest, nth: int) -> Reply:
        return ok() if request.method == "PUT" else answer(409)

    records = [record(0, "SO-1"), record(1, "SO-1", "order.updated"), record(2, "SO-1", "order.cancelled")]
    h = harness_factory({TP0: records}, script, sink=sink)
    await h.run_until(3)
    assert [method for _, method, _, _ in h.downstream.calls] == ["POST", "PUT", "DELETE"]
    assert h.metric("orderbus_deliveries_total", outcome="duplicate") == 1, "the create's 409: it exists"
    [letter] = h.dead.letters
    assert (letter.reason, letter.rule, letter.attempts) == ("rejected", "override-delete-409", 1)


async def test_a_409_with_retry_after_to_a_cancel_is_in_progress_also_when_the_sink_dead_letters_its_409s(
    harness_factory: Callable[..., Harness],
) -> None:
    # Review: the override made a cancel retried while its first attempt was still processed a dead letter at once.
    sink = RestSink("crm", "http://crm.test", policy=DEFAULT_POLICY.with_overrides({"DELETE 409": "dead_letter"}))

    def script(request: HttpRequest, nth: int) -> Reply:
        return answer(409, "1") if request.method == "DELETE" and nth == 1 else ok()

    h = harness_factory({TP0: [record(0, "SO-1"), record(1, "SO-1", "order.cancelled")]}, script, sink=sink)
    await h.run_until(2)
    assert [method for _, method, _, _ in h.downstream.calls] == ["POST", "DELETE", "DELETE"]
    assert h.dead.letters == []
    assert h.metric("orderbus_deliveries_total", outcome="delivered") == 2


async def test_status_shows_no_ramp_while_a_credentials_pause_holds_the_sink(
    harness_factory: Callable[..., Harness],
) -> None:
    # Review: a 401 in the middle of a ramp left its limit in the status, which `orderbus status` showed as
    # "closed, ramping up: 4 in flight" beside "auth: PAUSED", with nothing in flight.
    answered: list[float] = []  # when each request after the outage came

    def script(request: HttpRequest, nth: int) -> Reply:
        if h.clock.now() < recovered:
            return answer(503)
        answered.append(h.clock.now())
        if len(answered) <= 7:  # the probe, then the ramp's first rounds (2, then 4 in flight)
            return ok()
        return answer(401) if h.clock.now() < answered[7] + 30.0 else ok()  # the credentials fixed 30 s later

    patient = Backoff(base=1.0, cap=8.0, max_attempts=100, max_elapsed=3600.0)
    h = harness_factory(
        outage_records(150), script, max_in_flight=64, backoff=patient, circuit_open_for=5.0, auth_pause=5.0
    )
    h.downstream.latency = 0.2  # rounds of answers take time: the ramp is under way when the 401s come
    recovered = h.clock.now() + 20.0
    seen: list[tuple[bool, int | None]] = []

    async def sample() -> None:
        while True:
            status = h.engine.status()
            seen.append((bool(status["auth_paused"]), cast(int | None, status["ramp_limit"])))
            await h.clock.sleep(0.25)

    sampler = asyncio.create_task(sample())
    try:
        await h.run_until(300, limit=3600)
    finally:
        sampler.cancel()
    assert h.dead.letters == []
    assert any(paused for paused, _ in seen), "the 401s paused the sink"
    assert [limit for paused, limit in seen if paused and limit is not None] == []
    assert any(limit is not None for paused, limit in seen if not paused), "a ramp is shown when it holds lanes"


def outage_then(after: Callable[[int], Reply], h_clock: Callable[[], float], recovered: float) -> Script:
    """503 until `recovered`, then `after(n)` for the n-th call since (the probe is call 0)."""
    since: list[int] = []

    def script(request: HttpRequest, nth: int) -> Reply:
        if h_clock() < recovered:
            return answer(503)
        since.append(0)
        return after(len(since) - 1)

    return script


def outage_records(count: int) -> dict[tuple[str, int], list[FakeRecord]]:
    return {
        TP0: [record(i, f"SO-A{i}", seed=i) for i in range(count)],
        TP1: [record(i, f"SO-B{i}", seed=1000 + i) for i in range(count)],
    }


async def test_a_retry_after_while_the_sink_ramps_up_holds_every_lane_the_ramp_lets_go(
    harness_factory: Callable[..., Harness],
) -> None:
    # Review: lanes took their pacer token before queueing in the ramp, so a hold set meanwhile (a 429 with
    # Retry-After: 30) did not stop them: 53 requests inside the 30 s. The ramp now comes before the pace.
    patient = Backoff(base=1.0, cap=8.0, max_attempts=100, max_elapsed=3600.0)
    clock_box: list[FakeClock] = []
    recovered = 20.0

    def after(n: int) -> Reply:
        return answer(429, "30") if n == 1 else ok()

    h = harness_factory(
        outage_records(100),
        outage_then(after, lambda: clock_box[0].now() - start, recovered),
        max_in_flight=64,
        backoff=patient,
        circuit_open_for=5.0,
    )
    clock_box.append(h.clock)
    start = h.clock.now()
    sent: list[float] = []
    original = h.engine._context.deliver

    async def timed(request: HttpRequest, key: str) -> Reply | TransportFailure:
        sent.append(h.clock.now() - start)
        return await original(request, key)

    h.engine._context.deliver = timed
    await h.run_until(200, limit=3600)
    after_recovery = [at for at in sent if at >= recovered]
    hold_start = after_recovery[1] + h.downstream.latency  # the 429 arrives one latency after it was sent
    inside = [at for at in after_recovery[2:] if hold_start + 0.001 < at < hold_start + 29.99]
    assert inside == [], f"{len(inside)} requests inside the 30 s the downstream asked for"
    assert len(after_recovery) > 100, "and the ramp went on after the hold"


async def test_a_drain_does_not_wait_for_lanes_queued_in_the_ramp(harness_factory: Callable[..., Harness]) -> None:
    # Review: a lane queued in the ramp was not parked, so a drain (a rebalance, a stop) waited out the whole
    # shutdown_grace for lanes that had sent nothing.
    patient = Backoff(base=1.0, cap=8.0, max_attempts=100, max_elapsed=3600.0)
    h = harness_factory(outage_records(100), None, max_in_flight=64, backoff=patient, circuit_open_for=5.0)
    start = h.clock.now()
    h.downstream.script = outage_then(lambda n: ok(), lambda: h.clock.now() - start, 20.0)
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    while not (h.engine._context.ramp.limit is not None and h.clock.now() - start > 20.0):
        await h.clock.sleep(0.01)
    h.downstream.latency = 1.0  # the ramp's few requests are slow: most lanes queue in the ramp
    await h.clock.sleep(0.5)
    began = h.clock.now()
    await h.engine.drain({TP1})
    assert h.clock.now() - began < 2.0, "the requests under way (1 s), not the 10 s grace"
    stop.set()
    await runner


async def test_a_sink_paused_by_its_settings_fetches_and_sends_nothing_until_let_go(
    harness_factory: Callable[..., Harness],
) -> None:
    # A downstream's maintenance window: the operator sets sinks.crm.paused and reloads; the orders wait in Kafka.
    h = harness_factory({TP0: [record(i, f"SO-{i}") for i in range(5)], TP1: [record(0, "SO-X")]})
    h.engine.set_held(True)
    assert h.metric("orderbus_sink_paused") == 1
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    await h.clock.sleep(3600)
    assert h.downstream.calls == []
    assert h.consumer.position == {}, "nothing fetched: the records stay in Kafka, not in memory"
    assert h.engine.status()["paused_by_settings"] is True
    h.engine.set_held(False)
    assert h.metric("orderbus_sink_paused") == 0
    assert h.engine.status()["ramp_limit"] is not None, "let go, the lanes start slowly"
    await h.wait_finished(6)
    assert len(h.downstream.calls) == 6
    stop.set()
    await runner
    assert h.consumer.committed == {TP0: 5, TP1: 1}


async def test_a_pause_holds_the_retries_of_records_already_taken(harness_factory: Callable[..., Harness]) -> None:
    # Paused while a record waits for its retry: the retry waits for the operator, not for its backoff alone.
    def script(request: HttpRequest, nth: int) -> Reply:
        return answer(503) if nth == 1 else ok()

    h = harness_factory({TP0: [record(0, "SO-0")]}, script)
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    while not h.downstream.calls:
        await h.clock.sleep(0.01)
    h.engine.set_held(True)  # the 503 came; its retry is due in about a second
    await h.clock.sleep(600)
    assert len(h.downstream.calls) == 1
    assert h.engine.finished == 0
    h.engine.set_held(False)
    await h.wait_finished(1)
    assert len(h.downstream.calls) == 2
    assert h.metric("orderbus_deliveries_total", outcome="delivered") == 1
    stop.set()
    await runner


async def test_the_time_paused_counts_against_no_records_retry_budget(harness_factory: Callable[..., Harness]) -> None:
    # Review: a record that failed once before a 2-hour pause was dead-lettered (retries-exhausted, max_elapsed
    # 600 s) at its first failure after the let-go, and with it the order's later events: a downstream that fails
    # is the very reason an operator pauses its sink.
    def script(request: HttpRequest, nth: int) -> Reply:
        return answer(503) if nth <= 2 else ok()

    h = harness_factory({TP0: [record(0, "SO-0")]}, script)
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    while not h.downstream.calls:
        await h.clock.sleep(0.01)
    h.engine.set_held(True)
    await h.clock.sleep(7200)
    h.engine.set_held(False)
    await h.wait_finished(1)
    stop.set()
    await runner
    assert h.dead.letters == []
    assert len(h.downstream.calls) == 3, "the 503 after the pause is retried as the first was"
    assert h.metric("orderbus_deliveries_total", outcome="delivered") == 1


async def test_a_held_lane_is_waiting_not_parked_and_a_stop_ends_it_at_once(
    harness_factory: Callable[..., Harness],
) -> None:
    # `parked` (the metric, status, the live view) counts keys waiting for a retry: a pause is not one.
    h = harness_factory({TP0: [record(0, "SO-0"), record(1, "SO-1")]}, lambda request, nth: answer(503))
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    while len(h.downstream.calls) < 2:
        await h.clock.sleep(0.01)
    h.engine.set_held(True)
    await h.clock.sleep(600)  # past every backoff: both wait at the gate now
    assert h.engine.status()["parked"] == 0
    began = h.clock.now()
    stop.set()
    await runner
    assert h.clock.now() - began < 1.0, "the drain does not wait its grace period for held lanes"
    assert h.consumer.committed == {}, "nothing finished: nothing committed past them"


async def test_a_rebalance_feeds_the_membership_watch_after_its_drain(harness_factory: Callable[..., Harness]) -> None:
    # `ChurnWatch` hears of each assignment, and of each revoke once the revoked partitions are drained: the drain
    # is this member's own time, not time out of the group (review: a test whose drain took no time could not tell).
    h = harness_factory({TP0: [record(0, "SO-0")]}, shutdown_grace=20.0)
    h.downstream.latency = 15.0  # the request under way when the rebalance comes: the drain waits for it
    h.engine._churn = ChurnWatch(Membership("orderbus-0"), "orderbus.crm", h.clock)
    h.engine.on_assigned({TP0})
    stop = asyncio.Event()
    runner = asyncio.create_task(h.engine.run(stop))
    while not h.downstream.in_flight:
        await h.clock.sleep(0.01)
    revoked_at = h.clock.now()
    await h.engine.on_revoked({TP0})
    drained_at = h.clock.now()
    assert drained_at - revoked_at > 10.0, "the drain waited for the answer"
    await h.clock.sleep(revoked_at + JOIN_WAIT + 1 - h.clock.now())
    assert h.engine.membership_problem is None, "out of the group only since the drain ended"
    await h.clock.sleep(drained_at + JOIN_WAIT + 1 - h.clock.now())
    assert h.engine.membership_problem is not None, "revoked and never assigned again"
    assert h.engine.status()["membership"] == {"group_instance_id": "orderbus-0", "session_timeout": 45.0}
    h.engine.on_assigned({TP0})
    assert h.engine.membership_problem is None
    stop.set()
    await runner


async def test_a_partition_moved_past_deleted_records_commits_past_them_with_no_record_after_them(
    harness_factory: Callable[..., Harness],
) -> None:
    # consumers.expiry moved TP0 from 0 to 50 (Kafka deleted 0-49, and nothing came after): without the commit
    # moving to 50, every restart and the partition's next owner would find the same records missing again.
    h = harness_factory({TP0: [], TP1: [record(0, "SO-9")]})
    h.consumer.moves = {TP0: Move(50, deleted_from=0)}
    await h.run_until(1)
    assert h.consumer.committed == {TP0: 50, TP1: 1}
    assert h.metric("orderbus_expired_records_total") == 50


async def test_a_partition_moved_back_under_records_read_stops_the_run(harness_factory: Callable[..., Harness]) -> None:
    from topics.errors import BrokerError

    h = harness_factory({TP0: [record(0, "SO-1"), record(1, "SO-2")]})
    fetch, fetches = h.consumer.getmany, 0

    async def getmany(timeout_ms: int, max_records: int) -> Mapping[tuple[str, int], list[Any]]:
        nonlocal fetches
        fetches += 1
        if fetches == 2:  # after 0 and 1 were read, TP0's log ends before them: the topic made again
            h.consumer.moves = {TP0: Move(0)}
            return {}
        return await fetch(timeout_ms, max_records)

    h.consumer.getmany = getmany  # type: ignore[method-assign]
    async with asyncio.timeout(10):  # the harness's clock jumps whenever the loop is idle
        with pytest.raises(BrokerError, match=r"^sink crm: orders:0 now begins again before what the sink has read"):
            await h.engine.run(asyncio.Event())


async def test_a_move_of_a_partition_drained_during_the_fetch_is_neither_counted_nor_committed(
    harness_factory: Callable[..., Harness],
) -> None:
    # aiokafka still lists a partition as assigned while its revoke is under way: the move consumers.expiry made
    # of it belongs to its next owner, which finds the deleted records itself.
    h = harness_factory({TP0: [], TP1: [record(0, "SO-9")]})
    fetch, fetches = h.consumer.getmany, 0

    async def getmany(timeout_ms: int, max_records: int) -> Mapping[tuple[str, int], list[Any]]:
        nonlocal fetches
        fetches += 1
        if fetches == 1:
            await h.engine.on_revoked({TP0})  # during the settle's lookups
            h.consumer.moves = {TP0: Move(50, deleted_from=0)}
        return await fetch(timeout_ms, max_records)

    h.consumer.getmany = getmany  # type: ignore[method-assign]
    await h.run_until(1)
    assert TP0 not in h.consumer.committed
    assert h.metric("orderbus_expired_records_total") == 0
