"""Records the Kafka client cannot read: their partition found, held and said; nothing skipped, nothing lost.

aiokafka decodes a fetched batch while `getmany` hands its records over. A batch it cannot decode -- a header name
that is not UTF-8 (Kafka's Java clients cannot write one; a client that sends raw bytes can), a compression it
cannot undo, a corrupt batch -- raises out of `getmany` without naming its partition, and that call has already
taken records from partitions before it and moved their positions past them: they would never reach the sink.
The sink then stopped, the daemon with it, and again after every restart.

`ReadGuard` is the sink consumer's fetch, with the error handled:

1. every partition's position goes back to just after the last record handed over (to its committed offset if
   none was), so the records the failed call took are fetched again;
2. for `ISOLATION` seconds each call takes one partition's records, so the next such error names its partition;
   that partition is then read one record at a time, so the records before the unreadable one are handed over
   (a failing call hands over none of those it decoded);
3. when its next record fails, the partition is held: paused, its records left in Kafka (its commits stop
   before them), while its other partitions, the other sinks and the ingest go on. Said at ERROR with the offset
   it stops at and the client's error, counted in ``orderbus_unreadable_partitions``, shown by ``orderbus
   status`` and the ``OrderbusRecordUnreadable`` alert, and tried again every `RETRY` seconds: a fetch corrupted
   on its way reads at the next try. It is tried alone, one record a call, beside the other partitions' usual
   fetches, and stays reported until a record at or past its offset is handed over.

To go on without the record, the operator names it in the sink's settings (``skip_unreadable``, applied at a
reload): a held partition whose offset is named is moved past it, and the guard hands over a `SkippedRecord` in
its place, which the engine dead-letters (reason ``invalid``, without the bytes it could not read) and commits
past as any record. aiokafka decodes a fetched batch whole, records before the position included, so the records
after it in its batch cannot be read either: the partition is then read alone, one record a call, and each record
that fails is skipped the same way at once (no hold, no search), until a record is handed over (they are in Kafka
as they were: their dead letters say so). A named offset that is not held changes nothing.

Which errors: any but those aiokafka raises before it takes a record (`passes_through`: a fetch or group error it
stored for the partition, a stopped consumer), which go to the caller as before. What decoding raises is not one
family (UnicodeDecodeError, CorruptRecordException, a codec's or struct's error, a bare KafkaError for an empty
control batch), and treating an unexpected one as unreadable costs a rewind, where letting it through loses records.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from aiokafka.errors import ConsumerStoppedError, CorruptRecordException, KafkaError, UnsupportedCodecError

from consumers.clock import Clock
from consumers.work import TopicPartitionKey

__all__ = [
    "ISOLATION",
    "RETRY",
    "Held",
    "ReadGuard",
    "SkippedRecord",
    "Skips",
    "coordination_ended",
    "describe",
    "passes_through",
]

log = logging.getLogger(__name__)

ISOLATION: Final = 60.0  # seconds of one-partition fetches after an unreadable batch with no partition named
RETRY: Final = 300.0  # seconds a partition is held before it is read again
POLL: Final = 0.05  # seconds between rounds of one-partition fetches that found nothing


# aiokafka's words when its group coordination task ended on an error it did not expect (a static member fenced by
# another one under its name answers FENCED_INSTANCE_ID, which aiokafka 0.14 does not know): raised as a bare
# KafkaError by every `getmany` from then on. The consumer cannot fetch any more.
_COORDINATION_ENDED: Final = "Unexpected error during coordination"


def coordination_ended(exc: BaseException) -> bool:
    """`exc` says the consumer's group coordination is over for good (`_COORDINATION_ENDED`)."""
    return isinstance(exc, KafkaError) and bool(exc.args) and str(exc.args[0]).startswith(_COORDINATION_ENDED)


def passes_through(exc: Exception) -> bool:
    """An error `getmany` raises before it takes any record: the consumer stopped, its coordination ended, or a
    fetch or group error (a subclass of KafkaError) that aiokafka stored for a partition or its coordinator. A bare
    KafkaError and the record errors come from decoding a batch, after other partitions' records were taken."""
    if isinstance(exc, ConsumerStoppedError) or coordination_ended(exc):
        return True
    return (
        isinstance(exc, KafkaError)
        and type(exc) is not KafkaError
        and not isinstance(exc, (CorruptRecordException, UnsupportedCodecError))
    )


class FetchingConsumer(Protocol):
    """What the guard uses of `aiokafka.AIOKafkaConsumer` (its topic-partitions are ``(topic, partition)`` tuples)."""

    async def getmany(
        self, *partitions: Any, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[Any, list[Any]]: ...

    def assignment(self) -> set[Any]: ...

    def paused(self) -> set[Any]: ...

    def pause(self, *partitions: Any) -> None: ...

    def resume(self, *partitions: Any) -> None: ...

    def seek(self, partition: Any, offset: int) -> None: ...

    async def committed(self, partition: Any) -> int | None: ...

    async def beginning_offsets(self, partitions: list[Any]) -> Mapping[Any, int]: ...


@dataclass(frozen=True, slots=True)
class Held:
    """A partition held at `offset`, the first offset not handed over: the unreadable record is there or after.
    `retry_at` is when it is read again (infinite while it is being read again)."""

    offset: int
    error: str
    retry_at: float

    @property
    def retrying(self) -> bool:
        return math.isinf(self.retry_at)


Skips = Mapping[TopicPartitionKey, Sequence[tuple[int, int]]]
"""Offsets the operator skips, per partition: (first, last) ranges, both included."""


@dataclass(frozen=True, slots=True)
class SkippedRecord:
    """In place of a record the client cannot read, skipped as the settings say: what the engine dead-letters.
    `unreadable` says why, for the dead letter; it has no key, value or headers (they could not be read)."""

    topic: str
    partition: int
    offset: int
    unreadable: str
    timestamp: int  # milliseconds: when it was skipped (it has no time of its own that could be read)
    key: None = None
    value: None = None
    headers: tuple[()] = ()


class ReadGuard:
    """`getmany` over a sink's consumer that survives unreadable batches (see the module)."""

    def __init__(self, consumer: FetchingConsumer, sink: str, clock: Clock) -> None:
        self._consumer = consumer
        self._sink = sink
        self._clock = clock
        # Per partition, the next offset to hand over: just after the last record handed over, or where the
        # partition started (its committed offset, else its beginning) once a rewind had to look that up.
        self._next: dict[TopicPartitionKey, int] = {}
        self._held: dict[TopicPartitionKey, Held] = {}
        self._paused: set[TopicPartitionKey] = set()  # what the engine paused (backpressure, an open circuit)
        self._isolate_until: float | None = None
        self._narrowing: set[TopicPartitionKey] = set()  # read one record a call, up to the one that fails
        self._probing: set[TopicPartitionKey] = set()  # held ones being read again: alone, one record a call
        self._turn = 0
        self._to_rewind: set[TopicPartitionKey] = set()  # positions to put back before the next fetch
        self._skips: Skips = {}
        # Partitions whose last record was skipped, with nothing handed over since (their next offset to hand over
        # is the skipped one's + 1): aiokafka decodes a fetched batch whole, so the rest of that batch cannot be
        # read either. Read alone, one record a call, until a record reads.
        self._skipping: set[TopicPartitionKey] = set()

    def skip(self, skips: Skips) -> None:
        """From now on, a held partition whose offset `skips` names goes on past it (see the module)."""
        self._skips = skips

    @property
    def held(self) -> Mapping[TopicPartitionKey, Held]:
        return self._held

    async def getmany(self, timeout_ms: int, max_records: int) -> Mapping[TopicPartitionKey, list[Any]]:
        if self._to_rewind:  # a rewind cut off (a cancelled fetch, an unanswered committed-offset request)
            await self._rewind(())
        if self._held and self._skips and (skipped := self._skip_held()):
            return skipped
        self._release_due()
        if self._isolate_until is not None and self._clock.now() >= self._isolate_until:
            self._isolate_until = None
            self._narrowing.clear()
        if self._isolate_until is not None:
            return await self._one_partition(timeout_ms, max_records)
        others: tuple[TopicPartitionKey, ...] = ()
        if self._probing:
            probed = await self._probe()
            if probed:
                return probed  # one drain a call: a cancellation cannot cut off records taken
            others = tuple(self._consumer.assignment() - self._probing)
            if not others:  # `getmany()` without partitions would take the probed ones too
                await self._clock.sleep(min(timeout_ms / 1000, POLL))
                return {}
        try:
            batch = await self._consumer.getmany(*others, timeout_ms=timeout_ms, max_records=max_records)
        except Exception as exc:
            if passes_through(exc):
                raise
            log.warning(
                "a fetched batch could not be read: finding its partition",
                extra={"sink": self._sink, "error": describe(exc)},
            )
            self._isolate_until = self._clock.now() + ISOLATION
            await self._rewind(self._consumer.assignment())
            return {}
        self._handed_over(batch)
        return batch

    def moved(self, positions: Mapping[TopicPartitionKey, int]) -> None:
        """The partitions of `positions` were moved there (`consumers.expiry`): the next offsets to hand over."""
        self._next.update(positions)

    def pause(self, tps: Iterable[TopicPartitionKey]) -> None:
        tps = list(tps)
        self._paused.update(tps)
        self._consumer.pause(*tps)

    def resume(self, tps: Iterable[TopicPartitionKey]) -> None:
        """Resume `tps`, but those held (a held one is resumed when its hold ends, if the engine wants it then)."""
        tps = list(tps)
        self._paused.difference_update(tps)
        ready = [tp for tp in tps if tp not in self._held or self._held[tp].retrying]
        if ready:
            self._consumer.resume(*ready)

    def forget(self, tps: Iterable[TopicPartitionKey]) -> None:
        """`tps` were revoked or assigned: what was handed over of them before, their holds and pauses no longer
        count (aiokafka forgets a partition's pause with its assignment)."""
        for tp in tps:
            self._next.pop(tp, None)
            self._held.pop(tp, None)
            self._paused.discard(tp)
            self._narrowing.discard(tp)
            self._probing.discard(tp)
            self._to_rewind.discard(tp)
            self._skipping.discard(tp)

    async def _probe(self) -> Mapping[TopicPartitionKey, list[Any]]:
        """One record of the first partition being read again that has one fetched; one that raises is held."""
        paused = self._consumer.paused()
        for tp in sorted(self._probing):
            if tp in paused:
                continue
            taken = await self._take(tp, 1)
            if isinstance(taken, Exception):
                if tp in self._skipping:  # the next record of the batch being skipped
                    return self._skip(tp, self._next[tp], describe(taken), named=False)
                self._hold(tp, taken)
            elif taken:
                return taken
        return {}

    async def _one_partition(self, timeout_ms: int, max_records: int) -> Mapping[TopicPartitionKey, list[Any]]:
        """The records of the first partition, in turn, that has some fetched. A partition that raises is read
        one record a call from then on, and held when its next record raises.

        One partition per call: aiokafka's `getmany` takes what is already fetched without waiting (timeout 0),
        so a call cut off by a cancellation has taken nothing it did not return.
        """
        paused = self._consumer.paused()
        tps = sorted(tp for tp in self._consumer.assignment() if tp not in paused)
        for i in range(len(tps)):
            tp = tps[(self._turn + i) % len(tps)]
            limit = 1 if tp in self._narrowing or tp in self._skipping else max_records
            taken = await self._take(tp, limit)
            if isinstance(taken, Exception):
                if tp in self._skipping:  # read one record a call: the one that failed is the batch's next
                    return self._skip(tp, self._next[tp], describe(taken), named=False)
                if limit == 1:
                    self._narrowing.discard(tp)
                    self._hold(tp, taken)
                else:
                    self._narrowing.add(tp)
            elif taken:
                self._turn = (self._turn + i + 1) % len(tps)
                return taken
        await self._clock.sleep(min(timeout_ms / 1000, POLL))
        return {}

    async def _take(self, tp: TopicPartitionKey, limit: int) -> Mapping[TopicPartitionKey, list[Any]] | Exception:
        """Up to `limit` of `tp`'s records already fetched, handed over; or the error that reading them raised,
        once `tp` is back where it was (a partition revoked meanwhile has no records: its next owner reads it)."""
        try:
            batch = await self._consumer.getmany(tp, timeout_ms=0, max_records=limit)
        except Exception as exc:
            if passes_through(exc):
                raise
            await self._rewind([tp])
            return exc if tp in self._consumer.assignment() else {}
        self._handed_over(batch)
        return batch

    def _handed_over(self, batch: Mapping[TopicPartitionKey, list[Any]]) -> None:
        for tp, records in batch.items():
            if records:
                self._next[tp] = records[-1].offset + 1
                if tp in self._skipping:  # the skipped batch is over: read as usual again
                    self._skipping.discard(tp)
                    self._probing.discard(tp)
                held = self._held.get(tp)
                if held is not None and held.retrying and records[-1].offset >= held.offset:
                    del self._held[tp]  # read past where it was held: it was the fetch, not the record
                    self._probing.discard(tp)
                    log.info(
                        "a held partition reads again", extra={"sink": self._sink, "topic": tp[0], "partition": tp[1]}
                    )

    async def _rewind(self, tps: Iterable[TopicPartitionKey]) -> None:
        """Move `tps` back to the next offset to hand over: a failed `getmany` had moved them past records it never
        returned. Each stays due until it is done, so a rewind cut off is finished before the next fetch."""
        self._to_rewind.update(tps)
        for tp in sorted(self._to_rewind):
            offset = self._next.get(tp)
            if offset is None:
                offset = await self._start_of(tp)
            if tp in self._consumer.assignment():  # a rebalance may have taken it during the lookup
                self._consumer.seek(tp, offset)
                self._next.setdefault(tp, offset)
            self._to_rewind.discard(tp)

    async def _start_of(self, tp: TopicPartitionKey) -> int:
        """Where a partition that has handed nothing over started: its committed offset, else its beginning (where
        a new group starts: `consumers.expiry`)."""
        committed = await self._consumer.committed(tp)
        if committed is not None:
            return committed
        return (await self._consumer.beginning_offsets([tp]))[tp]

    def _hold(self, tp: TopicPartitionKey, exc: Exception) -> None:
        self._consumer.pause(tp)
        self._probing.discard(tp)
        offset = self._next[tp]  # set by the rewind just before
        held = self._held[tp] = Held(offset, describe(exc), self._clock.now() + RETRY)
        log.error(
            "records cannot be read: partition held",
            extra={
                "sink": self._sink,
                "topic": tp[0],
                "partition": tp[1],
                "offset": offset,
                "error": held.error,
                "retry_in": RETRY,
            },
        )

    def _skip_held(self) -> Mapping[TopicPartitionKey, list[Any]]:
        """A held partition's stand-in record, once it is moved past the offset it is held at, if `skip` names it."""
        assigned = self._consumer.assignment()
        for tp, held in self._held.items():
            ranges = self._skips.get((tp[0], tp[1]), ())
            if tp in assigned and any(first <= held.offset <= last for first, last in ranges):
                del self._held[tp]
                if tp not in self._paused:
                    self._consumer.resume(tp)
                return self._skip(tp, held.offset, held.error, named=True)
        return {}

    def _skip(
        self, tp: TopicPartitionKey, offset: int, error: str, *, named: bool
    ) -> dict[TopicPartitionKey, list[Any]]:
        """Move `tp` past `offset` and hand over the stand-in of its record. Until a record of `tp` is handed over
        again, `tp` is read alone, one record a call (`_probe`): the next record of the batch fails too, and is
        skipped at once, without a hold, an ERROR or a rewind of every partition."""
        self._consumer.seek(tp, offset + 1)
        self._next[tp] = offset + 1
        self._skipping.add(tp)
        self._probing.add(tp)
        where = {"sink": self._sink, "topic": tp[0], "partition": tp[1], "offset": offset}
        log.warning("an unreadable record skipped as the settings say: dead-lettered", extra=where)
        what = "the record at or after this offset" if named else "this record: its batch holds one it cannot"
        why = (
            f"the Kafka client cannot read {what} ({error}); skipped as sinks.{self._sink}.skip_unreadable says: "
            f"its bytes stay on {tp[0]} until the topic's retention"
        )
        return {tp: [SkippedRecord(tp[0], tp[1], offset, why, int(self._clock.wall() * 1000))]}

    def _release_due(self) -> None:
        """Read held partitions again once their time has come (`_probe`); each stays reported until it reads
        past its offset, or is held again."""
        now = self._clock.now()
        due = [tp for tp, held in self._held.items() if held.retry_at <= now]
        if not due:
            return
        assigned = self._consumer.assignment()
        for tp in due:
            self._held[tp] = Held(self._held[tp].offset, self._held[tp].error, math.inf)
            self._probing.add(tp)
            if tp in assigned and tp not in self._paused:
                log.info(
                    "reading a held partition again",
                    extra={"sink": self._sink, "topic": tp[0], "partition": tp[1]},
                )
                self._consumer.resume(tp)


def describe(exc: BaseException) -> str:
    """The client's error, short: a UnicodeDecodeError's text names the bytes' position, not the record's content."""
    return f"{type(exc).__name__}: {exc}"[:300]
