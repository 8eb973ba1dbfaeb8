"""`KafkaPublisher` against a fake producer: acks=all answers, refusals, and publishes that outlive their timeout.

The publish timeouts run on a fake clock that jumps whenever every task waits, so "the broker did not
acknowledge in time" happens without sleeping; the real broker's side is in tests/integration/test_ingest_kafka.py.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    KafkaConnectionError,
    KafkaError,
    MessageSizeTooLargeError,
    TopicAuthorizationFailedError,
)

from consumers.clock import FakeClock
from consumers.deadlines import DEFAULT_RESOLUTION
from daemon.kafka_watch import DIAGNOSIS_INTERVAL, Diagnosis
from daemon.publisher import (
    PROBE_MAX,
    PROBE_MIN,
    BrokerUnavailable,
    KafkaPublisher,
    Published,
    PublishPending,
    PublishRefused,
)
from topics.broker_diagnosis import unreachable
from topics.codec import EncodedRecord
from topics.errors import BrokerError, ConfigError, NotYetError, PublishError

RECORD = EncodedRecord(key=b"SO-1", value=b'{"order": "SO-1"}', headers=[("event-type", b"order.created")])


@dataclass
class FakeProducer:
    """The part of `AIOKafkaProducer` the publisher uses. `mode`: "ack" at once, "hold" the outcome, "refuse"."""

    options: dict[str, Any]
    mode: str = "ack"
    sent: list[tuple[str, bytes, bytes, list[tuple[str, bytes]]]] = field(default_factory=list)
    outcomes: list[asyncio.Future[Any]] = field(default_factory=list)
    handed_over: asyncio.Event = field(default_factory=asyncio.Event)
    stopped: bool = False

    def __post_init__(self) -> None:
        self.client = SimpleNamespace(force_metadata_update=self._metadata)
        self._sender = SimpleNamespace(sender_task=None)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self.stopped = True

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2, 3}

    async def send(self, topic: str, *, value: bytes, key: bytes, headers: list[tuple[str, bytes]]) -> Any:
        if self.mode == "refuse":
            raise MessageSizeTooLargeError()
        self.sent.append((topic, key, value, headers))
        outcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.mode == "ack":
            outcome.set_result(SimpleNamespace(topic=topic, partition=3, offset=41))
        self.outcomes.append(outcome)
        self.handed_over.set()
        return outcome

    async def _metadata(self) -> bool:
        return True


@pytest.fixture
async def started() -> AsyncIterator[tuple[KafkaPublisher, list[FakeProducer]]]:
    producers: list[FakeProducer] = []

    def factory(**options: Any) -> FakeProducer:
        producers.append(FakeProducer(options))
        return producers[-1]

    clock = FakeClock()
    # No health check in these tests: the autojumping clock would run one at every idle moment.
    publisher = KafkaPublisher(
        "orders", {"bootstrap_servers": "kafka:9092"}, health_interval=math.inf, producer_factory=factory, clock=clock
    )
    await publisher.start()
    async with clock.autojump():
        yield publisher, producers
    await publisher.close(grace=1.0)


async def test_the_producer_is_idempotent_with_acks_all(started: tuple[KafkaPublisher, list[FakeProducer]]) -> None:
    publisher, [producer] = started
    assert publisher.available
    assert producer.options["acks"] == "all"
    assert producer.options["enable_idempotence"] is True
    assert producer.options["bootstrap_servers"] == "kafka:9092"


async def test_published_once_the_broker_acknowledged(started: tuple[KafkaPublisher, list[FakeProducer]]) -> None:
    publisher, [producer] = started
    assert await publisher.publish(RECORD, timeout=1.0) == Published("orders", 3, 41)
    assert producer.sent == [("orders", RECORD.key, RECORD.value, RECORD.headers)]


async def test_a_record_the_producer_refuses_is_a_publish_error(
    started: tuple[KafkaPublisher, list[FakeProducer]],
) -> None:
    publisher, [producer] = started
    producer.mode = "refuse"
    with pytest.raises(PublishError, match="refused"):
        await publisher.publish(RECORD, timeout=1.0)
    assert publisher.available  # one bad record says nothing about the broker


@pytest.mark.parametrize(
    "error",
    [
        KafkaError("NOT_ENOUGH_REPLICAS"),
        # aiokafka fails every pending record with its sender task's error when that task dies (aio-libs/aiokafka#1038):
        # let out as it was, the ingest answered 500 and kept the key in flight, so every retry got 409.
        RuntimeError("the sender task died"),
    ],
)
async def test_a_record_the_broker_does_not_store_is_a_publish_error(
    started: tuple[KafkaPublisher, list[FakeProducer]], error: Exception
) -> None:
    publisher, [producer] = started
    producer.mode = "hold"
    publishing = asyncio.create_task(publisher.publish(RECORD, timeout=1.0))
    await producer.handed_over.wait()
    producer.outcomes[0].set_exception(error)
    with pytest.raises(PublishError, match="did not store"):
        await publishing


async def test_a_record_refused_for_an_acl_is_said_once_kept_for_the_operator_and_forgotten_once_one_is_stored(
    started: tuple[KafkaPublisher, list[FakeProducer]], caplog: pytest.LogCaptureFixture
) -> None:
    # Review (ACL experiment): without Write on the orders topic, every webhook got 503 "kafka is unreachable" while
    # /readyz said ready and the status "publishing".
    publisher, [producer] = started
    producer.mode = "hold"
    with caplog.at_level(logging.INFO, "daemon.publisher"):
        for _ in range(2):
            producer.handed_over.clear()
            publishing = asyncio.create_task(publisher.publish(RECORD, timeout=1.0))
            await producer.handed_over.wait()
            producer.outcomes[-1].set_exception(TopicAuthorizationFailedError("orders"))
            with pytest.raises(PublishRefused) as refused:
                await publishing
        assert str(refused.value) == "kafka does not let this server publish orders (its operators are told why)"
        why = (
            "kafka does not let this daemon's principal use topic orders (TopicAuthorizationFailedError): grant it "
            "what `orderbus topics acls` prints for these settings"
        )
        assert publisher.refused == why
        assert publisher.available, "the brokers answer: not unreachable"
        producer.mode = "ack"
        assert await publisher.publish(RECORD, timeout=1.0) == Published("orders", 3, 41)
    assert publisher.refused is None
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", f"kafka refuses the ingest's records: {why}"),
        ("INFO", "kafka stores the ingest's records again"),
    ], "said once, not per webhook"


async def test_no_ack_in_time_is_pending_and_shuts_the_gate_until_the_late_ack(
    started: tuple[KafkaPublisher, list[FakeProducer]],
) -> None:
    publisher, [producer] = started
    producer.mode = "hold"
    with pytest.raises(PublishPending) as pending:
        await publisher.publish(RECORD, timeout=0)
    assert not publisher.available
    with pytest.raises(BrokerUnavailable):
        await publisher.publish(RECORD, timeout=1.0)
    assert len(producer.sent) == 1  # refused before the producer: nothing half-published

    producer.outcomes[0].set_result(SimpleNamespace(topic="orders", partition=1, offset=7))
    assert await pending.value.future == Published("orders", 1, 7)
    assert publisher.available  # the late ack proves the broker is back


async def test_a_pending_publish_that_fails_later_resolves_as_a_publish_error(
    started: tuple[KafkaPublisher, list[FakeProducer]],
) -> None:
    publisher, [producer] = started
    producer.mode = "hold"
    with pytest.raises(PublishPending) as pending:
        await publisher.publish(RECORD, timeout=0)
    producer.outcomes[0].set_exception(KafkaError("REQUEST_TIMED_OUT"))
    with pytest.raises(PublishError):
        await pending.value.future
    assert not publisher.available


async def test_a_pending_publish_stays_unknown_when_the_producer_is_closed(
    started: tuple[KafkaPublisher, list[FakeProducer]],
) -> None:
    publisher, [producer] = started
    producer.mode = "hold"
    with pytest.raises(PublishPending) as pending:
        await publisher.publish(RECORD, timeout=0)
    producer.outcomes[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending.value.future


async def test_a_publish_times_out_at_its_deadline_not_before() -> None:
    clock = FakeClock()
    producer = FakeProducer({}, mode="hold")
    publisher = KafkaPublisher(
        "orders", {}, health_interval=math.inf, producer_factory=lambda **_: producer, clock=clock
    )
    await publisher.start()
    try:
        publishing = asyncio.create_task(publisher.publish(RECORD, timeout=5.0))
        await clock.advance(4.9)
        assert not publishing.done()
        await clock.advance(0.1 + DEFAULT_RESOLUTION)  # the sweeper sees it within one resolution
        assert publishing.done()
        with pytest.raises(PublishPending):
            await publishing
    finally:
        await publisher.close(grace=1.0)


async def test_a_metadata_request_no_broker_answers_closes_the_gate_until_the_probe_gets_an_answer() -> None:
    """The health check's metadata update fails (aiokafka answers False, it does not raise): the gate closes, and
    the reconnect probe, at growing intervals, reopens it once an update succeeds."""
    clock = FakeClock()
    answers = iter([False, False])  # the health check's, the probe's first; then every update succeeds
    asked: list[tuple[float, bool]] = []  # (seconds since start, gate open) at each metadata update

    async def metadata() -> bool:
        asked.append((clock.now() - start, publisher.available))
        return next(answers, True)

    producer = FakeProducer({})
    producer.client = SimpleNamespace(force_metadata_update=metadata)
    publisher = KafkaPublisher("orders", {}, health_interval=2.0, producer_factory=lambda **_: producer, clock=clock)
    start = clock.now()
    await publisher.start()
    try:
        await clock.advance(2.0)
        assert not publisher.available  # the health check got no answer
        await clock.advance(PROBE_MIN)
        assert not publisher.available  # nor did the probe's first try
        await clock.advance(2 * PROBE_MIN)
        assert publisher.available
        assert asked == [(2.0, True), (2.0 + PROBE_MIN, False), (2.0 + 3 * PROBE_MIN, False)]
    finally:
        await publisher.close(grace=1.0)  # the health check is still there to cancel, not dead of an error


async def test_no_producer_is_built_before_a_deferred_topic_check_passes(caplog: pytest.LogCaptureFixture) -> None:
    """Kafka did not answer the start's topic check: the producer's first metadata request would have the broker
    create a missing topic with its defaults (one partition). So the check runs first, with every probe, until it
    passes: unreachable, then the topic missing (said once, and why the ingest is not ready), then there."""
    clock = FakeClock()
    producers: list[FakeProducer] = []
    missing = "topic orders does not exist: run `orderbus topics apply` with these settings"
    unreachable = BrokerError("cannot list topics")
    outcomes: list[Exception | None] = [unreachable, ConfigError(missing), unreachable, ConfigError(missing), None]

    async def topic_check() -> None:
        if (outcome := outcomes.pop(0)) is not None:
            raise outcome

    def factory(**options: Any) -> FakeProducer:
        producers.append(FakeProducer(options))
        return producers[-1]

    publisher = KafkaPublisher(
        "orders", {}, health_interval=math.inf, producer_factory=factory, clock=clock, topic_check=topic_check
    )

    def state() -> tuple[bool, str | None, int]:
        return publisher.available, publisher.topic_missing, len(producers)

    await publisher.start()
    try:
        assert state() == (False, None, 0)
        with pytest.raises(BrokerUnavailable):
            await publisher.publish(RECORD, timeout=1.0)
        await clock.advance(PROBE_MIN)
        assert state() == (False, missing, 0)
        with pytest.raises(BrokerUnavailable, match="the orders topic does not exist yet"):
            await publisher.publish(RECORD, timeout=1.0)
        await clock.advance(2 * PROBE_MIN)
        assert state() == (False, None, 0)  # unreachable again: whether the topic exists is not known then
        await clock.advance(4 * PROBE_MIN)
        assert state() == (False, missing, 0)
        await clock.advance(PROBE_MAX)
        assert state() == (True, None, 1)
        assert outcomes == []
        assert await publisher.publish(RECORD, timeout=1.0) == Published("orders", 3, 41)
    finally:
        await publisher.close(grace=1.0)
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert said == [f"the ingest answers 503 until its topic exists: {missing}"] * 2  # once, and after the outage


async def test_topics_this_principal_may_not_see_keep_the_probe_asking_until_they_are_granted() -> None:
    # Review: a NotYetError (an ACL) from the deferred topic check ended the probe task: nothing asked again after
    # the grant, and the stop re-raised it.
    clock = FakeClock()
    hidden = "the brokers do not let this daemon's principal (User:orderbus) see topic orders (...)"
    outcomes: list[Exception | None] = [NotYetError(hidden), NotYetError(hidden), None]

    async def topic_check() -> None:
        if (outcome := outcomes.pop(0)) is not None:
            raise outcome

    def factory(**options: Any) -> FakeProducer:
        return FakeProducer(options)

    publisher = KafkaPublisher(
        "orders", {}, health_interval=math.inf, producer_factory=factory, clock=clock, topic_check=topic_check
    )
    await publisher.start()
    try:
        assert (publisher.available, publisher.topic_missing) == (False, hidden)
        with pytest.raises(BrokerUnavailable, match=r"^kafka does not let this daemon see the orders topic$"):
            await publisher.publish(RECORD, timeout=1.0)
        await clock.advance(PROBE_MIN)
        assert (publisher.available, publisher.topic_missing) == (False, hidden)
        await clock.advance(2 * PROBE_MIN)
        assert (publisher.available, publisher.topic_missing, outcomes) == (True, None, [])
    finally:
        await publisher.close(grace=1.0)


async def test_a_producer_refused_at_start_is_said_so_and_forgotten_once_it_is_let() -> None:
    # Review: the refusal stayed after the probe's producer started, and kept the ingest not ready for good.
    clock = FakeClock()
    producers: list[FakeProducer] = []

    class Refused(FakeProducer):
        async def start(self) -> None:
            raise ClusterAuthorizationFailedError()

    def factory(**options: Any) -> FakeProducer:
        producers.append((Refused if not producers else FakeProducer)(options))
        return producers[-1]

    publisher = KafkaPublisher("orders", {}, health_interval=math.inf, producer_factory=factory, clock=clock)
    await publisher.start()

    def state() -> tuple[bool, str | None, int]:
        return publisher.available, publisher.refused, len(producers)

    try:
        available, refused, _ = state()
        assert not available
        assert refused is not None
        assert refused.startswith("kafka does not let this daemon's principal start an idempotent producer")
        assert publisher.unreachable == refused
        await clock.advance(PROBE_MIN)
        assert state() == (True, None, 2)
    finally:
        await publisher.close(grace=1.0)


async def test_a_topic_send_refuses_for_an_acl_answers_as_a_refusal(
    started: tuple[KafkaPublisher, list[FakeProducer]],
) -> None:
    # Review: aiokafka's send raises TopicAuthorizationFailedError itself when it cannot get the topic's metadata.
    publisher, [producer] = started

    async def send(topic: str, **_: Any) -> Any:
        raise TopicAuthorizationFailedError(topic)

    producer.send = send  # type: ignore[method-assign]
    with pytest.raises(PublishRefused):
        await publisher.publish(RECORD, timeout=1.0)
    assert publisher.refused is not None


async def test_a_producer_whose_sender_died_is_replaced_by_a_new_one() -> None:
    """aiokafka's sender task can die of an error it does not expect (aio-libs/aiokafka#1038: under uvloop, a write
    to a connection the broker just reset); the producer then fails every record for good while its metadata
    requests still succeed. The health check closes it, and the reconnect probe builds a new one."""
    clock = FakeClock()
    producers: list[FakeProducer] = []

    def factory(**options: Any) -> FakeProducer:
        producers.append(FakeProducer(options))
        return producers[-1]

    publisher = KafkaPublisher("orders", {}, health_interval=2.0, producer_factory=factory, clock=clock)
    await publisher.start()
    try:
        died: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        died.set_exception(KafkaError("Unexpected error during batch delivery"))
        producers[0]._sender = SimpleNamespace(sender_task=died)
        await clock.advance(2.0)
        assert not publisher.available  # refused at once from here on, not handed to the dead producer
        assert producers[0].stopped
        with pytest.raises(BrokerUnavailable):
            await publisher.publish(RECORD, timeout=1.0)
        await clock.advance(PROBE_MIN)
        assert publisher.available
        assert len(producers) == 2
        assert await publisher.publish(RECORD, timeout=1.0) == Published("orders", 3, 41)
        assert (len(producers[0].sent), len(producers[1].sent)) == (0, 1)
    finally:
        await publisher.close(grace=1.0)


async def test_a_stopped_producers_cancelled_sender_is_not_taken_for_dead() -> None:
    clock = FakeClock()
    producer = FakeProducer({})
    publisher = KafkaPublisher("orders", {}, health_interval=2.0, producer_factory=lambda **_: producer, clock=clock)
    await publisher.start()
    try:
        cancelled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        cancelled.cancel()
        producer._sender = SimpleNamespace(sender_task=cancelled)
        await clock.advance(2.0)
        assert publisher.available
        assert not producer.stopped
    finally:
        await publisher.close(grace=1.0)


async def test_aiokafka_still_keeps_its_sender_task_where_the_watch_looks() -> None:
    """The watch reads a private attribute (aiokafka offers no public one); a rename would turn it off quietly."""
    producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1")  # never started: no connection is made
    try:
        assert producer._sender.sender_task is None
    finally:
        await producer.stop()


async def test_why_kafka_cannot_be_reached_is_kept_and_said_when_it_changes(caplog: pytest.LogCaptureFixture) -> None:
    """aiokafka fails a start with "Unable to bootstrap" whatever the cause: the publisher asks its diagnosis (at most
    every `DIAGNOSIS_INTERVAL`: with SASL each asking is a login), keeps its answer for `orderbus status`, says it at
    start and again only when it changes, and forgets it once the broker answers: a later outage's cause is not
    the first one's."""
    clock = FakeClock()
    causes = iter(["the broker refused the SASL credentials", "connection refused", "the broker's certificate expired"])
    asked: list[float] = []
    failing = True

    class Failing(FakeProducer):
        async def start(self) -> None:
            if failing:
                raise KafkaConnectionError("Unable to bootstrap")

    async def diagnose() -> str | None:
        asked.append(clock.now() - began)
        return next(causes)

    async def metadata() -> bool:
        return not failing

    def factory(**options: Any) -> FakeProducer:
        producer = Failing(options)
        producer.client = SimpleNamespace(force_metadata_update=metadata)
        return producer

    publisher = KafkaPublisher(
        "orders", {}, health_interval=30.0, producer_factory=factory, clock=clock, diagnosis=Diagnosis(diagnose, clock)
    )
    began = clock.now()
    with caplog.at_level(logging.DEBUG, "daemon.publisher"):
        await publisher.start()
        try:
            assert publisher.unreachable == "the broker refused the SASL credentials"
            await clock.advance(DIAGNOSIS_INTERVAL - 1)  # the probe's tries meanwhile: the same cause, not asked
            assert asked == [0.0]
            await clock.advance(PROBE_MAX)
            assert publisher.unreachable == "connection refused"
            assert len(asked) == 2
            failing = False
            await clock.advance(PROBE_MAX)
            assert publisher.available
            assert publisher.unreachable is None
            failing = True  # the health check's metadata request gets no answer, then the probe's
            await clock.advance(30.0 + PROBE_MAX)
            assert not publisher.available
            assert publisher.unreachable == "the broker's certificate expired", "this outage's, asked again"
            assert len(asked) == 3
        finally:
            await publisher.close(grace=1.0)
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "unreachable" in r.getMessage()]
    start_line = (
        "kafka unreachable at start, ingest answers 503 until it is back: the broker refused the SASL credentials"
    )
    assert said[0] == ("WARNING", start_line)
    assert {line for line in said[1:] if line[0] == "DEBUG"} == {
        ("DEBUG", "kafka still unreachable: the broker refused the SASL credentials"),  # said once at WARNING
        ("DEBUG", "kafka still unreachable: the broker's certificate expired"),
    }
    assert [line for line in said[1:] if line[0] == "WARNING"] == [
        ("WARNING", "kafka still unreachable: connection refused"),
        ("WARNING", "kafka still unreachable: the broker's certificate expired"),
    ]


async def test_the_deferred_topic_checks_ask_why_at_most_once_a_minute_too() -> None:
    """Kafka down at start: the probe retries the topic check every 5 s, and each failed check says why through the
    daemon's one `Diagnosis` (each asking is a login with SASL), not a fresh diagnosis per try."""
    clock = FakeClock()
    asked: list[float] = []

    async def diagnose() -> str | None:
        asked.append(clock.now())
        return "the broker refused the SASL credentials"

    diagnosis = Diagnosis(diagnose, clock)

    async def topic_check() -> None:  # as `topics.admin.missing_topics` fails
        raise BrokerError(await unreachable("list topics", {}, KafkaConnectionError("Unable to bootstrap"), diagnosis))

    publisher = KafkaPublisher(
        "orders", {}, health_interval=math.inf, clock=clock, topic_check=topic_check, diagnosis=diagnosis
    )
    await publisher.start()
    try:
        await clock.advance(DIAGNOSIS_INTERVAL - 1)  # a dozen checks
        assert len(asked) == 1
        assert publisher.unreachable == "cannot list topics at None: the broker refused the SASL credentials"
        await clock.advance(PROBE_MAX)
        assert len(asked) == 2
    finally:
        await publisher.close(grace=1.0)
