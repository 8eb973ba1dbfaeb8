"""Records Kafka deleted before a sink read them: found, counted and said, never skipped in silence.

A sink's position in a partition (its committed offset, or where it stands after a rewind) may fall before the
partition's log start: its retention (``topics.orders_retention_hours``) deleted records the sink had not read,
after an outage or a pause longer than that, or an operator deleted them. A consumer that resets to the earliest
offset on its own (``auto_offset_reset="earliest"``, what orderbus had) goes on from the log start, and the orders
in between never reach the sink, with nothing said but an INFO line of aiokafka's. A position past the log's end
means the log was cut back (the topic deleted and made again, an unclean leader election).

So the sink's consumer resets nothing on its own (``auto_offset_reset="none"``), and `Positions.settle` takes the
error its fetch raises instead:

- no committed offset (a new consumer group): read from the partition's start, as before;
- a position before the log start: the records in between are gone; said at ERROR with the partition, the
  offsets and the count, counted in ``orderbus_expired_records_total`` (the ``OrderbusRecordsExpired`` alert),
  and read on from the log start;
- a position past the log's end: said at ERROR, and read from the log start; the records the sink delivered
  before are recognised by its dedup table, where it still holds them (``dedup_retention_hours``, on that host).
  A run that has read records of that partition cannot go back under them: it stops there
  (`consumers.engine.SinkEngine`), and the daemon's restart reads the partition from its start;
- a position in the log after all (its leader moved between the fetch and the question): read on from there.

Each move reaches the engine (`ConsumerPort.moved`), whose commits then move past the deleted records: a restart
or the partition's next owner does not find them missing again. A partition revoked during the lookups is left to
its next owner. Kafka also forgets a group's committed offsets after ``offsets.retention.minutes`` (7 days by
default) with no member: a group away longer than that reads as a new one, and what was deleted meanwhile cannot be
told, so keep that setting above the orders topic's retention.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from aiokafka.errors import NoOffsetForPartitionError, OffsetOutOfRangeError

from consumers.work import TopicPartitionKey

__all__ = ["PositioningConsumer", "Positions"]

log = logging.getLogger(__name__)


class PositioningConsumer(Protocol):
    """What `Positions` uses of `aiokafka.AIOKafkaConsumer` (its topic-partitions are ``(topic, partition)``
    tuples)."""

    def assignment(self) -> set[Any]: ...

    def seek(self, partition: Any, offset: int) -> None: ...

    async def beginning_offsets(self, partitions: list[Any]) -> Mapping[Any, int]: ...

    async def end_offsets(self, partitions: list[Any]) -> Mapping[Any, int]: ...


class Positions:
    """Where a sink's partitions go on when their position is lost (see the module)."""

    def __init__(self, consumer: PositioningConsumer, sink: str, expired: Callable[[int], None]) -> None:
        """`expired(n)`: `n` records were deleted before the sink read them (the metric's counter)."""
        self._consumer = consumer
        self._sink = sink
        self._expired = expired

    async def settle(self, exc: NoOffsetForPartitionError | OffsetOutOfRangeError) -> dict[TopicPartitionKey, int]:
        """Move each partition `exc` names (and still assigned) where it goes on (see the module); the offsets it
        was moved to."""
        if isinstance(exc, NoOffsetForPartitionError):
            lost: dict[Any, int | None] = {exc.args[0]: None}
        else:
            lost = dict(exc.args[0]) if exc.args and isinstance(exc.args[0], Mapping) else {}
        assigned = self._consumer.assignment()
        tps = [tp for tp in lost if tp in assigned]  # a rebalance may have taken some meanwhile
        if not tps:
            return {}
        starts = await self._consumer.beginning_offsets(tps)
        ends = await self._consumer.end_offsets(tps) if any(lost[tp] is not None for tp in tps) else {}
        moved: dict[TopicPartitionKey, int] = {}
        assigned = self._consumer.assignment()  # a rebalance may have taken some during the lookups: their next
        for tp in (tp for tp in tps if tp in assigned):  # owner finds (and counts) what is missing
            offset = self._next_offset(tp, starts[tp], lost[tp], ends.get(tp))
            self._consumer.seek(tp, offset)
            moved[(tp[0], tp[1])] = offset
        return moved

    def _next_offset(self, tp: Any, start: int, position: int | None, end: int | None) -> int:
        """Where `tp` goes on, its log starting at `start` and ending at `end`, from `position` (None: none)."""
        where = {"sink": self._sink, "topic": tp[0], "partition": tp[1]}
        if position is None:
            log.debug("no committed offset: reading the partition from its start", extra={**where, "offset": start})
            return start
        if position < start:
            self._expired(start - position)
            log.error(
                "records deleted from kafka before this sink read them: their orders did not reach it",
                extra={**where, "from_offset": position, "to_offset": start - 1, "records": start - position},
            )
            return start
        if end is None or position <= end:  # in range after all (its leader moved meanwhile): read on from there
            log.warning(
                "the broker said the position was out of range, it is not now", extra={**where, "offset": position}
            )
            return position
        log.error(
            "the partition's log ends before this sink's position (the topic made again, or its log cut back): "
            "reading it from its start, what was delivered before is recognised",
            extra={**where, "offset": position, "log_start": start, "log_end": end},
        )
        return start
