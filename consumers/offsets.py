"""Which offsets may be committed: the contiguous prefix of records in a durably recorded terminal state.

The invariant this module keeps: **an offset is committed only when every record before it is in a terminal
state (done, duplicate, dead-lettered) that is durably recorded.** Records of one partition finish out of order,
because different order numbers are delivered concurrently; a partition's commit position therefore advances
only over its contiguous finished prefix, never past a record still pending.

The caller's protocol, per partition:

1. `track(offset)` each fetched record, in fetch order (offsets strictly increase; gaps are normal: compaction
   and transaction markers leave holes, and a hole is never waited for); `skip_to(offset)` where the consumer
   was moved forward past records it will never fetch (`consumers.expiry`), in the same order;
2. `finish(offset)` a record once its terminal state is *durably* recorded (the dedup store flushed, the dead
   letter acknowledged) -- not merely decided;
3. `committable()` gives the offset to commit (the next one to consume: last finished offset of the prefix + 1),
   or None when nothing is new since the last commit;
4. after the broker acknowledged the commit, `mark_committed(offset)`.

Memory is O(pending): a record leaves the bookkeeping the moment it finishes, whatever is still pending before
it. Each pending offset remembers the offset tracked just before it, which is all that is needed to answer
"where does the finished prefix end" when that pending offset is the oldest one.

Errors::

    OrderbusError (topics.errors)
    └── OffsetError        a caller broke the protocol above: an offset repeated or went backwards, an unknown
                           offset finished, a commit position moved backwards or past a pending record
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping

from topics.errors import OrderbusError

__all__ = ["OffsetError", "OffsetTracker", "PartitionOffsets", "TopicPartitionKey"]

TopicPartitionKey = tuple[str, int]
"""(topic, partition): plain values, so this module needs nothing from aiokafka."""


class OffsetError(OrderbusError):
    """The offset protocol was broken by the caller (a bug, never a broker condition); the message says how."""


class PartitionOffsets:
    """The commit position of one partition, advanced over its contiguous finished prefix."""

    __slots__ = ("_committed", "_last_tracked", "_pending", "name")

    def __init__(self, name: str = "partition") -> None:
        self.name = name
        # Pending offset -> the offset tracked just before it (None: nothing tracked before it). OrderedDict,
        # not dict: offsets arrive increasing, so the first key is the oldest pending one, and OrderedDict finds
        # it in O(1) after any deletions (a dict rescans the deleted slots at its front).
        self._pending: OrderedDict[int, int | None] = OrderedDict()
        self._last_tracked: int | None = None
        self._committed: int | None = None

    def track(self, offset: int) -> None:
        """Remember a fetched record; it holds back the commit position until it is finished."""
        if self._last_tracked is not None and offset <= self._last_tracked:
            raise OffsetError(
                f"{self.name}: offset {offset} tracked after {self._last_tracked}; offsets must strictly increase"
            )
        if self._committed is not None and offset < self._committed:
            raise OffsetError(f"{self.name}: offset {offset} is before the committed position {self._committed}")
        self._pending[offset] = self._last_tracked
        self._last_tracked = offset

    def skip_to(self, offset: int) -> None:
        """Nothing before `offset` is left to fetch (Kafka deleted it, or the partition begins there): once the
        records pending before it finish, the commit position moves up to it, with no record of its own."""
        if self._last_tracked is not None and offset <= self._last_tracked:
            raise OffsetError(f"{self.name}: moved to {offset}, not past the tracked {self._last_tracked}")
        if self._committed is not None and offset < self._committed:
            raise OffsetError(f"{self.name}: moved to {offset}, before the committed position {self._committed}")
        self._last_tracked = offset - 1

    def finish(self, offset: int) -> None:
        """Mark a tracked record terminal and durably recorded; it may now be committed over."""
        try:
            del self._pending[offset]
        except KeyError:
            message = f"{self.name}: offset {offset} is not pending (never tracked or already finished)"
            raise OffsetError(message) from None

    def committable(self) -> int | None:
        """The offset to commit now (last finished offset of the contiguous prefix + 1), or None if nothing new."""
        if self._pending:
            before_oldest = self._pending[next(iter(self._pending))]
            if before_oldest is None:
                return None
            position = before_oldest + 1
        elif self._last_tracked is not None:
            position = self._last_tracked + 1
        else:
            return None
        if self._committed is not None and position <= self._committed:
            return None
        return position

    def mark_committed(self, offset: int) -> None:
        """Record that the broker holds `offset` as this partition's commit.

        Rejects a position going backwards (a stale commit acknowledged late would otherwise move it back) and a
        position past a pending record (that commit broke the invariant). The same position again is a no-op.
        Marked before anything is tracked, it is the position the partition starts from.
        """
        if self._committed is not None and offset < self._committed:
            raise OffsetError(f"{self.name}: commit position {offset} is before the committed {self._committed}")
        oldest = self.oldest_pending()
        if oldest is not None and offset > oldest:
            raise OffsetError(f"{self.name}: commit position {offset} is past the pending offset {oldest}")
        self._committed = offset

    @property
    def pending(self) -> int:
        """How many tracked records are not finished yet."""
        return len(self._pending)

    @property
    def committed(self) -> int | None:
        """The last position passed to `mark_committed`, if any."""
        return self._committed

    def oldest_pending(self) -> int | None:
        """The offset holding back the commit position, if any (for the "oldest pending age" metric)."""
        return next(iter(self._pending), None)


class OffsetTracker:
    """`PartitionOffsets` for every assigned partition of one consumer, keyed by (topic, partition)."""

    __slots__ = ("_partitions",)

    def __init__(self) -> None:
        self._partitions: dict[TopicPartitionKey, PartitionOffsets] = {}

    def track(self, tp: TopicPartitionKey, offset: int) -> None:
        """Remember a fetched record of `tp` (see `PartitionOffsets.track`)."""
        self._partition(tp).track(offset)

    def skip_to(self, tp: TopicPartitionKey, offset: int) -> None:
        """Nothing of `tp` before `offset` is left to fetch (see `PartitionOffsets.skip_to`)."""
        self._partition(tp).skip_to(offset)

    def finish(self, tp: TopicPartitionKey, offset: int) -> None:
        """Mark a record of `tp` terminal and durably recorded; an unknown partition is an `OffsetError`."""
        partition = self._partitions.get(tp)
        if partition is None:
            raise OffsetError(f"{_name(tp)}: offset {offset} finished, but nothing of this partition is tracked")
        partition.finish(offset)

    def committable(self) -> dict[TopicPartitionKey, int]:
        """The offsets to commit now, only for partitions whose position moved since their last commit."""
        result: dict[TopicPartitionKey, int] = {}
        for tp, partition in self._partitions.items():
            position = partition.committable()
            if position is not None:
                result[tp] = position
        return result

    def mark_committed(self, offsets: Mapping[TopicPartitionKey, int]) -> None:
        """Record acknowledged commits of tracked partitions.

        A partition not tracked (revoked while its commit was under way) is ignored: keeping its position would
        make the next assignment of it, which starts wherever the group stands then, look like going backwards.
        """
        for tp, offset in offsets.items():
            partition = self._partitions.get(tp)
            if partition is not None:
                partition.mark_committed(offset)

    def revoke(self, tps: Iterable[TopicPartitionKey]) -> None:
        """Forget partitions this consumer no longer owns; their pending records belong to the next owner."""
        for tp in tps:
            self._partitions.pop(tp, None)

    @property
    def pending_total(self) -> int:
        """Pending records over all partitions (the "in flight" that a drain waits for)."""
        return sum(partition.pending for partition in self._partitions.values())

    def pending(self, tp: TopicPartitionKey) -> int:
        """Pending records of one partition; 0 for a partition not tracked."""
        partition = self._partitions.get(tp)
        return 0 if partition is None else partition.pending

    def oldest_pending(self, tp: TopicPartitionKey) -> int | None:
        """The offset holding back `tp`'s commit position, if any."""
        partition = self._partitions.get(tp)
        return None if partition is None else partition.oldest_pending()

    def committed_position(self, tp: TopicPartitionKey) -> int | None:
        """The last position of `tp` marked committed here, if any (the broker may know an older one)."""
        partition = self._partitions.get(tp)
        return None if partition is None else partition.committed

    def _partition(self, tp: TopicPartitionKey) -> PartitionOffsets:
        partition = self._partitions.get(tp)
        if partition is None:
            partition = self._partitions[tp] = PartitionOffsets(_name(tp))
        return partition


def _name(tp: TopicPartitionKey) -> str:
    topic, partition = tp
    return f"{topic}[{partition}]"
