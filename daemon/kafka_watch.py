"""Why the sinks' Kafka cannot be reached, while it cannot: for a daemon without the ingest, whose publisher says it.

A sink's consumer that loses its brokers retries by itself, and aiokafka says why only in its own log lines (once in
five minutes, `daemon.logs`): the sink's readiness says "kafka is unreachable" and no more. `KafkaWatch` notices
that a sink has heard nothing from the broker for `silent` seconds (its lag measurement, every 2 s, gets no
answer), asks `topics.broker_diagnosis` why, at most every `interval` (with SASL each asking is a login), and keeps
the answer for the status document and `orderbus status` (``kafka: UNREACHABLE: ...``); the log says it when it
changes, and when the brokers answer again. A cluster CA rotated under a stale ``kafka.ssl_cafile``, a password
changed on the brokers, a client certificate past its end: each is then named, not only "unreachable".
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from consumers.clock import Clock

__all__ = ["KafkaWatch"]

log = logging.getLogger(__name__)


class Silent(Protocol):
    """What the watch reads of a sink (`consumers.engine.SinkEngine`)."""

    @property
    def kafka_silence(self) -> float: ...


class KafkaWatch:
    """Keeps `unreachable`: why the sinks' brokers do not answer, while one of the sinks hears nothing from them."""

    def __init__(
        self,
        sinks: Iterable[Silent],
        diagnose: Callable[[], Awaitable[str | None]],
        clock: Clock,
        *,
        silent: float,
        every: float = 2.0,
        interval: float = 60.0,
    ) -> None:
        """`silent`: seconds without an answer that make a sink's broker unreachable (as its readiness says);
        `every`: how often the sinks are looked at; `interval`: the least time between two diagnoses."""
        self._sinks = list(sinks)
        self._diagnose = diagnose
        self._clock = clock
        self._silent, self._every, self._interval = silent, every, interval
        self._asked: float | None = None
        self.unreachable: str | None = None

    async def run(self) -> None:
        """Look at the sinks every `every` seconds until cancelled."""
        while True:
            await self._clock.sleep(self._every)
            await self.look()

    async def look(self) -> None:
        """One look: diagnose (when due) while a sink is silent; forget the cause once none is."""
        if not any(sink.kafka_silence > self._silent for sink in self._sinks):
            if self.unreachable is not None:
                log.info("kafka answers the sinks again")
            self.unreachable, self._asked = None, None
            return
        now = self._clock.now()
        if self._asked is not None and now - self._asked < self._interval:
            return
        self._asked = now
        why = await self._diagnose() or "the bootstrap servers answer; a broker they name does not"
        if why != self.unreachable:
            log.warning("kafka unreachable for the sinks: %s", why)
        self.unreachable = why
