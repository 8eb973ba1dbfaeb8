"""A sink's state topic on a real broker: the `consumers.order_state.StateTopic` of the daemon.

Writes go through the sinks' dead-letter producer (acks=all, idempotent), one batch per partition and flush
(`create_batch`/`send_batch`: a flush may carry a few hundred ids, and aiokafka's `send` costs several times a
batch append per record). Reads use a consumer of their own, in no group and committing nothing, assigned the
partitions asked for, from their beginning (or the offset the caller's file read up to, if the partition holds it:
one beyond the partition's end is that of a topic deleted and made again) to their end when the read began, within
`read_timeout`.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from consumers.order_state import Entry, Fetched
from topics.acls import refusal
from topics.errors import SharedStateError

__all__ = ["READ_TIMEOUT", "WRITE_TIMEOUT", "KafkaStateTopic"]

# A partition's state read at assignment, at most: the rebalance listener holds the partitions' first fetch.
READ_TIMEOUT: Final = 120.0
# A flush's write, at most (the sink's commit timeout in the daemon): a stop with the brokers gone must not wait for
# the producer's own request timeout before it commits (which fails then too, and the records come again).
WRITE_TIMEOUT: Final = 10.0
_FETCH_MS: Final = 500


class KafkaStateTopic:
    """`topic`'s records written with `producer`, read with consumers made from `client_options`."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        client_options: Mapping[str, Any],
        topic: str,
        *,
        read_timeout: float = READ_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._producer = producer
        self._options = client_options
        self.topic = topic
        self._read_timeout = read_timeout
        self._write_timeout = write_timeout
        self._monotonic = monotonic

    async def write(self, entries: Sequence[Entry]) -> None:
        by_partition: dict[int, list[Entry]] = defaultdict(list)
        for entry in entries:
            by_partition[entry.partition].append(entry)
        try:
            async with asyncio.timeout(self._write_timeout):  # what was handed over is sent all the same
                sent = [await self._send(partition, batch) for partition, batch in by_partition.items()]
                await asyncio.gather(*(future for futures in sent for future in futures))
        except KafkaError as exc:
            raise SharedStateError(f"order state not written to {self.topic}: {_said(exc)}") from exc
        except TimeoutError:
            detail = f"not acknowledged within {self._write_timeout:g} s"
            raise SharedStateError(f"order state not written to {self.topic}: {detail}") from None

    async def _send(self, partition: int, entries: list[Entry]) -> list[asyncio.Future[Any]]:
        """Hand `entries` to the producer as batches of `partition`, in their order; the futures of the acks."""
        futures = []
        batch = self._producer.create_batch()
        for entry in entries:
            if batch.append(key=entry.key, value=entry.value, timestamp=None) is None:  # full
                futures.append(await self._producer.send_batch(batch, self.topic, partition=partition))
                batch = self._producer.create_batch()
                if batch.append(key=entry.key, value=entry.value, timestamp=None) is None:
                    raise SharedStateError(f"order state not written to {self.topic}: a record larger than a batch")
        futures.append(await self._producer.send_batch(batch, self.topic, partition=partition))
        return futures

    async def read(self, partitions: Iterable[int], starts: Mapping[int, int]) -> AsyncIterator[Fetched]:
        tps = [TopicPartition(self.topic, partition) for partition in sorted(set(partitions))]
        if not tps:
            return
        consumer = AIOKafkaConsumer(**self._options, group_id=None, enable_auto_commit=False)
        ends_by = self._monotonic() + self._read_timeout
        try:
            await consumer.start()
            consumer.assign(tps)
            beginnings, ends = await consumer.beginning_offsets(tps), await consumer.end_offsets(tps)
            for tp in tps:  # from the beginning when retention deleted what `starts` names, or the topic is new
                start = starts.get(tp.partition, 0)
                start = start if beginnings[tp] <= start <= ends[tp] else beginnings[tp]
                consumer.seek(tp, start)
                yield Fetched(tp.partition, [], start)
            while left := [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                if self._monotonic() > ends_by:
                    raise SharedStateError(f"{self.topic}: partitions not read within {self._read_timeout:g} s")
                fetched = await consumer.getmany(*left, timeout_ms=_FETCH_MS)
                for tp, records in fetched.items():
                    entries = [Entry(tp.partition, r.key, r.value) for r in records if r.offset < ends[tp]]
                    yield Fetched(tp.partition, entries, min(await consumer.position(tp), ends[tp]))
        except KafkaError as exc:
            raise SharedStateError(f"cannot read {self.topic}: {_said(exc)}") from exc
        finally:
            await consumer.stop()


def _said(error: KafkaError) -> str:
    return refusal(error) or repr(error)
