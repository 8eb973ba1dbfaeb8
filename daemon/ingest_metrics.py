"""The daemon's own Prometheus metrics: the webhook ingest's and its listener's, its certificate's expiry, and the
build info.

Registered on the injected registry the engine's metrics use (`consumers.metrics`), so one ``/metrics`` scrape
shows everything and a test gets a fresh registry. Label values are bounded: the HTTP status codes the ingest
answers with, a connection's state and what became of it at the limit, and the version strings of this build.
"""

from __future__ import annotations

import functools
import platform
import time
from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# The answers of POST /v1/orders (see `daemon.ingest`), created at zero so rates and ratios have a series.
INGEST_CODES: Final = ("202", "400", "401", "409", "413", "415", "422", "499", "500", "503")
# acks=all on a healthy cluster takes milliseconds; the top buckets catch a struggling one (timeout 10 s).
PUBLISH_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class IngestMetrics:
    """``orderbus_ingest_*``; one instance per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "orderbus_ingest_requests",
            "Webhook requests to POST /v1/orders, by the status code answered",
            ["code"],
            registry=registry,
        )
        self.publish_seconds = Histogram(
            "orderbus_ingest_publish_seconds",
            "From handing an order to the producer to the broker's acks=all (a publish still pending at the "
            "timeout counts as the timeout; a refusal while Kafka is known to be down is not a publish)",
            buckets=PUBLISH_BUCKETS,
            registry=registry,
        )
        # Every answer counts one: look its child up once here rather than through labels() per request.
        self._by_status = {int(code): self.requests.labels(code) for code in INGEST_CODES}

    def answered(self, status: int) -> None:
        counter = self._by_status.get(status)
        if counter is None:  # another code, from an aiohttp HTTPException raised inside the handler
            counter = self._by_status[status] = self.requests.labels(str(status))
        counter.inc()


# A webhook connection's states, and what became of one at ``ingest.max_connections`` (`daemon.connection_gate`).
CONNECTION_STATES: Final = ("busy", "idle", "refusing")
SHED_ACTIONS: Final = ("closed_idle", "refused")


class ConnectionMetrics:
    """``orderbus_ingest_connections``, ``orderbus_ingest_max_connections`` and
    ``orderbus_ingest_connections_shed_total``: the webhook listener's connections against their limit."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.open = Gauge(
            "orderbus_ingest_connections",
            "Connections open on the webhook's listener (the one listener without an admin port): busy (a request "
            "read, handled, answered or queued on it), idle (waiting for one), refusing (being answered 503 at the "
            "limit; not counted against it)",
            ["state"],
            registry=registry,
        )
        self.limit = Gauge(
            "orderbus_ingest_max_connections",
            "ingest.max_connections: at this many open connections, the one idle longest (for 2 s at least) is cut "
            "off for a new one, else the new one is refused with 503",
            registry=registry,
        )
        shed = Counter(
            "orderbus_ingest_connections_shed",
            "Connections at the limit: closed_idle (the one idle longest, cut off for a new one), refused (the new "
            "one: 503, or cut off beyond the refusals held)",
            ["action"],
            registry=registry,
        )
        self._shed = {action: shed.labels(action) for action in SHED_ACTIONS}

    def watch(self, states: Callable[[], Mapping[str, int]], limit: int) -> None:
        """`states`: how many connections are in each state now (`CONNECTION_STATES`), asked at each scrape."""
        for state in CONNECTION_STATES:
            self.open.labels(state).set_function(functools.partial(_count_of, states, state))
        self.limit.set(limit)

    def shed(self, action: str) -> None:
        self._shed[action].inc()


def _count_of(states: Callable[[], Mapping[str, int]], state: str) -> float:
    return states()[state]


def register_certificate_expiry(registry: CollectorRegistry, not_after: Callable[[], float]) -> None:
    """``orderbus_ingest_tls_certificate_expiry_timestamp_seconds``: when the webhook listener's certificate in use
    expires (`not_after`, read at each scrape: a reload renews it), for an alert weeks ahead."""
    expiry = Gauge(
        "orderbus_ingest_tls_certificate_expiry_timestamp_seconds",
        "When the certificate the webhook's HTTPS listener serves expires (unix seconds); absent without HTTPS",
        registry=registry,
    )
    expiry.set_function(not_after)


def register_kafka_certificate_expiry(registry: CollectorRegistry, not_after: Callable[[], float]) -> None:
    """``orderbus_kafka_client_certificate_expiry_timestamp_seconds``: when the Kafka client certificate in use
    expires (`not_after`, read at each scrape: a reload renews it), for an alert weeks ahead: once it has, no
    broker takes orderbus."""
    Gauge(
        "orderbus_kafka_client_certificate_expiry_timestamp_seconds",
        "When the client certificate orderbus shows the Kafka brokers expires (unix seconds); absent without one",
        registry=registry,
    ).set_function(not_after)


def register_start_time(registry: CollectorRegistry) -> None:
    """``orderbus_start_time_seconds``, when this daemon started (now): what a counter counted before its first
    scrape is new since then (``OrderbusRecordsExpired``)."""
    Gauge("orderbus_start_time_seconds", "When this daemon started (unix seconds)", registry=registry).set(time.time())


def register_build_info(registry: CollectorRegistry) -> None:
    """``orderbus_build_info{version, python} 1``: join on it to see which build a series came from."""
    build = Gauge(
        "orderbus_build_info",
        "Always 1; the labels say which orderbus and which Python are running",
        ["version", "python"],
        registry=registry,
    )
    build.labels(package_version(), platform.python_version()).set(1)


def package_version() -> str:
    try:
        return version("orderbus")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"
