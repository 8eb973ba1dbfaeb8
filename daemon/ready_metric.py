"""``orderbus_ready{component}``: what /readyz says, as a metric an alert can read.

The lag gauges keep their last figures while Kafka does not answer (`consumers.lag`), and a sink whose group
has its partitions stays assigned, so neither the lag alerts nor `OrderbusSinkUnassigned` see a daemon cut off
from Kafka; upstream producers' orders then wait unseen. Each component of this instance ("ingest",
"sink.<name>") is 1 when ready and 0 while `daemon.lifecycle`'s readiness names a reason for it (Kafka
unreachable, the key store failing, the group not joined yet), computed at each scrape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

NAME = "orderbus_ready"
_HELP = "1 when this component of the instance is ready, 0 while /readyz names a reason (kafka unreachable, ...)"


class ReadinessCollector(Collector):
    def __init__(self, components: Sequence[str], reasons: Callable[[], Mapping[str, str]]) -> None:
        self._components = tuple(components)
        self._reasons = reasons
        self._failing = False

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """The family without samples: registering it must not run the readiness check."""
        yield GaugeMetricFamily(NAME, _HELP, labels=["component"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            not_ready: Mapping[str, str] | None = self._reasons()
        except Exception:  # a bug: every component 0 (the alert sees it), and the scrape's other metrics still go
            if not self._failing:
                log.exception("readiness could not be computed for orderbus_ready")
            self._failing, not_ready = True, None
        else:
            self._failing = False
        family = GaugeMetricFamily(NAME, _HELP, labels=["component"])
        for component in self._components:
            family.add_metric([component], 0.0 if not_ready is None or component in not_ready else 1.0)
        yield family


def register_readiness(
    registry: CollectorRegistry, components: Sequence[str], reasons: Callable[[], Mapping[str, str]]
) -> None:
    registry.register(ReadinessCollector(components, reasons))
