"""The delivery engine's Prometheus metrics, registered on an injected registry (a fresh one per test).

Names follow Prometheus conventions: base units (seconds, records), ``_total`` on counters (added by
prometheus-client), ``_seconds`` on durations. Label values are bounded: sink names, outcomes, reasons, status
classes and partition numbers. Never an order number, an email or a URL.

`EngineMetrics.add_sink` creates every labelled series of a sink at zero when its engine starts, so that
``increase()`` sees the first dead letter, alert rules comparing with 0 have a series to compare, and dashboards
show 0 rather than "no data".
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from consumers.deadletter import REASONS

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}

OUTCOMES: Final = ("delivered", "duplicate", "dead_lettered")
STATUS_CLASSES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx", "timeout", "connection_error")
RETRY_REASONS: Final = ("throttled", "4xx", "5xx", "timeout", "connection_error")


@dataclass(frozen=True, slots=True)
class HotSeries:
    """One sink's per-record series, bound to its labels (see `EngineMetrics.hot`)."""

    attempt_seconds: Histogram
    end_to_end_seconds: Histogram
    deliveries: Mapping[str, Counter]  # by outcome (`OUTCOMES`)
    http_responses: Mapping[str, Counter]  # by status class (`STATUS_CLASSES`)
    dedup_hits: Counter

    def skipped_duplicate(self) -> None:
        """A record found already terminal (the dedup table, a replay's second copy, a lane's repeat) is skipped."""
        self.dedup_hits.inc()
        self.deliveries["duplicate"].inc()


class EngineMetrics:
    """Every metric of every sink's engine; one instance per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.records_consumed = Counter(
            "orderbus_records_consumed", "Records fetched from the orders topic", ["sink"], registry=registry
        )
        self.deliveries = Counter(
            "orderbus_deliveries",
            "Records that reached a terminal state, by outcome (delivered, duplicate, dead_lettered)",
            ["sink", "outcome"],
            registry=registry,
        )
        self.http_responses = Counter(
            "orderbus_http_responses",
            "Answers from downstream systems by status class (2xx, 4xx, 5xx, timeout, connection_error)",
            ["sink", "status_class"],
            registry=registry,
        )
        self.retries = Counter(
            "orderbus_retries",
            "Attempts that will be retried, by reason (throttled = 429, 4xx, 5xx, timeout, connection_error)",
            ["sink", "reason"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "orderbus_dead_letters", "Records written to a dead-letter topic", ["sink", "reason"], registry=registry
        )
        self.dedup_hits = Counter(
            "orderbus_dedup_hits", "Records skipped because they were already delivered", ["sink"], registry=registry
        )
        self.expired_records = Counter(
            "orderbus_expired_records",
            "Records Kafka deleted (retention) before the sink read them, of the orders or the replay topic",
            ["sink"],
            registry=registry,
        )
        self.orders_retention = Gauge(
            "orderbus_orders_retention_seconds",
            "How long the orders topic keeps a record: its retention.ms, as its brokers say (until read, "
            "topics.orders_retention_hours)",
            registry=registry,
        )
        self.commits = Counter("orderbus_commits", "Offset commits made", ["sink"], registry=registry)
        self.commit_failures = Counter(
            "orderbus_commit_failures", "Offset commits that failed and will be retried", ["sink"], registry=registry
        )
        self.auth_failures = Counter(
            "orderbus_auth_failures", "401/403 answers: the sink pauses", ["sink"], registry=registry
        )
        self.state_read_failures = Counter(
            "orderbus_state_read_failures",
            "Reads of the sink's state topic at an assignment that failed: its partitions went on with what this "
            "instance's file knows",
            ["sink"],
            registry=registry,
        )
        self.in_flight = Gauge("orderbus_in_flight_requests", "HTTP requests under way", ["sink"], registry=registry)
        self.buffered = Gauge("orderbus_buffered_records", "Records held in memory", ["sink"], registry=registry)
        self.parked = Gauge("orderbus_parked_keys", "Order keys waiting for a retry", ["sink"], registry=registry)
        self.attempt_seconds = Histogram(
            "orderbus_attempt_duration_seconds",
            "Duration of one HTTP attempt",
            ["sink"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.end_to_end_seconds = Histogram(
            "orderbus_end_to_end_seconds",
            "From the record's Kafka timestamp to the downstream's 2xx",
            ["sink"],
            buckets=E2E_BUCKETS,
            registry=registry,
        )
        self.throttled_seconds = Counter(
            "orderbus_throttled_seconds", "Time the sink was held by Retry-After", ["sink"], registry=registry
        )
        self.retry_after = Gauge(
            "orderbus_last_retry_after_seconds",
            "The last Retry-After a downstream sent, as followed: at most the sink's retry_after_cap",
            ["sink"],
            registry=registry,
        )
        self.rate = Gauge(
            "orderbus_sink_rate_limit",
            "Current requests/s limit of the sink (0: unlimited)",
            ["sink"],
            registry=registry,
        )
        self.circuit = Gauge(
            "orderbus_circuit_state", "Circuit breaker: 0 closed, 1 half-open, 2 open", ["sink"], registry=registry
        )
        self.auth_paused = Gauge(
            "orderbus_auth_paused", "1 while the sink is paused after 401/403", ["sink"], registry=registry
        )
        self.held = Gauge(
            "orderbus_sink_paused",
            "1 while the sink is paused by its settings (sinks.<name>.paused): nothing is sent",
            ["sink"],
            registry=registry,
        )
        self.lag = Gauge(
            "orderbus_consumer_lag",
            "Records not yet finished by the sink, per assigned partition (end offset - the sink's position)",
            ["sink", "partition"],
            registry=registry,
        )
        self.oldest_pending = Gauge(
            "orderbus_oldest_pending_seconds",
            "Age of the oldest record not yet in a terminal state",
            ["sink"],
            registry=registry,
        )
        self.unreadable = Gauge(
            "orderbus_unreadable_partitions",
            "Partitions held because the Kafka client cannot read their next records (see the log)",
            ["sink"],
            registry=registry,
        )
        self.assigned_partitions = Gauge(
            "orderbus_assigned_partitions", "Partitions assigned to the sink's consumer", ["sink"], registry=registry
        )

    def add_sink(self, sink: str) -> None:
        """Create every series of `sink` at zero (see the module docstring)."""
        for outcome in OUTCOMES:
            self.deliveries.labels(sink, outcome)
        for status_class in STATUS_CLASSES:
            self.http_responses.labels(sink, status_class)
        for reason in RETRY_REASONS:
            self.retries.labels(sink, reason)
        for reason in REASONS:
            self.dead_letters.labels(sink, reason)
        for metric in (
            self.records_consumed,
            self.dedup_hits,
            self.expired_records,
            self.commits,
            self.commit_failures,
            self.auth_failures,
            self.state_read_failures,
            self.throttled_seconds,
            self.attempt_seconds,
            self.end_to_end_seconds,
            self.in_flight,
            self.buffered,
            self.parked,
            self.retry_after,
            self.rate,
            self.circuit,
            self.auth_paused,
            self.held,
            self.oldest_pending,
            self.assigned_partitions,
            self.unreadable,
        ):
            metric.labels(sink)

    def hot(self, sink: str) -> HotSeries:
        """The series `sink` touches for every record, looked up once (a `labels` call is a lock and a dict)."""
        return HotSeries(
            attempt_seconds=self.attempt_seconds.labels(sink),
            end_to_end_seconds=self.end_to_end_seconds.labels(sink),
            deliveries={outcome: self.deliveries.labels(sink, outcome) for outcome in OUTCOMES},
            http_responses={
                status_class: self.http_responses.labels(sink, status_class) for status_class in STATUS_CLASSES
            },
            dedup_hits=self.dedup_hits.labels(sink),
        )

    def forget_partition(self, sink: str, partition: int) -> None:
        """Drop the lag series of a partition the sink no longer owns (it would go stale, not to zero)."""
        with contextlib.suppress(KeyError):
            self.lag.remove(sink, str(partition))
