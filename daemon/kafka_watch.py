"""Why Kafka cannot be reached, for one daemon: `Diagnosis`, asked at most once a minute, and `KafkaWatch`, which
asks it for the sinks of a daemon without the ingest (whose publisher asks it itself).

`topics.broker_diagnosis.diagnose` makes one connection to each bootstrap server, and with SASL each is a login: a
wrong password must not count against the account every few seconds, from every retry of every part of the daemon.
So the daemon holds one `Diagnosis` for its start's topic check, the ingest's reconnect probe and the sinks' watch,
which asks at most every `DIAGNOSIS_INTERVAL` and gives its last answer in between, until the brokers answer again
(`forget`).

A sink's consumer that loses its brokers retries by itself, and aiokafka says why only in its own log lines (once in
five minutes, `daemon.logs`): the sink's readiness says "kafka is unreachable" and no more. `KafkaWatch` notices
that a sink has lost its broker (`kafka_silent`: its lag measurement gets no answer), asks the `Diagnosis`, and
keeps the answer for the status document and `orderbus status` (``kafka: UNREACHABLE: ...``); the log says it when
it changes, and when the brokers answer again. A cluster CA rotated under a stale ``kafka.ssl_cafile``, a password
changed on the brokers, a client certificate past its end: each is then named, not only "unreachable".
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Final, Protocol

from consumers.clock import Clock
from topics.broker_diagnosis import Diagnose

__all__ = ["DIAGNOSIS_INTERVAL", "Diagnosis", "KafkaWatch"]

log = logging.getLogger(__name__)

DIAGNOSIS_INTERVAL: Final = 60.0  # seconds between two askings of why the brokers cannot be reached
WATCH_EVERY: Final = 2.0  # seconds between two looks at the sinks (their lag measurement's own interval)


class Diagnosis:
    """`ask` (a bound `topics.broker_diagnosis.diagnose`), asked at most every `interval`; its answer kept meanwhile."""

    def __init__(self, ask: Diagnose, clock: Clock) -> None:
        self._ask, self._clock = ask, clock
        self._asked: tuple[float, str | None] | None = None  # when it was last asked, and what it said

    async def __call__(self) -> str | None:
        now = self._clock.now()
        if self._asked is None or now - self._asked[0] >= DIAGNOSIS_INTERVAL:
            self._asked = (now, await self._ask())
        return self._asked[1]

    def forget(self) -> None:
        """The brokers answered: the next failure is asked about afresh."""
        self._asked = None


class Silent(Protocol):
    """What the watch reads of a sink (`consumers.engine.SinkEngine`)."""

    @property
    def kafka_silent(self) -> bool: ...


class KafkaWatch:
    """Keeps `unreachable`: why the sinks' brokers do not answer, while one of the sinks hears nothing from them."""

    def __init__(self, sinks: Iterable[Silent], diagnosis: Diagnosis, clock: Clock) -> None:
        self._sinks = list(sinks)
        self._diagnosis = diagnosis
        self._clock = clock
        self.unreachable: str | None = None

    async def run(self) -> None:
        """Look at the sinks every `every` seconds until cancelled."""
        while True:
            await self._clock.sleep(WATCH_EVERY)
            await self.look()

    async def look(self) -> None:
        """One look: ask the diagnosis while a sink is silent; forget the cause once none is."""
        if not any(sink.kafka_silent for sink in self._sinks):
            if self.unreachable is not None:
                log.info("kafka answers the sinks again")
                self._diagnosis.forget()
            self.unreachable = None
            return
        why = await self._diagnosis() or "the bootstrap servers answer; a broker they name does not"
        if why != self.unreachable:
            log.warning("kafka unreachable for the sinks: %s", why)
        self.unreachable = why
