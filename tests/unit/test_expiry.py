"""Positions: a sink's partition whose position is lost (a new group, records deleted before it read them, a log
cut back) goes on where the module says, and what was deleted is counted and said."""

from __future__ import annotations

import logging

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import NoOffsetForPartitionError, OffsetOutOfRangeError

from consumers.clock import FakeClock
from consumers.expiry import Positions
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


def positions(consumer: FakeConsumer) -> tuple[Positions, list[int]]:
    expired: list[int] = []
    return Positions(consumer, "crm", expired.append), expired


async def test_a_new_group_reads_from_the_start_and_has_lost_nothing(caplog: pytest.LogCaptureFixture) -> None:
    consumer = FakeConsumer({A: (40, 90)})
    settle, expired = positions(consumer)
    with caplog.at_level(logging.DEBUG, "consumers.expiry"):
        assert await settle.settle(NoOffsetForPartitionError(A)) == {("orders", 0): 40}
    assert consumer.seeks == [(A, 40)]
    assert expired == []
    assert all(record.levelno < logging.WARNING for record in caplog.records)


async def test_records_deleted_before_the_sink_read_them_are_counted_and_said(caplog: pytest.LogCaptureFixture) -> None:
    consumer = FakeConsumer({A: (40, 90), B: (7, 9)})
    settle, expired = positions(consumer)
    with caplog.at_level(logging.INFO, "consumers.expiry"):
        moved = await settle.settle(OffsetOutOfRangeError({A: 12, B: 2}))
    assert moved == {("orders", 0): 40, ("orders", 1): 7}
    assert sorted(consumer.seeks) == [(A, 40), (B, 7)]
    assert sorted(expired) == [5, 28]
    said = {(r.partition, r.from_offset, r.to_offset, r.records) for r in caplog.records}  # type: ignore[attr-defined]
    assert said == {(0, 12, 39, 28), (1, 2, 6, 5)}
    assert {r.levelno for r in caplog.records} == {logging.ERROR}
    assert all(
        r.getMessage().startswith("records deleted from kafka before this sink read them") for r in caplog.records
    )


async def test_a_position_past_the_logs_end_reads_the_log_again_from_its_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    consumer = FakeConsumer({A: (0, 30)})  # the topic made again: the sink stood at 500 in the old one
    settle, expired = positions(consumer)
    assert await settle.settle(OffsetOutOfRangeError({A: 500})) == {("orders", 0): 0}
    assert expired == [], "nothing is known lost: what was delivered before is recognised by the dedup table"
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert (record.offset, record.log_start, record.log_end) == (500, 0, 30)  # type: ignore[attr-defined]


async def test_a_position_in_the_log_after_all_is_kept(caplog: pytest.LogCaptureFixture) -> None:
    consumer = FakeConsumer({A: (10, 30)})  # a leader moved between the fetch and the question
    settle, expired = positions(consumer)
    assert await settle.settle(OffsetOutOfRangeError({A: 30})) == {("orders", 0): 30}
    assert consumer.seeks == [(A, 30)]
    assert expired == []
    assert [record.levelno for record in caplog.records] == [logging.WARNING]


async def test_a_partition_revoked_meanwhile_is_left_to_its_next_owner() -> None:
    consumer = FakeConsumer({A: (40, 90), B: (0, 5)})
    consumer.assigned = {B}
    settle, expired = positions(consumer)
    assert await settle.settle(OffsetOutOfRangeError({A: 12})) == {}
    assert consumer.seeks == []
    assert expired == []


class RebalancingConsumer(FakeConsumer):
    """A rebalance takes A while the log's start is asked for."""

    async def beginning_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        self.assigned.discard(A)
        return await super().beginning_offsets(partitions)


async def test_a_partition_revoked_during_the_lookups_is_neither_counted_nor_moved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    consumer = RebalancingConsumer({A: (40, 90), B: (7, 9)})
    settle, expired = positions(consumer)
    assert await settle.settle(OffsetOutOfRangeError({A: 12, B: 2})) == {("orders", 1): 7}
    assert consumer.seeks == [(B, 7)]
    assert expired == [5], "A's next owner counts A's"
    assert [r.partition for r in caplog.records] == [1]  # type: ignore[attr-defined]


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
    guard.moved(await Positions(consumer, "crm", lambda _: None).settle(OffsetOutOfRangeError({A: 12})))
    consumer.seeks.clear()
    assert await guard.getmany(100, 10) == {}  # an unreadable batch: the guard puts the positions back
    assert consumer.seeks == [(A, 40)], "not to the committed offset, whose records are gone"
