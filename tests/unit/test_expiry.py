"""Positions: a sink's partition whose position is lost (a new group, records deleted before it read them, a log
cut back) goes on where the module says, and what was deleted is counted and said."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import cast

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import NoOffsetForPartitionError, OffsetOutOfRangeError

from consumers.clock import FakeClock
from consumers.expiry import Move, Positions, say_deleted
from consumers.kafka_io import KafkaConsumerPort
from consumers.unreadable import ReadGuard

A, B = TopicPartition("orders", 0), TopicPartition("orders", 1)


class FakeConsumer:
    """What `Positions` uses of aiokafka's consumer: partitions whose logs span [start, end)."""

    def __init__(self, logs: dict[TopicPartition, tuple[int, int]]) -> None:
        self.logs = logs
        self.assigned = set(logs)
        self.seeks: list[tuple[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        assert partition in self.assigned
        self.seeks.append((partition, offset))

    async def beginning_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.logs[tp][0] for tp in partitions}

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.logs[tp][1] for tp in partitions}


async def test_a_new_group_reads_from_the_start_and_has_lost_nothing(caplog: pytest.LogCaptureFixture) -> None:
    consumer = FakeConsumer({A: (40, 90)})
    with caplog.at_level(logging.DEBUG, "consumers.expiry"):
        assert await Positions(consumer, "crm").settle(NoOffsetForPartitionError(A)) == {("orders", 0): Move(40)}
    assert consumer.seeks == [(A, 40)]
    assert all(record.levelno < logging.WARNING for record in caplog.records)


async def test_records_deleted_before_the_sink_read_them_make_a_move_that_says_how_many() -> None:
    consumer = FakeConsumer({A: (40, 90), B: (7, 9)})
    moves = await Positions(consumer, "crm").settle(OffsetOutOfRangeError({A: 12, B: 2}))
    assert moves == {("orders", 0): Move(40, deleted_from=12), ("orders", 1): Move(7, deleted_from=2)}
    assert [move.deleted for move in moves.values()] == [28, 5]
    assert sorted(consumer.seeks) == [(A, 40), (B, 7)]


def test_deleted_records_are_said_at_error_with_the_offsets(caplog: pytest.LogCaptureFixture) -> None:
    say_deleted("crm", ("orders", 0), Move(40, deleted_from=12))
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage().startswith("records deleted from kafka before this sink read them")
    said = (record.sink, record.partition, record.from_offset, record.to_offset, record.records)  # type: ignore[attr-defined]
    assert said == ("crm", 0, 12, 39, 28)


async def test_a_position_past_the_logs_end_reads_the_log_again_from_its_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    consumer = FakeConsumer({A: (0, 30)})  # the topic made again: the sink stood at 500 in the old one
    moves = await Positions(consumer, "crm").settle(OffsetOutOfRangeError({A: 500}))
    assert moves == {("orders", 0): Move(0)}, "nothing known lost: what was delivered before is recognised"
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert (record.offset, record.log_start, record.log_end) == (500, 0, 30)  # type: ignore[attr-defined]


async def test_a_position_in_the_log_after_all_is_left_where_the_consumer_has_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A leader moved between the fetch and the question, or the error came from before a rebalance, whose new
    # assignment started the partition at its committed offset: seeking to the old position would skip records.
    consumer = FakeConsumer({A: (10, 30)})
    assert await Positions(consumer, "crm").settle(OffsetOutOfRangeError({A: 30})) == {}
    assert consumer.seeks == []
    assert [record.levelno for record in caplog.records] == [logging.WARNING]


async def test_a_partition_revoked_before_the_lookups_is_not_moved() -> None:
    consumer = FakeConsumer({A: (40, 90), B: (0, 5)})
    consumer.assigned = {B}
    assert await Positions(consumer, "crm").settle(OffsetOutOfRangeError({A: 12})) == {}
    assert consumer.seeks == []


class RebalancingConsumer(FakeConsumer):
    """A rebalance's new assignment, without A, lands while the log's start is asked for."""

    async def beginning_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        self.assigned.discard(A)
        return await super().beginning_offsets(partitions)


async def test_a_partition_revoked_during_the_lookups_is_not_moved() -> None:
    consumer = RebalancingConsumer({A: (40, 90), B: (7, 9)})
    moves = await Positions(consumer, "crm").settle(OffsetOutOfRangeError({A: 12, B: 2}))
    assert moves == {("orders", 1): Move(7, deleted_from=2)}
    assert consumer.seeks == [(B, 7)]


class RewindingConsumer(FakeConsumer):
    """With what the guard needs besides: a committed offset (12, deleted since) to rewind to."""

    def __init__(self) -> None:
        super().__init__({A: (40, 90)})
        self.paused_tps: set[TopicPartition] = set()

    def paused(self) -> set[TopicPartition]:
        return set(self.paused_tps)

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused_tps.update(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused_tps.difference_update(partitions)

    async def committed(self, partition: TopicPartition) -> int | None:
        return 12

    async def getmany(self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None) -> dict:  # type: ignore[type-arg]
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")  # a batch that cannot be read


async def test_the_read_guard_rewinds_to_where_the_partition_was_moved_not_to_the_deleted_commit() -> None:
    consumer = RewindingConsumer()
    guard = ReadGuard(consumer, "crm", FakeClock())
    moves = await Positions(consumer, "crm").settle(OffsetOutOfRangeError({A: 12}))
    guard.moved({tp: move.offset for tp, move in moves.items()})
    consumer.seeks.clear()
    assert await guard.getmany(100, 10) == {}  # an unreadable batch: the guard puts the positions back
    assert consumer.seeks == [(A, 40)], "not to the committed offset, whose records are gone"


class FetchingFake(RewindingConsumer):
    """aiokafka's consumer as the port sees it with ``auto_offset_reset="none"``: the first fetch raises the
    position it could not read (12, deleted since: the log starts at 40), the next ones hand over what is there."""

    def __init__(self) -> None:
        super().__init__()
        self.raised = False
        self.position = 12

    def seek(self, partition: TopicPartition, offset: int) -> None:
        super().seek(partition, offset)
        self.position = offset

    async def getmany(self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None) -> dict:  # type: ignore[type-arg]
        if not self.raised:
            self.raised = True
            raise OffsetOutOfRangeError({A: self.position})
        return {A: [Rec(self.position)]}


@dataclass(frozen=True)
class Rec:
    offset: int


async def test_the_port_settles_a_lost_position_and_hands_the_move_to_the_engine_once() -> None:
    consumer = FetchingFake()
    guard = ReadGuard(consumer, "crm", FakeClock())
    port = KafkaConsumerPort(cast(AIOKafkaConsumer, consumer), guard, Positions(consumer, "crm"))
    assert await port.getmany(100, 10) == {}, "no record is taken by a fetch that raised"
    assert port.moved() == {("orders", 0): Move(40, deleted_from=12)}
    assert port.moved() == {}, "taken once"
    assert [record.offset for record in (await port.getmany(100, 10))[A]] == [40]
