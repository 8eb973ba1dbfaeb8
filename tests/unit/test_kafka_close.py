"""Closing aiokafka's clients within a bound (`consumers.kafka_close`), with fakes that never hear from the broker.

The waits follow a fake clock that jumps ahead whenever every task waits (a fake's stop either returns at once or
never). The real thing (a frozen broker, a daemon's SIGTERM) is in tests/integration/test_crash.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import SimpleNamespace
from typing import Any, cast

import pytest

from consumers.clock import FakeClock
from consumers.kafka_close import CLEANUP, leave_group, stop_producer


class Closable:
    def __init__(self, *, hangs: bool = False) -> None:
        self.closed = False
        self._hangs = hangs

    async def close(self) -> None:
        if self._hangs:  # a connection whose close waits for buffers a frozen broker never reads
            await asyncio.Event().wait()
        self.closed = True


class Consumer:
    """An AIOKafkaConsumer's shape: `stop` leaves the group (here: waits for an answer that never comes unless
    `answers`), then closes the fetcher and the client."""

    def __init__(self, *, answers: bool, client_hangs: bool = False) -> None:
        self._answers = answers
        self._fetcher = Closable()
        self._client = Closable(hangs=client_hangs)
        self.stop_cancelled = False

    async def stop(self) -> None:
        if not self._answers:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.stop_cancelled = True
                raise
        await self._fetcher.close()
        await self._client.close()


class Producer:
    """An AIOKafkaProducer's shape: `stop` waits for its sender task, which flushes (here: never, unless `flushes`)."""

    def __init__(self, *, flushes: bool) -> None:
        self._flushes = flushes
        self._sender = SimpleNamespace(sender_task=None)

    async def stop(self) -> None:
        async def flush() -> None:
            if not self._flushes:
                await asyncio.Event().wait()

        self._sender.sender_task = asyncio.ensure_future(flush())
        with contextlib.suppress(asyncio.CancelledError):  # aiokafka's stop ends once its sender is cancelled
            await self._sender.sender_task


async def test_a_consumer_that_leaves_at_once_is_stopped_the_normal_way(caplog: pytest.LogCaptureFixture) -> None:
    consumer = Consumer(answers=True)
    clock = FakeClock()
    async with clock.autojump():  # a wait would move the clock, not hang the test
        await leave_group(cast(Any, consumer), "sink crm", timeout=1.0, clock=clock)
    assert clock.now() == 1000.0, "no wait at all"
    assert consumer._fetcher.closed
    assert consumer._client.closed
    assert not consumer.stop_cancelled
    assert not caplog.records


async def test_a_leave_the_broker_does_not_answer_is_given_up_and_the_connections_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    consumer = Consumer(answers=False)
    clock = FakeClock()
    with caplog.at_level(logging.WARNING):
        async with clock.autojump():
            await leave_group(cast(Any, consumer), "sink crm", timeout=1.5, clock=clock)
    assert clock.now() == 1001.5, "the leave given up after its timeout; the closes end at once"
    assert consumer.stop_cancelled
    assert consumer._fetcher.closed, "what stop did not reach is closed"
    assert consumer._client.closed
    assert [record.getMessage() for record in caplog.records] == [
        "kafka did not answer sink crm's leave of its group within 1.5 s: "
        "its partitions move when its session times out"
    ]


async def test_connections_that_do_not_close_are_left_to_the_loops_end() -> None:
    consumer = Consumer(answers=False, client_hangs=True)
    clock = FakeClock()
    async with clock.autojump():
        await leave_group(cast(Any, consumer), "sink crm", timeout=1.0, clock=clock)  # returns
    assert clock.now() == 1001.0 + CLEANUP
    assert consumer._fetcher.closed
    assert not consumer._client.closed


async def test_a_producer_that_flushes_at_once_is_stopped_the_normal_way(caplog: pytest.LogCaptureFixture) -> None:
    producer = Producer(flushes=True)
    clock = FakeClock()
    async with clock.autojump():  # a wait would move the clock, not hang the test
        await stop_producer(cast(Any, producer), 1.0, "dead letters", clock=clock)
    assert clock.now() == 1000.0, "no wait at all"
    assert not producer._sender.sender_task.cancelled()
    assert not caplog.records


async def test_a_producer_that_cannot_flush_has_its_sender_cancelled_after_the_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    producer = Producer(flushes=False)
    clock = FakeClock()
    with caplog.at_level(logging.WARNING):
        async with clock.autojump():
            await stop_producer(cast(Any, producer), 2.0, "dead letters", clock=clock)
    assert clock.now() == 1002.0, "the flush given up after the grace; the cancelled stop ends at once"
    assert producer._sender.sender_task.cancelled()
    assert [record.getMessage() for record in caplog.records] == [
        "dead letters: kafka producer did not flush within 2 s, closing anyway"
    ]
