"""How long the orders topic keeps its records, as its brokers say: ``orderbus_orders_retention_seconds``.

`OrderbusBacklogNearRetention` fires when a sink's oldest unfinished record is older than half of it. The setting
``topics.orders_retention_hours`` is what `orderbus topics apply` creates the topic with; the topic's own
``retention.ms`` is what Kafka deletes by, and the two part ways: a topic made by a platform team's tooling, or one
whose retention was raised with kafka-configs.sh during an outage, as that alert's runbook advises. An alert held
to the setting then fires too early, or too late to matter. So a daemon with sinks reads the topic's retention
from its brokers at start and every `EVERY`, and the gauge follows the topic. Said once each at WARNING: a
retention other than the setting's (the alert follows the topic), and a ``retention.bytes``, by which Kafka
deletes the oldest records of a full partition whatever their age, which no age can warn of.

Until the first answer, and while the brokers do not give one, the gauge keeps the setting, or the last answer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final

from consumers.clock import Clock
from topics.errors import BrokerError, RefusedError

__all__ = ["EVERY", "Retention", "RetentionWatch", "retention_of"]

log = logging.getLogger(__name__)

EVERY: Final = 600.0  # seconds between two readings of the topic's retention


@dataclass(frozen=True, slots=True)
class Retention:
    """A topic's retention: `seconds` (infinite for ``retention.ms = -1``), and `bytes` a partition may hold before
    its oldest records are deleted (None: no such bound, ``-1``)."""

    seconds: float
    bytes: int | None


def retention_of(configs: Mapping[str, str | None]) -> Retention | None:
    """The retention in a topic's described configs; None if they do not say it (not described, or unreadable)."""
    try:
        ms, size = int(configs["retention.ms"] or ""), int(configs.get("retention.bytes") or "-1")
    except (KeyError, ValueError):
        return None
    return Retention(math.inf if ms < 0 else ms / 1000, None if size < 0 else size)


class RetentionWatch:
    """Keeps the gauge (`show`) at the topic's retention, read with `read` (the topic's configs; `BrokerError` when
    the brokers do not answer or describe it), and says where it leaves the setting (`setting`, seconds)."""

    def __init__(
        self,
        topic: str,
        read: Callable[[], Awaitable[Mapping[str, str | None]]],
        show: Callable[[float], None],
        setting: float,
        clock: Clock,
    ) -> None:
        self._topic, self._read, self._show, self._setting, self._clock = topic, read, show, setting, clock
        self._said: set[tuple[str, float | int | None]] = set()  # what was logged, so that it is said once
        self._shown = setting
        show(setting)

    async def run(self) -> None:
        """Read it now, then every `EVERY` seconds, until cancelled. A bug in a reading is said with its traceback,
        and the next reading is tried all the same (this is a gauge's upkeep, not the daemon's work)."""
        while True:
            try:
                await self.look()
            except Exception:
                log.exception("the orders topic's retention could not be read", extra={"topic": self._topic})
            await self._clock.sleep(EVERY)

    async def look(self) -> Retention | None:
        """One reading: the gauge set to the topic's retention, and what differs said (once); None if unread."""
        try:
            retention = retention_of(await self._read())
        except BrokerError as exc:  # the gauge keeps what it had; said once (an unreachable Kafka, the sinks say)
            level = logging.WARNING if self._first(("unread", None)) else logging.DEBUG
            grant = "; grant DescribeConfigs on the topic" if isinstance(exc, RefusedError) else ""
            log.log(
                level,
                "the orders topic's retention could not be read (%s): OrderbusBacklogNearRetention stays held to %s "
                "until it is%s",
                exc,
                _hours(self._shown),
                grant,
            )
            return None
        if retention is None:
            log.debug("orders topic retention not described", extra={"topic": self._topic})
            return None
        self._shown = retention.seconds
        self._show(retention.seconds)
        if not math.isclose(retention.seconds, self._setting) and self._first(("seconds", retention.seconds)):
            log.warning(
                "the orders topic %s keeps its records %s, topics.orders_retention_hours says %s: "
                "OrderbusBacklogNearRetention follows the topic; set the one that is wrong to the other "
                "(orderbus topics apply reports the difference as drift and changes no existing topic)",
                self._topic,
                _hours(retention.seconds),
                _hours(self._setting),
            )
        if retention.bytes is not None and self._first(("bytes", retention.bytes)):
            log.warning(
                "the orders topic %s has retention.bytes = %d: Kafka deletes a partition's oldest records once it "
                "holds that many bytes, whatever their age, and no alert on age can warn of it; unless the disk "
                "needs it, set retention.bytes to -1 (kafka-configs.sh --alter --entity-type topics --entity-name "
                "%s --add-config retention.bytes=-1)",
                self._topic,
                retention.bytes,
                self._topic,
            )
        return retention

    def _first(self, said: tuple[str, float | int | None]) -> bool:
        if said in self._said:
            return False
        self._said.add(said)
        return True


def _hours(seconds: float) -> str:
    return "forever (retention.ms = -1)" if math.isinf(seconds) else f"{seconds / 3600:g} h"
