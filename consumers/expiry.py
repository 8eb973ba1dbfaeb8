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
- a position in the log after all (its leader moved between the fetch and the question, or the error came from
  before a rebalance): the consumer's own position stays.

Each move reaches the engine (`ConsumerPort.moved`), which says and counts the deleted records once it knows the
partition is still its own (not drained meanwhile), and whose commits then move past them: a restart or the
partition's next owner does not find them missing again.

Kafka also forgets a group's committed offsets after ``offsets.retention.minutes`` (7 days by default) with no
member: a group away longer than that reads as a new one, and what was deleted meanwhile cannot be told, so keep
that setting above the orders topic's retention.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka.errors import NoOffsetForPartitionError, OffsetOutOfRangeError

from consumers.work import TopicPartitionKey

__all__ = ["Move", "PositioningConsumer", "Positions", "say_deleted"]

log = logging.getLogger(__name__)


class PositioningConsumer(Protocol):
    """What `Positions` uses of `aiokafka.AIOKafkaConsumer` (its topic-partitions are ``(topic, partition)``
    tuples)."""

    def assignment(self) -> set[Any]: ...

    def seek(self, partition: Any, offset: int) -> None: ...

    async def beginning_offsets(self, partitions: list[Any]) -> Mapping[Any, int]: ...

    async def end_offsets(self, partitions: list[Any]) -> Mapping[Any, int]: ...


@dataclass(frozen=True, slots=True)
class Move:
    """Where a partition goes on (`offset`), and from where: the position Kafka had deleted the records after, up to
    `offset` (`deleted_from`; None when nothing was deleted)."""

    offset: int
    deleted_from: int | None = None

    @property
    def deleted(self) -> int:
        return 0 if self.deleted_from is None else self.offset - self.deleted_from


def say_deleted(sink: str, tp: TopicPartitionKey, move: Move) -> None:
    """The ERROR line for records deleted before `sink` read them (said by the engine, which counts them too, once
    it knows the partition is still its own)."""
    log.error(
        "records deleted from kafka before this sink read them: their orders did not reach it",
        extra={
            "sink": sink,
            "topic": tp[0],
            "partition": tp[1],
            "from_offset": move.deleted_from,
            "to_offset": move.offset - 1,
            "records": move.deleted,
        },
    )


class Positions:
    """Where a sink's partitions go on when their position is lost (see the module)."""

    def __init__(self, consumer: PositioningConsumer, sink: str) -> None:
        self._consumer = consumer
        self._sink = sink

    async def settle(self, exc: NoOffsetForPartitionError | OffsetOutOfRangeError) -> dict[TopicPartitionKey, Move]:
        """Move each partition `exc` names (and still assigned) where it goes on (see the module); the moves made.
        A position in range after all is left as it is, and is no move."""
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
        moves: dict[TopicPartitionKey, Move] = {}
        assigned = self._consumer.assignment()  # a rebalance may have taken some during the lookups
        for tp in (tp for tp in tps if tp in assigned):
            move = self._move(tp, starts[tp], lost[tp], ends.get(tp))
            if move is not None:
                self._consumer.seek(tp, move.offset)
                moves[(tp[0], tp[1])] = move
        return moves

    def _move(self, tp: Any, start: int, position: int | None, end: int | None) -> Move | None:
        """Where `tp` goes on, its log starting at `start` and ending at `end`, from `position` (None: none)."""
        where = {"sink": self._sink, "topic": tp[0], "partition": tp[1]}
        if position is None:
            log.debug("no committed offset: reading the partition from its start", extra={**where, "offset": start})
            return Move(start)
        if position < start:
            return Move(start, deleted_from=position)  # said and counted by the engine
        if end is None or position <= end:
            # In range after all (its leader moved meanwhile), or an error from before a rebalance, whose new
            # assignment stands elsewhere: the consumer's own position stays.
            log.warning(
                "the broker said the position was out of range, it is not now", extra={**where, "offset": position}
            )
            return None
        log.error(
            "the partition's log ends before this sink's position (the topic made again, or its log cut back): "
            "reading it from its start, what was delivered before is recognised",
            extra={**where, "offset": position, "log_start": start, "log_end": end},
        )
        return Move(start)
