"""The engine's Kafka side: a consumer per sink group, the dead-letter producer, the rebalance listener, and a
restart of aiokafka's metadata task when it dies (`keep_metadata_synchronizer`), and the guard of aiokafka's connection
writes against uvloop's RuntimeError (`guard_connection_writes`).

This is the one boundary where aiokafka's types and errors meet the engine's ports (`ConsumerPort`,
`DeadLetterWriter`); the engine itself sees tuples and our errors.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.conn import AIOKafkaConnection, CloseReason
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    MessageSizeTooLargeError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)

from consumers.assignment import ASSIGNORS
from consumers.deadletter import DeadLetter
from consumers.expiry import Move, Positions
from consumers.membership import DYNAMIC, Membership
from consumers.unreadable import ReadGuard, Skips
from consumers.work import TopicPartitionKey
from topics.catalogue import consumer_group, dlq_topic
from topics.errors import PublishError

log = logging.getLogger(__name__)


class KafkaConsumerPort:
    """`consumers.consumer_port.ConsumerPort` over an `AIOKafkaConsumer` in the sink's own group; its fetches and
    pauses go through a `ReadGuard` (records the client cannot read)."""

    def __init__(self, consumer: AIOKafkaConsumer, guard: ReadGuard, positions: Positions) -> None:
        self._consumer = consumer
        self.guard = guard
        self._positions = positions
        self._moved: dict[TopicPartitionKey, Move] = {}

    async def getmany(self, timeout_ms: int, max_records: int) -> Mapping[TopicPartitionKey, list[Any]]:
        try:
            return await self.guard.getmany(timeout_ms, max_records)
        except (NoOffsetForPartitionError, OffsetOutOfRangeError) as exc:  # raised before any record is taken
            moved = await self._positions.settle(exc)
            self.guard.moved({tp: move.offset for tp, move in moved.items()})
            self._moved.update(moved)
            return {}

    def moved(self) -> Mapping[TopicPartitionKey, Move]:
        moved, self._moved = self._moved, {}
        return moved

    async def commit(self, offsets: Mapping[TopicPartitionKey, int]) -> None:
        await self._consumer.commit({TopicPartition(topic, partition): o for (topic, partition), o in offsets.items()})

    def pause(self, tps: Iterable[TopicPartitionKey]) -> None:
        self.guard.pause(TopicPartition(*tp) for tp in tps)

    def resume(self, tps: Iterable[TopicPartitionKey]) -> None:
        self.guard.resume(TopicPartition(*tp) for tp in tps)

    def unreadable(self) -> Mapping[TopicPartitionKey, int]:
        return {(tp[0], tp[1]): held.offset for tp, held in self.guard.held.items()}

    def skip_unreadable(self, skips: Skips) -> None:
        self.guard.skip(skips)

    def assignment(self) -> set[TopicPartitionKey]:
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    async def end_offsets(self, tps: Iterable[TopicPartitionKey]) -> Mapping[TopicPartitionKey, int]:
        ends = await self._consumer.end_offsets([TopicPartition(*tp) for tp in tps])
        return {(tp.topic, tp.partition): offset for tp, offset in ends.items()}

    async def beginning_offsets(self, tps: Iterable[TopicPartitionKey]) -> Mapping[TopicPartitionKey, int]:
        starts = await self._consumer.beginning_offsets([TopicPartition(*tp) for tp in tps])
        return {(tp.topic, tp.partition): offset for tp, offset in starts.items()}

    async def committed_offset(self, tp: TopicPartitionKey) -> int | None:
        value: int | None = await self._consumer.committed(TopicPartition(*tp))
        return value


# The root of the failures above and below: aiokafka's `AIOKafkaConnection.send` turns an OSError of the socket
# write into KafkaConnectionError (and closes the connection), which every caller handles, but under uvloop the same
# write raises RuntimeError (aio-libs/aiokafka#1038), which no caller expects: it ends whichever background task
# sent the request, the metadata task, a producer's sender (which then fails every record for good), a consumer's
# fetcher or its group coordination. `guard_connection_writes` makes that RuntimeError what aiokafka makes of an
# OSError; the task-level guards stay, for what it does not cover.


def guard_connection_writes() -> None:
    """Once per process: a RuntimeError from `AIOKafkaConnection.send` closes the connection as broken and is
    raised as `KafkaConnectionError`, as aiokafka does for an OSError. Called before any client is created."""
    if getattr(AIOKafkaConnection.send, "_orderbus_guarded", False):
        return
    AIOKafkaConnection.send = _guarded_send(AIOKafkaConnection.send)


def _guarded_send(send: Any) -> Any:
    @functools.wraps(send)
    def guarded(self: AIOKafkaConnection, request: Any, expect_response: bool = True) -> Any:
        try:
            return send(self, request, expect_response)
        except KafkaError:  # aiokafka's own errors are RuntimeErrors too, and its callers handle them
            raise
        except RuntimeError as exc:
            self.close(reason=CloseReason.CONNECTION_BROKEN)
            raise KafkaConnectionError(f"connection broken: {exc}") from exc

    guarded._orderbus_guarded = True  # type: ignore[attr-defined]
    return guarded


# aiokafka's client refreshes the cluster metadata in one background task (`AIOKafkaClient._md_synchronizer`), and
# whoever calls `force_metadata_update()` waits for a future only that task resolves; among them the group
# coordinator's lookup, which holds the group's lookup lock meanwhile, so every commit and heartbeat of the consumer
# queues behind it. The task survives a KafkaError or a timeout only. Under uvloop, writing to a connection the broker
# has just reset raises RuntimeError ("... the handler is closed"; asyncio's own loop raises nothing), and aiokafka
# still takes such a connection for connected until its reader task has run (aio-libs/aiokafka#1038). A metadata
# request sent in that window ended the task, silently: after a broker restart a sink's commits then waited for ever.
# So a synchronizer that ends other than by cancellation (the client's close) is logged and started again.
METADATA_RESTART_DELAY = 0.1  # seconds: a synchronizer that keeps failing at once is restarted ten times a second


def keep_metadata_synchronizer(client: Any, owner: str, *, delay: float = METADATA_RESTART_DELAY) -> None:
    """Restart `client`'s metadata synchronizer (an `AIOKafkaClient`, started) `delay` seconds after it dies of an
    error. A client without one (a test's fake) has nothing to keep."""
    task = getattr(client, "_sync_task", None)
    if task is not None:
        task.add_done_callback(functools.partial(_synchronizer_ended, client, owner, delay))


def _synchronizer_ended(client: Any, owner: str, delay: float, task: asyncio.Task[None]) -> None:
    if task.cancelled() or client._sync_task is not task:  # closed, or already replaced
        return
    log.error("kafka metadata task died, restarting it", extra={"client": owner, "error": repr(task.exception())})
    client._sync_task = asyncio.get_running_loop().create_task(
        _synchronize_again(client, delay), name=f"kafka-metadata-{owner}"
    )
    keep_metadata_synchronizer(client, owner, delay=delay)


async def _synchronize_again(client: Any, delay: float) -> None:
    await asyncio.sleep(delay)
    if client._md_update_fut is not None and not client._md_update_waiter.done():
        client._md_update_waiter.set_result(None)  # an update is awaited: the new synchronizer makes it at once
    await client._md_synchronizer()


# A killed daemon cannot leave its groups: its partitions wait until its session times out (`consumers.membership`:
# 6 s, the smallest a broker allows by default, or 45 s for a static member); a heartbeat every 2 s keeps it. The
# rebalance timeout stays longer than a revoke's drain (`shutdown_grace`, 10 s by default).
HEARTBEAT_INTERVAL_MS = 2_000
REBALANCE_TIMEOUT_MS = 60_000
# A sink whose buffer is full, or whose circuit is open, stops fetching on purpose, and its partitions stay paused
# for as long as the downstream is down. aiokafka leaves the group after `max_poll_interval_ms` (5 min by default)
# without a fetch: every 5 minutes of an outage then cost a rebalance, a drain, and a refill of the buffer (and
# ~30 MB of RSS, seen in bench.py's 10-minute outage). The process's liveness is watched elsewhere (the systemd
# watchdog, /readyz), so the consumer never leaves on its own.
MAX_POLL_INTERVAL_MS = 7 * 24 * 3600 * 1000
# aiokafka prefetches: a partition's fetched records wait in the consumer until `getmany` takes them, and a full
# buffer does not take them. With aiokafka's defaults (1 MiB a partition, 50 MiB a request) that is 12 MiB of raw
# records for 12 partitions on top of `max_buffered`, fetched the first time a held sink resumes with a lag
# (bench.py's outage: one +19 MB RSS step). A sink delivers a few thousand orders a second at most, so 2 MiB a
# request (256 KiB a partition) is still several fetches' worth of work. A record batch larger than a limit is
# never cut: the broker returns it whole when its partition comes first in a fetch (KIP-74; aiokafka shuffles the
# partitions of every request) and nothing for that partition until then, so no order is too big to fetch.
FETCH_MAX_BYTES = 2 * 1024 * 1024
MAX_PARTITION_FETCH_BYTES = 256 * 1024


def sink_consumer(
    client_options: Mapping[str, Any],
    sink: str,
    *,
    prefix: str = "",
    fetch_max_bytes: int = FETCH_MAX_BYTES,
    max_partition_fetch_bytes: int = MAX_PARTITION_FETCH_BYTES,
    membership: Membership = DYNAMIC,
) -> AIOKafkaConsumer:
    """The consumer of one sink's group: manual commits only, committed reads only; a position it does not have or
    that is out of range raised by its fetch, for `consumers.expiry.Positions` to settle; a member as `membership`
    says (static or dynamic, and its session); partition p of each topic with the same member
    (`consumers.assignment`)."""
    guard_connection_writes()
    return AIOKafkaConsumer(
        **client_options,
        group_id=consumer_group(sink, prefix),
        enable_auto_commit=False,
        auto_offset_reset="none",
        isolation_level="read_committed",
        fetch_max_bytes=fetch_max_bytes,
        max_partition_fetch_bytes=max_partition_fetch_bytes,
        heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
        rebalance_timeout_ms=REBALANCE_TIMEOUT_MS,
        max_poll_interval_ms=MAX_POLL_INTERVAL_MS,
        partition_assignment_strategy=ASSIGNORS,
        **membership.consumer_options(),
    )


class RebalanceHandler(Protocol):
    """What a rebalance needs of the engine (`consumers.engine.SinkEngine`)."""

    async def on_revoked(self, revoked: Iterable[TopicPartitionKey]) -> None: ...

    async def restore(self, assigned: Iterable[TopicPartitionKey]) -> None: ...

    def on_assigned(self, assigned: Iterable[TopicPartitionKey]) -> None: ...


class Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka ships no types
    """Hands rebalances to the engine: a revoke drains and commits the partitions before they move. The fetch's
    guard forgets what it knew of partitions that move (`ReadGuard.forget`)."""

    def __init__(self, engine: RebalanceHandler, guard: ReadGuard) -> None:
        self._engine = engine
        self._guard = guard

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        try:
            await self._engine.on_revoked({(tp.topic, tp.partition) for tp in revoked})
        finally:
            self._guard.forget(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self._guard.forget(assigned)
        tps = {(tp.topic, tp.partition) for tp in assigned}
        await self._engine.restore(tps)  # before the partitions are fetched: aiokafka waits for this
        self._engine.on_assigned(tps)


class KafkaDeadLetterWriter:
    """Writes dead letters to ``orders.dlq.<sink>`` with acks=all and the idempotent producer."""

    def __init__(self, producer: AIOKafkaProducer, *, prefix: str = "") -> None:
        self._producer = producer
        self._prefix = prefix

    async def write(self, letter: DeadLetter) -> None:
        """Write `letter`; one too large for Kafka is written without its value, then also without the record's
        own headers, so that it never holds its partition for ever."""
        topic = dlq_topic(letter.sink, self._prefix)
        candidates = [letter]
        for shrink in (DeadLetter.without_value, DeadLetter.without_original_headers):
            if (smaller := shrink(candidates[-1])) is not candidates[-1]:
                candidates.append(smaller)
        for candidate in candidates:
            try:
                await self._send(topic, candidate)
            except _TOO_LARGE as exc:
                refused = exc
                continue
            if candidate is not letter:
                log.warning(
                    "dead letter too large for kafka, written without its value or headers",
                    extra={"sink": letter.sink, "topic": topic, "error": repr(refused)},
                )
            return
        raise PublishError(f"dead letter too large for {topic}, even without its value and headers: {refused!r}")

    async def _send(self, topic: str, letter: DeadLetter) -> None:
        # aiokafka refuses a record with neither key nor value (an AssertionError): a tombstone without a key,
        # dead-lettered as invalid, is written with an empty key, which orderbus reads as no key, as it does on replay.
        key = b"" if letter.key is None and letter.value is None else letter.key
        try:
            await self._producer.send_and_wait(topic, value=letter.value, key=key, headers=letter.record_headers())
        except _TOO_LARGE:
            raise
        except Exception as exc:  # not only KafkaError: whatever the producer raises fails this write, not the sink
            raise PublishError(f"dead letter not stored in {topic}: {exc!r}") from exc


# A record too large for the producer's max_request_size (refused by the client) or for the broker's
# max.message.bytes (MESSAGE_SIZE_TOO_LARGE), or a batch too large for a segment (RECORD_LIST_TOO_LARGE): retrying
# the same record can only fail again.
_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError)


def dead_letter_producer(client_options: Mapping[str, Any], *, request_timeout: float = 30.0) -> AIOKafkaProducer:
    guard_connection_writes()
    return AIOKafkaProducer(
        **client_options, acks="all", enable_idempotence=True, request_timeout_ms=int(request_timeout * 1000)
    )
