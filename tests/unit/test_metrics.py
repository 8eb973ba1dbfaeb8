"""Metrics as testable state: the ingest's counters and histogram, the build info, the engine's series, and the
names the dashboard and the alert rules use, each through a fresh `CollectorRegistry`."""

from __future__ import annotations

import json
import platform
import random
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from consumers.deadletter import REASONS as DEAD_LETTER_REASONS
from consumers.metrics import OUTCOMES, RETRY_REASONS, STATUS_CLASSES, EngineMetrics
from daemon.app import Listener, build_app
from daemon.ingest import Ingest, IngestConfig
from daemon.ingest_keys import MemoryIngestKeyStore
from daemon.ingest_metrics import (
    INGEST_CODES,
    ConnectionMetrics,
    IngestMetrics,
    package_version,
    register_build_info,
    register_certificate_expiry,
    register_kafka_certificate_expiry,
    register_start_time,
)
from daemon.publisher import BrokerUnavailable, Published
from daemon.ready_metric import register_readiness
from daemon.signature import WebhookVerifier
from topics.codec import EncodedRecord
from topics.samples import sample_submission

Client = TestClient[web.Request, web.Application]
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
JSON = {"Content-Type": "application/json"}
NOW = 1_800_000_000.0

# Every metric the brief lists, by its exposed name (counters with _total, histograms with _seconds).
BRIEF_METRICS = {
    "orderbus_ingest_requests_total": "counter",
    "orderbus_ingest_publish_seconds": "histogram",
    "orderbus_records_consumed_total": "counter",
    "orderbus_deliveries_total": "counter",
    "orderbus_http_responses_total": "counter",
    "orderbus_attempt_duration_seconds": "histogram",
    "orderbus_end_to_end_seconds": "histogram",
    "orderbus_retries_total": "counter",
    "orderbus_in_flight_requests": "gauge",
    "orderbus_buffered_records": "gauge",
    "orderbus_parked_keys": "gauge",
    "orderbus_consumer_lag": "gauge",
    "orderbus_throttled_seconds_total": "counter",
    "orderbus_last_retry_after_seconds": "gauge",
    "orderbus_circuit_state": "gauge",
    "orderbus_dead_letters_total": "counter",
    "orderbus_dedup_hits_total": "counter",
    "orderbus_commits_total": "counter",
    "orderbus_oldest_pending_seconds": "gauge",
    "orderbus_build_info": "gauge",
    "orderbus_start_time_seconds": "gauge",
}
# Label names whose values are bounded (never an order number, an email or a URL).
BOUNDED_LABELS = {
    "sink",
    "outcome",
    "status_class",
    "reason",
    "partition",
    "code",
    "version",
    "python",
    "le",
    "component",
    "state",  # a webhook connection's: busy or idle
    "action",  # what became of a connection at the limit: closed_idle or refused
}


@dataclass
class Publisher:
    """`daemon.publisher.Publisher` whose publish takes `took` seconds on a fake monotonic clock."""

    clock: list[float]
    took: float = 0.25
    down: bool = False
    records: list[EncodedRecord] = field(default_factory=list)

    @property
    def available(self) -> bool:
        return not self.down

    async def publish(self, record: EncodedRecord, *, timeout: float) -> Published:
        if self.down:
            raise BrokerUnavailable("kafka is unreachable")
        self.clock[0] += self.took
        self.records.append(record)
        return Published("orders", 0, len(self.records) - 1)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def ingest_client(registry: CollectorRegistry) -> AsyncIterator[tuple[Client, Publisher]]:
    monotonic = [100.0]
    publisher = Publisher(monotonic)
    ingest = Ingest(
        publisher,
        MemoryIngestKeyStore(),
        IngestConfig(max_body_bytes=4096, publish_timeout=1.0),
        clock=lambda: NOW,
        metrics=IngestMetrics(registry),
        monotonic=lambda: monotonic[0],
    )
    client: Client = TestClient(TestServer(build_app(ingest=ingest, readiness=dict, max_body_bytes=4096)))
    await client.start_server()
    yield client, publisher
    await client.close()


def order_body(seed: int) -> bytes:
    """Without an event_id of its own, so that the idempotency key alone says which request repeats which."""
    return sample_submission(random.Random(seed)).model_dump_json(exclude={"event_id"}).encode()


def requests_with(registry: CollectorRegistry, code: str) -> float | None:
    return registry.get_sample_value("orderbus_ingest_requests_total", {"code": code})


async def test_ingest_counts_every_answer_by_status_code(
    registry: CollectorRegistry, ingest_client: tuple[Client, Publisher]
) -> None:
    client, publisher = ingest_client
    answers = [
        await client.post("/v1/orders", data=order_body(1), headers=JSON),
        await client.post("/v1/orders", data=order_body(2), headers={**JSON, "Idempotency-Key": "k-1"}),
        await client.post("/v1/orders", data=order_body(2), headers={**JSON, "Idempotency-Key": "k-1"}),  # replay
        await client.post("/v1/orders", data=order_body(3), headers={**JSON, "Idempotency-Key": "k-1"}),  # 422
        await client.post("/v1/orders", data=b"{}", headers=JSON),
        await client.post("/v1/orders", data=order_body(4), headers={"Content-Type": "text/plain"}),
        await client.post("/v1/orders", data=b" " * 5000, headers=JSON),
    ]
    publisher.down = True
    answers.append(await client.post("/v1/orders", data=order_body(5), headers=JSON))
    assert [a.status for a in answers] == [202, 202, 202, 422, 400, 415, 413, 503]
    counts = {code: requests_with(registry, code) for code in INGEST_CODES}
    assert counts == {
        "202": 3.0,
        "400": 1.0,
        "401": 0.0,
        "409": 0.0,
        "413": 1.0,
        "415": 1.0,
        "422": 1.0,
        "499": 0.0,
        "500": 0.0,
        "503": 1.0,
    }


async def test_ingest_counts_401_answers(registry: CollectorRegistry) -> None:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    ingest = Ingest(
        Publisher([0.0]),
        MemoryIngestKeyStore(),
        IngestConfig(),
        verifier=WebhookVerifier([secret], clock=lambda: NOW),
        metrics=IngestMetrics(registry),
    )
    async with TestClient(TestServer(build_app(ingest=ingest, readiness=dict))) as client:
        response = await client.post("/v1/orders", data=order_body(1), headers=JSON)
        assert response.status == 401
    assert requests_with(registry, "401") == 1.0


async def test_publish_latency_is_observed_for_acknowledged_publishes_only(
    registry: CollectorRegistry, ingest_client: tuple[Client, Publisher]
) -> None:
    client, publisher = ingest_client
    for seed in range(3):
        assert (await client.post("/v1/orders", data=order_body(seed), headers=JSON)).status == 202
    publisher.down = True  # refused before anything is sent: not a publish
    assert (await client.post("/v1/orders", data=order_body(9), headers=JSON)).status == 503

    def sample(suffix: str, **labels: str) -> float | None:
        return registry.get_sample_value(f"orderbus_ingest_publish_seconds{suffix}", labels)

    assert sample("_count") == 3.0
    assert sample("_sum") == pytest.approx(0.75)
    assert sample("_bucket", le="0.1") == 0.0
    assert sample("_bucket", le="0.25") == 3.0


async def test_an_unexpected_error_is_counted_as_500(registry: CollectorRegistry) -> None:
    class Broken:
        available = True

        async def publish(self, record: EncodedRecord, *, timeout: float) -> Published:
            raise RuntimeError("a bug")

    ingest = Ingest(Broken(), MemoryIngestKeyStore(), IngestConfig(), metrics=IngestMetrics(registry))
    async with TestClient(TestServer(build_app(ingest=ingest, readiness=dict))) as client:
        response = await client.post("/v1/orders", data=order_body(1), headers=JSON)
        assert response.status == 500
    assert requests_with(registry, "500") == 1.0


def test_build_info_names_this_build(registry: CollectorRegistry) -> None:
    register_build_info(registry)
    labels = {"version": package_version(), "python": platform.python_version()}
    assert registry.get_sample_value("orderbus_build_info", labels) == 1.0
    assert package_version() != "unknown", "the package is installed in the venv (pip install -e)"


def test_a_new_sink_has_every_series_at_zero(registry: CollectorRegistry) -> None:
    EngineMetrics(registry).add_sink("crm")
    for outcome in OUTCOMES:
        assert registry.get_sample_value("orderbus_deliveries_total", {"sink": "crm", "outcome": outcome}) == 0.0
    for reason in DEAD_LETTER_REASONS:
        assert registry.get_sample_value("orderbus_dead_letters_total", {"sink": "crm", "reason": reason}) == 0.0
    for reason in RETRY_REASONS:
        assert registry.get_sample_value("orderbus_retries_total", {"sink": "crm", "reason": reason}) == 0.0
    for status_class in STATUS_CLASSES:
        labels = {"sink": "crm", "status_class": status_class}
        assert registry.get_sample_value("orderbus_http_responses_total", labels) == 0.0
    assert registry.get_sample_value("orderbus_attempt_duration_seconds_count", {"sink": "crm"}) == 0.0
    assert registry.get_sample_value("orderbus_circuit_state", {"sink": "crm"}) == 0.0
    assert set(DEAD_LETTER_REASONS) == {"invalid", "rejected", "retries-exhausted", "dead-lettered-predecessor"}


def test_a_partition_that_moved_away_loses_its_lag_series(registry: CollectorRegistry) -> None:
    metrics = EngineMetrics(registry)
    metrics.lag.labels("crm", "3").set(42)
    metrics.forget_partition("crm", 3)
    metrics.forget_partition("crm", 3)  # twice is harmless
    assert registry.get_sample_value("orderbus_consumer_lag", {"sink": "crm", "partition": "3"}) is None


@pytest.fixture
def full_registry() -> CollectorRegistry:
    """Every orderbus metric registered, each with one labelled series."""
    registry = CollectorRegistry()
    EngineMetrics(registry).add_sink("crm")
    IngestMetrics(registry)
    ConnectionMetrics(registry).watch(lambda: {"busy": 1, "idle": 2, "refusing": 0}, 1024)
    register_build_info(registry)
    register_start_time(registry)
    register_readiness(registry, ["ingest", "sink.crm"], dict)
    register_certificate_expiry(registry, lambda: NOW)
    register_kafka_certificate_expiry(registry, lambda: NOW)
    return registry


def exposed(registry: CollectorRegistry) -> dict[str, str]:
    """Sample name → family type, from the text exposition (what Prometheus scrapes)."""
    families = text_string_to_metric_families(generate_latest(registry).decode())
    return {sample.name: family.type for family in families for sample in family.samples}


def test_every_metric_of_the_brief_exists_with_its_type(full_registry: CollectorRegistry) -> None:
    samples = exposed(full_registry)
    for name, kind in BRIEF_METRICS.items():
        if name == "orderbus_consumer_lag":
            continue  # one series per measured partition, none yet; see the partition test above
        probe = f"{name}_count" if kind == "histogram" else name
        assert samples.get(probe) == kind, f"{name}: {samples.get(probe)}"
    assert "orderbus_consumer_lag" in {family.name for family in full_registry.collect()}


def test_names_follow_prometheus_conventions_and_labels_are_bounded(full_registry: CollectorRegistry) -> None:
    for family in full_registry.collect():
        assert family.name.startswith("orderbus_"), family.name
        assert re.fullmatch(r"[a-z_]+", family.name), family.name
        for unit in ("milliseconds", "millis", "_ms", "minutes", "hours"):
            assert unit not in family.name, family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), f"{family.name}: durations in seconds"
        if family.type == "gauge":
            assert not family.name.endswith("_total"), family.name
        for sample in family.samples:
            assert set(sample.labels) <= BOUNDED_LABELS, f"{sample.name}: {sorted(sample.labels)}"


def _metric_names(text: str) -> Iterator[str]:
    yield from re.findall(r"\b(orderbus_[a-z_]+)\b", text)


def test_the_dashboard_and_the_alert_rules_use_only_metrics_that_exist(full_registry: CollectorRegistry) -> None:
    samples = set(exposed(full_registry)) | {"orderbus_consumer_lag"}
    dashboard = json.loads((DEPLOY / "grafana/dashboards/orderbus.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exprs += [variable["definition"] for variable in dashboard["templating"]["list"] if "definition" in variable]
    rules = (DEPLOY / "prometheus/rules.yml").read_text()
    used = {name for expr in exprs for name in _metric_names(expr)} | set(_metric_names(rules))
    unknown = sorted(name for name in used if name not in samples and not name.startswith("orderbus_dlq"))
    assert unknown == []


def test_every_dashboard_panel_queries_the_chosen_datasource() -> None:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/orderbus.json").read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert {"datasource", "job", "sink"} <= variables
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert "$sink" in expr or "$job" in expr, f"{panel['title']}: {expr}"
            if "histogram_quantile" in expr:
                assert re.search(r"sum by \((\w+, )*le\) \(rate\(\w+_bucket\{", expr), expr


async def test_metrics_endpoint_serves_the_registry(registry: CollectorRegistry) -> None:
    register_build_info(registry)
    async with TestClient(TestServer(build_app(ingest=None, readiness=dict, registry=registry))) as client:
        response = await client.get("/metrics")
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain;")
        assert "orderbus_build_info{" in await response.text()


async def test_with_an_admin_listener_the_webhook_port_serves_no_metrics_or_status(registry: CollectorRegistry) -> None:
    # Review (operator): a daemon that takes webhooks from the internet served its counters and its sinks' states
    # to whoever could post an order. With `admin.port` they are served on that listener only.
    ingest = Ingest(Publisher([0.0]), MemoryIngestKeyStore(), IngestConfig(), metrics=IngestMetrics(registry))
    served: dict[Listener, dict[str, int]] = {}
    for serves in get_args(Listener):
        app = build_app(ingest=ingest, readiness=dict, registry=registry, status=dict, serves=serves)
        async with TestClient(TestServer(app)) as client:
            answers = {path: (await client.get(path)).status for path in ("/metrics", "/status", "/openapi.json")}
            answers |= {path: (await client.get(path)).status for path in ("/healthz", "/readyz")}
            answers["POST /v1/orders"] = (await client.post("/v1/orders", data=b"{}")).status
            served[serves] = answers
    webhook = {"/openapi.json": 200, "/healthz": 200, "/readyz": 200, "POST /v1/orders": 415}
    assert served["all"] == {**webhook, "/metrics": 200, "/status": 200}
    assert served["webhook"] == {**webhook, "/metrics": 404, "/status": 404}
    assert served["admin"] == {
        "/metrics": 200,
        "/status": 200,
        "/openapi.json": 404,
        "/healthz": 200,
        "/readyz": 200,
        "POST /v1/orders": 404,
    }


async def test_readyz_answers_for_one_component_when_asked(registry: CollectorRegistry) -> None:
    # Review (operator): a webhook load balancer reading /readyz took an instance out while one of its sinks was
    # still joining its group, though the ingest took orders.
    reasons = {"sink.crm": "joining its consumer group (or kafka unreachable)"}
    app = build_app(ingest=None, readiness=lambda: dict(reasons), components=["ingest", "sink.crm"])
    async with TestClient(TestServer(app)) as client:
        whole = await client.get("/readyz")
        assert (whole.status, (await whole.json())["reasons"]) == (503, reasons)
        ingest = await client.get("/readyz", params={"component": "ingest"})
        assert (ingest.status, (await ingest.json())["reasons"]) == (200, {})
        crm = await client.get("/readyz", params={"component": "sink.crm"})
        assert (crm.status, (await crm.json())["reasons"]) == (503, reasons)
        unknown = await client.get("/readyz", params={"component": "sink.erp"})
        assert unknown.status == 400
        assert "the components are: ingest, sink.crm" in (await unknown.json())["detail"]


def test_the_connection_metrics_read_the_gate_at_each_scrape(registry: CollectorRegistry) -> None:
    counts = {"busy": 3, "idle": 5, "refusing": 0}
    metrics = ConnectionMetrics(registry)
    metrics.watch(lambda: counts, 64)
    metrics.shed("refused")
    counts["busy"] = 7
    samples = {
        (family.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }
    assert samples[("orderbus_ingest_connections", (("state", "busy"),))] == 7
    assert samples[("orderbus_ingest_connections", (("state", "idle"),))] == 5
    assert samples[("orderbus_ingest_max_connections", ())] == 64
    assert samples[("orderbus_ingest_connections_shed", (("action", "refused"),))] == 1
    assert samples[("orderbus_ingest_connections_shed", (("action", "closed_idle"),))] == 0
