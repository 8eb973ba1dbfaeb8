"""ReadGuard: a batch the Kafka client cannot read loses nothing, holds its partition only, and is tried again."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka.errors import (
    IllegalStateError,
    KafkaConnectionError,
    KafkaError,
    TopicAuthorizationFailedError,
    UnsupportedCodecError,
)

from consumers.clock import FakeClock
from consumers.unreadable import ISOLATION, RETRY, ReadGuard, SkippedRecord

TP = tuple[str, int]
A, B, C = ("orders", 0), ("orders", 1), ("orders", 2)


@dataclass(frozen=True)
class Rec:
    offset: int
    readable: bool = True


class FakeConsumer:
    """aiokafka's consumer as the guard sees it, with its behaviour on a batch it cannot decode: `getmany` drains
    partition after partition, moving each drained one's position, and raises at the unreadable record, returning
    nothing, so what it had drained is gone unless the positions go back. The failing partition keeps a spent
    buffer (aiokafka's closed record generator): its next `getmany` without a `seek` moves its position past the
    records decoded before the error, and returns none of them."""

    def __init__(
        self, logs: Mapping[TP, list[Rec]], committed: Mapping[TP, int] | None = None, error: Exception | None = None
    ) -> None:
        self.logs = {tp: list(records) for tp, records in logs.items()}
        self.committed_offsets = dict(committed or {})
        self.positions = {tp: self.committed_offsets.get(tp, self.beginning(tp)) for tp in self.logs}
        self.assigned = set(self.logs)
        self.paused_tps: set[TP] = set()
        self.spent: dict[TP, int] = {}  # a failing partition's buffer: where its position jumps at the next call
        self.calls: list[tuple[TP, ...]] = []
        self.error = error or UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    def beginning(self, tp: TP) -> int:
        return self.logs[tp][0].offset if self.logs[tp] else 0

    async def getmany(
        self, *partitions: TP, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TP, list[Any]]:
        self.calls.append(partitions)
        room = max_records if max_records is not None else 10**9
        drained: dict[TP, list[Rec]] = {}
        for tp in sorted(self.assigned - self.paused_tps):
            if (partitions and tp not in partitions) or room == 0:
                continue
            if tp in self.spent:
                self.positions[tp] = self.spent.pop(tp)
                continue
            position = self.positions[tp]
            taken = [r for r in self.logs[tp] if r.offset >= position][:room]
            for record in taken:
                if not record.readable:
                    self.spent[tp] = record.offset
                    raise self.error
            if taken:
                drained[tp] = taken
                self.positions[tp] = taken[-1].offset + 1
                room -= len(taken)
        return drained

    def assignment(self) -> set[TP]:
        return set(self.assigned)

    def paused(self) -> set[TP]:
        return set(self.paused_tps)

    def _assigned(self, partitions: tuple[TP, ...]) -> None:
        if not set(partitions) <= self.assigned:
            raise IllegalStateError(f"not assigned: {set(partitions) - self.assigned}")

    def pause(self, *partitions: TP) -> None:
        self._assigned(partitions)
        self.paused_tps.update(partitions)

    def resume(self, *partitions: TP) -> None:
        self._assigned(partitions)
        self.paused_tps.difference_update(partitions)

    def seek(self, partition: TP, offset: int) -> None:
        self._assigned((partition,))
        self.positions[partition] = offset
        self.spent.pop(partition, None)

    async def committed(self, partition: TP) -> int | None:
        return self.committed_offsets.get(partition)

    async def beginning_offsets(self, partitions: list[TP]) -> dict[TP, int]:
        return {tp: self.beginning(tp) for tp in partitions}


def log_of(count: int, *, bad: int | None = None, start: int = 0) -> list[Rec]:
    return [Rec(offset, readable=offset != bad) for offset in range(start, start + count)]


async def drain(guard: ReadGuard, clock: FakeClock, rounds: int, max_records: int = 4) -> dict[TP, list[int]]:
    got: dict[TP, list[int]] = {}
    async with clock.autojump():
        for _ in range(rounds):
            for tp, records in (await guard.getmany(100, max_records)).items():
                got.setdefault(tp, []).extend(r.offset for r in records)
    return got


async def test_an_unreadable_batch_loses_nothing_and_holds_its_partition_only() -> None:
    consumer = FakeConsumer({A: log_of(10), B: log_of(10, bad=6), C: log_of(10)})
    clock = FakeClock()
    guard = ReadGuard(consumer, "crm", clock)
    got = await drain(guard, clock, 20, max_records=12)
    # Every record of A and C once, in order, although the first failed call had drained A's before raising at B.
    assert got[A] == list(range(10))
    assert got[C] == list(range(10))
    assert got[B] == list(range(6)), "B up to its unreadable record, and not past it"
    assert guard.held.keys() == {B}
    assert guard.held[B].offset == 6
    assert "UnicodeDecodeError" in guard.held[B].error
    assert B in consumer.paused_tps


async def test_without_errors_a_fetch_is_one_call_over_every_partition() -> None:
    consumer = FakeConsumer({A: log_of(3), B: log_of(3)})
    clock = FakeClock()
    guard = ReadGuard(consumer, "crm", clock)
    assert await guard.getmany(100, 10) == {A: log_of(3), B: log_of(3)}
    assert consumer.calls == [()]
    assert guard.held == {}


async def test_after_isolation_the_fetch_takes_every_partition_at_once_again() -> None:
    consumer = FakeConsumer({A: log_of(4), B: log_of(4, bad=2)})
    clock = FakeClock()
    guard = ReadGuard(consumer, "crm", clock)
    await drain(guard, clock, 20)
    assert B in guard.held
    consumer.logs[A].extend(log_of(2, start=4))
    await clock.advance(ISOLATION)
    consumer.calls.clear()
    assert await guard.getmany(100, 10) == {A: log_of(2, start=4)}
    assert consumer.calls == [()]


async def test_a_held_partition_is_read_again_after_its_retry_time() -> None:
    consumer = FakeConsumer({A: log_of(5, bad=3)})
    clock = FakeClock()
    guard = ReadGuard(consumer, "crm", clock)
    assert (await drain(guard, clock, 20))[A] == [0, 1, 2]
    assert A in guard.held
    guard.resume([A])  # the engine resuming everything (its buffer drained) does not resume a held partition
    assert A in consumer.paused_tps
    consumer.logs[A][3] = Rec(3)  # a fetch corrupted on its way: the same offset reads this time
    await clock.advance(RETRY)
    assert (await drain(guard, clock, 20))[A] == [3, 4]
    assert guard.held == {}


async def test_a_partition_still_unreadable_at_its_retry_is_held_again() -> None:
    consumer = FakeConsumer({A: log_of(5, bad=3), B: log_of(2)})
    clock = FakeClock()
    guard = ReadGuard(consumer, "crm", clock)
    await drain(guard, clock, 20)
    first = guard.held[A]
    await clock.advance(RETRY)
    got = await drain(guard, clock, 20)
    assert A not in got, "nothing of A handed over twice, nothing past its unreadable record"
    assert guard.held[A].offset == 3
    assert guard.held[A].retry_at > first.retry_at


async def test_a_held_partition_is_read_again_alone_while_the_others_are_fetched_as_usual() -> None:
    consumer = FakeConsumer({A: log_of(5, bad=3), B: log_of(2)})
    clock = FakeClock()
    guard = ReadGuard(consumer, "crm", clock)
    await drain(guard, clock, 20)
    await clock.advance(RETRY)
    consumer.logs[B].extend(log_of(3, start=2))
    consumer.calls.clear()
    assert await guard.getmany(100, 10) == {B: log_of(3, start=2)}
    assert consumer.calls[0] == (A,), "A alone, one record"
    assert set(consumer.calls[1]) == {A, B}, "the others in one fetch (A paused again): no one-partition mode"
    assert guard.held[A].offset == 3
    assert not guard.held[A].retrying


async def test_a_partition_the_engine_paused_stays_paused_when_its_hold_ends() -> None:
    consumer = FakeConsumer({A: log_of(5, bad=3)})
    clock = FakeClock()
    guard = ReadGuard(consumer, "crm", clock)
    await drain(guard, clock, 20)
    guard.pause([A])  # backpressure, or an open circuit
    await clock.advance(RETRY)
    await drain(guard, clock, 20)
    assert A in consumer.paused_tps
    guard.resume([A])
    assert A not in consumer.paused_tps


@pytest.mark.parametrize(("committed", "position"), [({A: 7}, 7), ({}, 5)])
async def test_a_partition_nothing_was_handed_over_of_goes_back_to_its_committed_offset_or_its_beginning(
    committed: Mapping[TP, int], position: int
) -> None:
    consumer = FakeConsumer({A: log_of(5, start=5), B: log_of(3, bad=0)}, committed=committed)
    clock = FakeClock()
    guard = ReadGuard(consumer, "crm", clock)
    assert await guard.getmany(100, 100) == {}  # A drained, then B raised
    assert consumer.positions[A] == position
    assert guard.held == {}, "the first error names no partition"


async def test_a_partition_held_before_handing_anything_over_names_its_first_offset() -> None:
    consumer = FakeConsumer({A: log_of(3, start=40, bad=40)})
    clock = FakeClock()
    guard = ReadGuard(consumer, "crm", clock)
    await drain(guard, clock, 20)
    assert guard.held[A].offset == 40


async def test_a_held_partition_stays_reported_while_it_is_read_again() -> None:
    consumer = FakeConsumer({A: log_of(5, bad=3)})
    clock = FakeClock()
    guard = ReadGuard(consumer, "crm", clock)
    await drain(guard, clock, 20)
    await clock.advance(RETRY)
    guard.pause([A])  # the engine's backpressure: not read yet when the gauge is
    async with clock.autojump():
        assert await guard.getmany(100, 10) == {}
    assert guard.held[A].offset == 3, "reported until it reads past offset 3"
    assert guard.held[A].retrying
    guard.resume([A])  # the engine's resume lets a partition being read again go
    assert A not in consumer.paused_tps


# The last: aiokafka's words once its group coordination ended (`consumers.unreadable.coordination_ended`).
@pytest.mark.parametrize(
    "error",
    [
        TopicAuthorizationFailedError(),
        KafkaConnectionError(),
        KafkaError("Unexpected error during coordination KafkaError('Unexpected exception in heartbeat task')"),
    ],
)
async def test_errors_raised_before_any_record_is_taken_go_to_the_caller_untouched(error: Exception) -> None:
    class RefusingOnce(FakeConsumer):
        async def getmany(
            self, *partitions: TP, timeout_ms: int = 0, max_records: int | None = None
        ) -> dict[TP, list[Any]]:
            if not self.calls:
                self.calls.append(partitions)
                raise error
            return await super().getmany(*partitions, timeout_ms=timeout_ms, max_records=max_records)

    consumer = RefusingOnce({A: log_of(2)})
    guard = ReadGuard(consumer, "crm", FakeClock())
    with pytest.raises(type(error)):
        await guard.getmany(100, 10)
    assert guard.held == {}
    assert await guard.getmany(100, 10) == {A: log_of(2)}
    assert consumer.calls == [(), ()], "no isolation: the engine retries as before"


async def test_a_bare_kafka_error_from_decoding_is_handled_as_unreadable() -> None:
    # aiokafka raises a bare KafkaError for a control batch without records, after other partitions were drained
    consumer = FakeConsumer(
        {A: log_of(3), B: log_of(3, bad=1)}, error=KafkaError("Control batch did not contain any records")
    )
    clock = FakeClock()
    guard = ReadGuard(consumer, "crm", clock)
    got = await drain(guard, clock, 20)
    assert got == {A: [0, 1, 2], B: [0]}
    assert "Control batch" in guard.held[B].error


async def test_a_revoked_or_reassigned_partition_is_not_held_and_not_rewound_to_what_it_was() -> None:
    consumer = FakeConsumer({A: log_of(5, bad=3)})
    clock = FakeClock()
    guard = ReadGuard(consumer, "crm", clock)
    await drain(guard, clock, 20)
    assert A in guard.held
    guard.forget([A])
    assert guard.held == {}
    consumer.paused_tps.clear()  # aiokafka forgets a pause with the assignment
    consumer.committed_offsets[A] = 1  # the next owner committed less than this guard had handed over
    consumer.positions[A] = 1
    consumer.logs[A].append(Rec(5, readable=False))
    got = await drain(guard, clock, 20, max_records=10)
    assert got[A] == [1, 2], "read again from the committed offset, not skipped to the forgotten 3"
    assert guard.held[A].offset == 3


async def test_other_client_errors_are_read_errors_too() -> None:
    class Codec(FakeConsumer):
        async def getmany(
            self, *partitions: TP, timeout_ms: int = 0, max_records: int | None = None
        ) -> dict[TP, list[Any]]:
            if not partitions or B in partitions:
                raise UnsupportedCodecError("libraries for lz4 compression codec not found")
            return await super().getmany(*partitions, timeout_ms=timeout_ms, max_records=max_records)

    consumer = Codec({A: log_of(2), B: log_of(2)})
    clock = FakeClock()
    guard = ReadGuard(consumer, "crm", clock)
    got = await drain(guard, clock, 20)
    assert got == {A: [0, 1]}
    assert "lz4" in guard.held[B].error


async def test_a_rewind_cut_off_is_finished_before_the_next_fetch() -> None:
    class Unanswered(FakeConsumer):
        failures = 1

        async def committed(self, partition: TP) -> int | None:
            if self.failures:
                self.failures -= 1
                raise KafkaConnectionError("no answer from the coordinator")
            return await super().committed(partition)

    consumer = Unanswered({A: log_of(3), B: log_of(3, bad=0)})
    clock = FakeClock()
    guard = ReadGuard(consumer, "crm", clock)
    with pytest.raises(KafkaConnectionError):  # the engine logs it and fetches again
        await guard.getmany(100, 100)  # A drained, then B raised; A's committed offset unanswered
    assert consumer.positions[A] == 3, "A still past the records the failed call took"
    got = await drain(guard, clock, 20)
    assert got[A] == [0, 1, 2]


async def skipping(guard: ReadGuard, clock: FakeClock, rounds: int) -> list[tuple[str, int]]:
    """What the guard hands over of A, in order: ("record", offset) or ("skipped", offset)."""
    got = []
    async with clock.autojump():
        for _ in range(rounds):
            for record in (await guard.getmany(100, 4)).get(A, []):
                got.append(("skipped" if isinstance(record, SkippedRecord) else "record", record.offset))
    return got


async def test_a_held_offset_the_settings_name_is_handed_over_as_a_stand_in_and_the_partition_goes_on() -> None:
    consumer = FakeConsumer({A: log_of(6, bad=3)})
    clock = FakeClock()
    guard = ReadGuard(consumer, "crm", clock)
    assert await skipping(guard, clock, 20) == [("record", 0), ("record", 1), ("record", 2)]
    guard.skip({("orders", 0): [(3, 3)]})
    consumer.calls.clear()
    stand_in = (await guard.getmany(100, 4))[A][0]
    assert consumer.calls == [], "handed over without a fetch"
    assert isinstance(stand_in, SkippedRecord)
    assert (stand_in.topic, stand_in.partition, stand_in.offset) == ("orders", 0, 3)
    assert (stand_in.key, stand_in.value, stand_in.headers) == (None, None, ())
    assert "UnicodeDecodeError" in stand_in.unreadable
    assert "sinks.crm.skip_unreadable" in stand_in.unreadable
    assert guard.held == {}
    assert A not in consumer.paused_tps
    assert await skipping(guard, clock, 20) == [("record", 4), ("record", 5)]


async def test_a_range_skips_a_batch_of_unreadable_records_one_at_a_time() -> None:
    logs = {A: [Rec(0), Rec(1, readable=False), Rec(2, readable=False), Rec(3)]}
    consumer = FakeConsumer(logs)
    clock = FakeClock()
    guard = ReadGuard(consumer, "crm", clock)
    guard.skip({A: [(1, 2)]})
    assert await skipping(guard, clock, 40) == [("record", 0), ("skipped", 1), ("skipped", 2), ("record", 3)]
    assert guard.held == {}


async def test_a_skip_that_names_no_held_offset_changes_nothing() -> None:
    consumer = FakeConsumer({A: log_of(6, bad=3), B: log_of(2)})
    clock = FakeClock()
    guard = ReadGuard(consumer, "crm", clock)
    guard.skip({A: [(4, 9)], B: [(0, 1)]})  # past the held offset; a partition that reads
    got = await drain(guard, clock, 20)
    assert got == {A: [0, 1, 2], B: [0, 1]}
    assert guard.held[A].offset == 3


async def test_a_skipped_partition_the_engine_paused_stays_paused() -> None:
    consumer = FakeConsumer({A: log_of(6, bad=3)})
    clock = FakeClock()
    guard = ReadGuard(consumer, "crm", clock)
    await drain(guard, clock, 20)
    guard.pause([A])  # backpressure
    guard.skip({A: [(3, 3)]})
    assert isinstance((await guard.getmany(100, 4))[A][0], SkippedRecord)
    assert A in consumer.paused_tps


async def test_the_records_after_a_skipped_one_in_its_batch_are_skipped_until_one_reads() -> None:
    # aiokafka decodes a fetched batch whole, the records before the position included: after a seek past the
    # skipped record, the next one of its batch fails as well (integration test: held again one offset on).
    logs = {A: [Rec(0), Rec(1, readable=False), Rec(2, readable=False), Rec(3), Rec(4, readable=False), Rec(5)]}
    consumer = FakeConsumer(logs)
    clock = FakeClock()
    guard = ReadGuard(consumer, "crm", clock)
    guard.skip({A: [(1, 1)]})
    got = await skipping(guard, clock, 40)
    assert got == [("record", 0), ("skipped", 1), ("skipped", 2), ("record", 3)]
    assert guard.held[A].offset == 4, "a record read ends the run: 4 is not named"


async def test_the_rest_of_a_skipped_batch_is_skipped_without_a_hold_of_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Review: each next record of the batch failed a fetch of every partition first (a rewind of all, 60 s of
    # one-partition fetches, an ERROR and the gauge up again), once per record of the batch.
    logs = {A: [Rec(0), Rec(1, readable=False), Rec(2, readable=False), Rec(3, readable=False), Rec(4)], B: log_of(3)}
    consumer = FakeConsumer(logs)
    clock = FakeClock()
    guard = ReadGuard(consumer, "crm", clock)
    guard.skip({A: [(1, 1)]})
    with caplog.at_level(logging.WARNING, logger="consumers.unreadable"):
        got = await skipping(guard, clock, 40)
    assert got == [("record", 0), ("skipped", 1), ("skipped", 2), ("skipped", 3), ("record", 4)]
    holds = [r for r in caplog.records if r.getMessage() == "records cannot be read: partition held"]
    assert [r.offset for r in holds] == [1], "held once, where the operator named it"  # type: ignore[attr-defined]
    finding = [r for r in caplog.records if r.getMessage().startswith("a fetched batch could not be read")]
    assert len(finding) == 1
    assert guard.held == {}
    await clock.advance(ISOLATION)  # the search for the first failure's partition is over
    consumer.calls.clear()
    consumer.logs[A].append(Rec(5))
    consumer.logs[B].append(Rec(3))
    assert await guard.getmany(100, 10) == {A: [Rec(5)], B: [Rec(3)]}
    assert consumer.calls == [()], "read as usual again once a record of it was handed over"
