"""`Diagnosis`: why Kafka cannot be reached, asked at most once a minute; `KafkaWatch`: asked for the sinks while one
hears nothing from its brokers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import pytest

from consumers.clock import FakeClock
from daemon.kafka_watch import Diagnosis, KafkaWatch
from daemon.status import render_status


@dataclass
class Sink:
    kafka_silent: bool = False


async def test_the_cause_is_asked_while_a_sink_is_silent_kept_and_forgotten_when_it_hears_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    crm, shipping = Sink(), Sink()
    answers = iter(["the broker's certificate is not trusted (...)", "connection refused", None, "connection refused"])
    asked: list[float] = []

    async def diagnose() -> str | None:
        asked.append(clock.now())
        return next(answers)

    watch = KafkaWatch([crm, shipping], Diagnosis(diagnose, clock), clock)
    with caplog.at_level(logging.INFO, "daemon.kafka_watch"):
        await watch.look()
        assert (asked, watch.unreachable) == ([], None), "every sink hears its broker: nothing asked"
        shipping.kafka_silent = True
        await watch.look()
        assert watch.unreachable == "the broker's certificate is not trusted (...)"
        await clock.advance(59.0)
        await watch.look()
        assert len(asked) == 1, "not again within the interval (with SASL, each asking is a login)"
        await clock.advance(1.0)
        await watch.look()
        assert watch.unreachable == "connection refused"
        await clock.advance(60.0)
        await watch.look()
        assert watch.unreachable == "the bootstrap servers answer; a broker they name does not"
        shipping.kafka_silent = False
        await watch.look()
        assert watch.unreachable is None
        crm.kafka_silent = True  # another outage, seconds later: asked afresh, not the last one's answer
        await watch.look()
        assert len(asked) == 4
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "kafka unreachable for the sinks: the broker's certificate is not trusted (...)"),
        ("WARNING", "kafka unreachable for the sinks: connection refused"),
        ("WARNING", "kafka unreachable for the sinks: the bootstrap servers answer; a broker they name does not"),
        ("INFO", "kafka answers the sinks again"),
        ("WARNING", "kafka unreachable for the sinks: connection refused"),
    ]


async def test_it_looks_every_two_seconds_until_cancelled() -> None:
    clock = FakeClock()
    sink = Sink(kafka_silent=True)

    async def diagnose() -> str | None:
        return "connection refused"

    watch = KafkaWatch([sink], Diagnosis(diagnose, clock), clock)
    task = asyncio.create_task(watch.run())
    try:
        await clock.advance(1.9)
        assert watch.unreachable is None
        await clock.advance(0.1)
        assert watch.unreachable == "connection refused"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_orderbus_status_says_the_sinks_cause_on_a_line_of_its_own() -> None:
    document: dict[str, object] = {
        "sinks": {},
        "ingest": None,
        "kafka_unreachable": "connection refused: no broker listens",
    }
    assert "kafka: UNREACHABLE: connection refused: no broker listens" in render_status(document).splitlines()
    assert not any(line.startswith("kafka:") for line in render_status({"sinks": {}}).splitlines())
