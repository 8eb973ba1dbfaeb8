"""Closing aiokafka's clients within a bound, so that a stop with the broker gone stays within systemd's
``TimeoutStopSec`` (or a container's stop grace period) instead of ending in SIGKILL.

aiokafka waits for the broker as long as a request may take: a consumer's ``stop`` sends LeaveGroup and waits its
request timeout (40 s) for the answer, and a producer's ``stop`` flushes its pending records for as long as that
takes, for ever with idempotence on. A daemon with three sinks, its broker frozen (SIGSTOP), had not exited two
minutes after SIGTERM: each sink left its group 40 s after the one before. Neither wait protects anything: the
sinks committed what they delivered before their consumers stop, and a record that was not acknowledged keeps its
source uncommitted (a dead letter) or its idempotency key in flight (the ingest), so it is sent again after the
restart under the same ids.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from consumers.clock import Clock, SystemClock

__all__ = ["CLEANUP", "DEAD_LETTER_CLOSE_GRACE", "LEAVE_TIMEOUT", "leave_group", "sender_task", "stop_producer"]

log = logging.getLogger(__name__)

# Seconds a consumer's stop may take. Leaving is a courtesy: the group moves the partitions at once instead of
# after the session timeout (6 s, `consumers.membership.DYNAMIC_SESSION_TIMEOUT`); a broker that answers does so in
# milliseconds. The sinks leave one after another, so a stop's budget counts this once per sink.
LEAVE_TIMEOUT: Final = 1.0
# Seconds the dead-letter producer may flush at a stop. The sinks wait for their dead letters' acks before they
# commit, so what is pending then was given up on: its records stay uncommitted and are dead-lettered again.
DEAD_LETTER_CLOSE_GRACE: Final = 1.0
# Seconds for what follows a wait given up on: the cancelled stop's unwinding and the closes of what it left open.
# Past them they are left to the event loop's end.
CLEANUP: Final = 0.25


async def leave_group(
    consumer: AIOKafkaConsumer, owner: str, timeout: float = LEAVE_TIMEOUT, *, clock: Clock | None = None
) -> None:
    """Stop `consumer` (leave its group, unless it is a static member, and close its connections) within `timeout`
    seconds; after that, give up the leave and close its fetcher and connections within `CLEANUP` more (said once,
    naming `owner`). The waits follow `clock` (the system's by default)."""
    clock = clock if clock is not None else SystemClock()
    stopping = asyncio.ensure_future(consumer.stop())
    if await _ended(stopping, timeout, clock):
        return
    log.warning(
        "kafka did not answer %s's leave of its group within %g s: its partitions move when its session times out",
        owner,
        timeout,
    )
    ends = clock.now() + CLEANUP
    stopping.cancel()
    await _until(stopping, ends, clock)
    # What `stop` did not reach once cancelled (aiokafka has no public way): the fetch loop and the connections,
    # whose tasks would otherwise run until the event loop closes.
    fetcher = getattr(consumer, "_fetcher", None)
    if fetcher is not None:
        await _until(asyncio.ensure_future(fetcher.close()), ends, clock)
    await _until(asyncio.ensure_future(consumer._client.close()), ends, clock)


async def stop_producer(producer: AIOKafkaProducer, grace: float, owner: str, *, clock: Clock | None = None) -> None:
    """Stop `producer`, flushing what is pending for at most `grace` seconds; then its sender is cancelled, what it
    held is not sent (said, naming `owner`), and the rest of the stop gets `CLEANUP` more. The waits follow `clock`
    (the system's by default)."""
    clock = clock if clock is not None else SystemClock()
    stopping = asyncio.ensure_future(producer.stop())
    if await _ended(stopping, grace, clock):
        return
    log.warning("%s: kafka producer did not flush within %g s, closing anyway", owner, grace)
    sender = sender_task(producer)
    if sender is not None:
        sender.cancel()
    await _until(stopping, clock.now() + CLEANUP, clock)


def sender_task(producer: AIOKafkaProducer) -> asyncio.Task[None] | None:
    """aiokafka's sender task of `producer`: private, and read in one place (a fake producer may have none)."""
    task: asyncio.Task[None] | None = getattr(getattr(producer, "_sender", None), "sender_task", None)
    return task


async def _ended(stopping: asyncio.Future[None], timeout: float, clock: Clock) -> bool:
    """Whether `stopping` ended within `timeout` seconds (its error raised if it failed)."""
    if await _within(stopping, timeout, clock):
        stopping.result()
        return True
    return False


async def _until(closing: asyncio.Future[None], ends: float, clock: Clock) -> None:
    """Wait for `closing` until `clock` reads `ends`, then leave it to the event loop's end (with a frozen broker, a
    connection's close waits for buffers the broker never reads). Its error, now or later, is logged, not raised:
    the stop goes on."""
    closing.add_done_callback(_said)
    await _within(closing, ends - clock.now(), clock)


async def _within(future: asyncio.Future[None], seconds: float, clock: Clock) -> bool:
    """Whether `future` is done within `seconds` of `clock`'s time (it is left running when not)."""
    if not future.done():
        timer = asyncio.ensure_future(clock.sleep(seconds))
        try:
            await asyncio.wait([future, timer], return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
    return future.done()


def _said(closing: asyncio.Future[None]) -> None:
    if not closing.cancelled() and (exc := closing.exception()) is not None:
        log.warning("kafka client did not close cleanly: %r", exc)
