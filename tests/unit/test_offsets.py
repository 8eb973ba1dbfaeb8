"""Commit positions: only the contiguous finished prefix is ever committable, whatever the finish order."""

from __future__ import annotations

import random
import tracemalloc

import pytest

from consumers.offsets import OffsetError, OffsetTracker, PartitionOffsets
from topics.errors import OrderbusError

TP0 = ("orders", 0)
TP1 = ("orders", 1)


def tracked(*offsets: int) -> PartitionOffsets:
    partition = PartitionOffsets()
    for offset in offsets:
        partition.track(offset)
    return partition


# --- PartitionOffsets -------------------------------------------------------------------------------------


def test_nothing_tracked_means_nothing_to_commit() -> None:
    partition = PartitionOffsets()
    assert partition.committable() is None
    assert partition.pending == 0
    assert partition.oldest_pending() is None


def test_in_order_finish_commits_the_next_offset_to_consume() -> None:
    partition = tracked(0, 1, 2)
    partition.finish(0)
    assert partition.committable() == 1
    partition.finish(1)
    partition.finish(2)
    assert partition.committable() == 3
    assert partition.pending == 0


def test_out_of_order_finish_commits_only_the_contiguous_prefix() -> None:
    partition = tracked(10, 11, 12, 13)
    partition.finish(12)
    partition.finish(13)
    assert partition.committable() is None  # 10 still holds everything back
    assert partition.oldest_pending() == 10
    partition.finish(10)
    assert partition.committable() == 11  # 11 is pending; 12 and 13 wait behind it
    partition.finish(11)
    assert partition.committable() == 14
    assert partition.oldest_pending() is None


def test_gaps_are_skipped_never_waited_for() -> None:
    # Compaction and transaction markers leave holes in a partition's offsets.
    partition = tracked(3, 7, 8, 20)
    partition.finish(3)
    assert partition.committable() == 4  # last finished of the prefix + 1; the broker resumes at 7
    partition.finish(7)
    partition.finish(8)
    assert partition.committable() == 9
    partition.finish(20)
    assert partition.committable() == 21


def test_committable_is_none_when_nothing_is_new_since_the_last_commit() -> None:
    partition = tracked(0, 1, 2)
    partition.finish(0)
    partition.mark_committed(1)
    assert partition.committable() is None
    partition.finish(2)  # finished, but 1 still pending in front of it
    assert partition.committable() is None
    partition.finish(1)
    assert partition.committable() == 3
    partition.mark_committed(3)
    assert partition.committable() is None
    partition.track(4)
    assert partition.committable() is None


def test_a_commit_of_an_older_position_still_leaves_the_newer_one_committable() -> None:
    partition = tracked(0, 1)
    partition.finish(0)
    first = partition.committable()
    partition.finish(1)
    assert first == 1
    partition.mark_committed(first)  # the commit of 1 is acknowledged after 1 finished as well
    assert partition.committable() == 2


@pytest.mark.parametrize("offset", [4, 5])
def test_tracking_backwards_or_twice_is_rejected(offset: int) -> None:
    partition = tracked(2, 5)
    with pytest.raises(OffsetError, match="strictly increase"):
        partition.track(offset)
    assert partition.pending == 2


def test_tracking_below_the_committed_position_is_rejected() -> None:
    partition = PartitionOffsets()
    partition.mark_committed(100)  # the group's position on assignment
    with pytest.raises(OffsetError, match="before the committed position"):
        partition.track(99)
    partition.track(100)
    partition.finish(100)
    assert partition.committable() == 101


@pytest.mark.parametrize("offset", [1, 3, 99])
def test_finishing_an_unknown_or_finished_offset_is_rejected(offset: int) -> None:
    partition = tracked(0, 1, 2)
    partition.finish(1)
    with pytest.raises(OffsetError, match="not pending"):
        partition.finish(offset)


def test_mark_committed_rejects_going_backwards() -> None:
    partition = tracked(0, 1, 2)
    for offset in (0, 1, 2):
        partition.finish(offset)
    partition.mark_committed(3)
    partition.mark_committed(3)  # the same position again is fine
    with pytest.raises(OffsetError, match="before the committed"):
        partition.mark_committed(2)
    assert partition.committed == 3


def test_mark_committed_rejects_a_position_past_a_pending_record() -> None:
    partition = tracked(0, 1, 2)
    partition.finish(0)
    partition.finish(2)
    partition.mark_committed(1)  # up to the pending record: allowed
    with pytest.raises(OffsetError, match="past the pending offset 1"):
        partition.mark_committed(2)


def test_offset_error_is_an_orderbus_error() -> None:
    assert issubclass(OffsetError, OrderbusError)


def test_random_finish_order_never_commits_past_an_unfinished_offset() -> None:
    rng = random.Random(20240611)
    offsets = sorted(rng.sample(range(15_000), 10_000))  # increasing, with gaps
    partition = PartitionOffsets()
    for offset in offsets:
        partition.track(offset)
    unfinished = set(offsets)
    oldest_index = 0  # index in `offsets` of the oldest unfinished offset; only ever moves forward
    last_position = 0
    for offset in rng.sample(offsets, len(offsets)):
        partition.finish(offset)
        unfinished.discard(offset)
        while oldest_index < len(offsets) and offsets[oldest_index] not in unfinished:
            oldest_index += 1
        position = partition.committable()
        prefix_end = offsets[oldest_index - 1] + 1 if oldest_index else None
        if position is None:
            # Nothing new: either no finished prefix yet, or its end is exactly what was committed last.
            assert prefix_end is None or prefix_end == partition.committed
            continue
        if oldest_index < len(offsets):
            assert position <= offsets[oldest_index], "committable passed an unfinished offset"
        # ...and it is exactly the end of the finished prefix: the last offset tracked before the oldest one + 1.
        assert position == prefix_end
        assert position >= last_position
        last_position = position
        if rng.random() < 0.1:
            partition.mark_committed(position)
    assert partition.pending == 0
    assert last_position == offsets[-1] + 1


def test_memory_is_o_pending_not_o_span() -> None:
    # One record stuck at the front while 100,000 behind it finish: only the stuck one may stay in memory.
    partition = PartitionOffsets()
    partition.track(0)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for offset in range(1, 100_001):
            partition.track(offset)
            partition.finish(offset)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 16_384, f"{grown} bytes kept for 1 pending record"
    assert partition.pending == 1
    assert partition.committable() is None
    partition.finish(0)
    assert partition.committable() == 100_001


def test_a_million_sequential_records_keep_nothing() -> None:
    partition = PartitionOffsets()
    for offset in range(1_000_000):
        partition.track(offset)
        partition.finish(offset)
    assert partition.pending == 0
    assert partition.committable() == 1_000_000


# --- OffsetTracker ----------------------------------------------------------------------------------------


def test_tracker_reports_only_partitions_with_something_new() -> None:
    tracker = OffsetTracker()
    for offset in (0, 1):
        tracker.track(TP0, offset)
        tracker.track(TP1, offset)
    tracker.finish(TP0, 0)
    tracker.finish(TP1, 1)  # 0 of TP1 still pending
    assert tracker.committable() == {TP0: 1}
    tracker.mark_committed({TP0: 1})
    assert tracker.committable() == {}
    assert tracker.pending_total == 2
    assert tracker.pending(TP0) == 1
    assert tracker.pending(TP1) == 1
    assert tracker.oldest_pending(TP1) == 0


def test_tracker_partitions_are_independent() -> None:
    tracker = OffsetTracker()
    tracker.track(TP0, 5)
    tracker.track(TP1, 5)  # the same offset in another partition is not a repeat
    tracker.finish(TP1, 5)
    assert tracker.committable() == {TP1: 6}


def test_tracker_revoke_forgets_partitions() -> None:
    tracker = OffsetTracker()
    tracker.track(TP0, 0)
    tracker.track(TP1, 0)
    tracker.revoke([TP0, ("orders", 9)])  # an unknown partition is fine
    assert tracker.pending_total == 1
    assert tracker.pending(TP0) == 0
    with pytest.raises(OffsetError, match=r"orders\[0\]"):
        tracker.finish(TP0, 0)
    # Reassigned later: the partition starts afresh, even below offsets it tracked before.
    tracker.track(TP0, 0)
    tracker.finish(TP0, 0)
    assert tracker.committable() == {TP0: 1}


def test_tracker_mark_committed_moves_committed_position() -> None:
    tracker = OffsetTracker()
    tracker.track(TP0, 41)
    tracker.finish(TP0, 41)
    assert tracker.committed_position(TP0) is None
    tracker.mark_committed({TP0: 42})
    assert tracker.committed_position(TP0) == 42
    assert tracker.committable() == {}
    with pytest.raises(OffsetError, match=r"orders\[0\]: commit position 40"):
        tracker.mark_committed({TP0: 40})


def test_tracker_ignores_a_commit_acknowledged_after_its_partition_was_revoked() -> None:
    tracker = OffsetTracker()
    tracker.track(TP0, 10)
    tracker.finish(TP0, 10)
    in_flight_commit = tracker.committable()
    tracker.revoke([TP0])
    tracker.mark_committed(in_flight_commit)
    assert tracker.committed_position(TP0) is None
    # Reassigned, starting where the group stands, even below the late commit: not "going backwards".
    tracker.track(TP0, 5)
    tracker.finish(TP0, 5)
    assert tracker.committable() == {TP0: 6}


def test_tracker_errors_name_the_partition() -> None:
    tracker = OffsetTracker()
    tracker.track(TP1, 3)
    with pytest.raises(OffsetError, match=r"orders\[1\]"):
        tracker.track(TP1, 3)
    with pytest.raises(OffsetError, match=r"orders\[1\]"):
        tracker.finish(TP1, 4)


def test_a_skip_moves_the_commit_past_records_never_fetched_once_the_pending_ones_finish() -> None:
    partition = tracked(3, 4)
    partition.skip_to(50)  # Kafka deleted 5-49
    assert partition.committable() is None, "3 holds the position back"
    partition.finish(3)
    partition.finish(4)
    assert partition.committable() == 50
    partition.track(50)
    assert partition.committable() == 50


def test_a_skip_on_a_partition_with_nothing_tracked_is_its_starting_position() -> None:
    partition = PartitionOffsets()
    partition.skip_to(7)
    assert partition.committable() == 7


def test_a_skip_back_under_a_tracked_or_committed_offset_is_refused() -> None:
    partition = tracked(3, 4)
    with pytest.raises(OffsetError, match="moved to 4, not past the tracked 4"):
        partition.skip_to(4)
    committed = PartitionOffsets()
    committed.mark_committed(10)
    with pytest.raises(OffsetError, match="before the committed position 10"):
        committed.skip_to(9)
