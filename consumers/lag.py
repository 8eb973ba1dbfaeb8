"""Lag per partition, measured in-process: the end offset minus where this sink stands.

End offsets are asked for (ListOffsets) every `interval`, because paused partitions are not fetched and so their
high watermark would go stale exactly when the lag matters. Where a sink stands in a partition is its oldest
unfinished record, else its last commit (ours, else the group's on the broker, else the partition's start). A
measurement is also the engine's contact with the broker (`silence`, for /readyz); it may take at most twice
`interval`, so that an unreachable broker makes the measurement fail rather than go quiet.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from aiokafka.errors import KafkaError

from consumers.clock import Clock
from consumers.consumer_port import ConsumerPort
from consumers.offsets import OffsetTracker
from consumers.work import TopicPartitionKey

log = logging.getLogger(__name__)


class LagMeter:
    """One sink's lag per assigned partition (`lag`), and how long the broker has been silent (`silence`)."""

    def __init__(
        self,
        consumer: ConsumerPort,
        offsets: OffsetTracker,
        clock: Clock,
        *,
        interval: float,
        sink: str,
        contact: TopicPartitionKey | None = None,
    ) -> None:
        """`contact`: a partition whose end offset is asked for while none is assigned, so that an instance
        without partitions (a spare member, or one in a rebalance) still notices an unreachable broker."""
        self._consumer = consumer
        self._contact = contact
        self._offsets = offsets
        self._clock = clock
        self._interval = interval
        self._sink = sink
        self.lag: dict[TopicPartitionKey, int] = {}
        self._kafka_seen = clock.now()  # the last time the broker answered a measurement

    async def measure(self) -> None:
        """Measure every assigned partition now; on a failure or a timeout keep the last figures."""
        assigned = self._consumer.assignment()
        try:
            async with asyncio.timeout(2 * self._interval):
                if assigned:
                    lag = await self._measure(assigned)
                else:  # no lag to measure; the broker's answer is still the contact /readyz asks about
                    lag = {}
                    if self._contact is not None:
                        await self._consumer.end_offsets([self._contact])
        except (KafkaError, TimeoutError) as exc:
            log.debug("lag not measured", extra={"sink": self._sink, "error": repr(exc)})
            if not assigned:
                self.lag = {}
            return
        self.lag = lag
        self._kafka_seen = self._clock.now()

    def forget(self, tp: TopicPartitionKey) -> None:
        """`tp` was revoked: its lag is another member's to measure."""
        self.lag.pop(tp, None)

    @property
    def silence(self) -> float:
        """Seconds since the broker last answered a measurement."""
        return max(0.0, self._clock.now() - self._kafka_seen)

    async def _measure(self, assigned: set[TopicPartitionKey]) -> dict[TopicPartitionKey, int]:
        ends = await self._consumer.end_offsets(assigned)
        lag = {}
        starts: Mapping[TopicPartitionKey, int] | None = None
        for tp, end in ends.items():
            position = await self._position(tp)
            if position is None:  # nothing committed yet: the group starts from the beginning
                starts = starts or await self._consumer.beginning_offsets(assigned)
                position = starts.get(tp, 0)
            lag[tp] = max(0, end - position)
        return lag

    async def _position(self, tp: TopicPartitionKey) -> int | None:
        """Where this sink stands in `tp`: its oldest unfinished record, else its last commit."""
        oldest = self._offsets.oldest_pending(tp)
        if oldest is not None:
            return oldest
        committed = self._offsets.committed_position(tp)
        if committed is not None:
            return committed
        return await self._consumer.committed_offset(tp)


__all__ = ["LagMeter"]
