"""``orderbus_ready{component}``: /readyz's verdict per component, read at each scrape."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from daemon.ready_metric import register_readiness


def test_each_component_is_one_when_ready_and_zero_while_a_reason_is_named() -> None:
    asked: list[int] = []
    reasons: dict[str, str] = {}

    def readiness() -> dict[str, str]:
        asked.append(1)
        return reasons

    registry = CollectorRegistry()
    register_readiness(registry, ["ingest", "sink.crm"], readiness)
    assert asked == [], "registering does not run the readiness check"
    assert registry.get_sample_value("orderbus_ready", {"component": "ingest"}) == 1.0
    reasons["sink.crm"] = "kafka is unreachable: no answer to the lag measurement for 40 s"
    assert registry.get_sample_value("orderbus_ready", {"component": "sink.crm"}) == 0.0
    assert registry.get_sample_value("orderbus_ready", {"component": "ingest"}) == 1.0
    text = generate_latest(registry).decode()
    assert "# TYPE orderbus_ready gauge" in text
    assert "40 s" not in text, "the reason stays in /readyz: a label of free text would be unbounded"


def test_a_readiness_check_that_fails_reads_not_ready_and_the_rest_of_the_scrape_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken() -> dict[str, str]:
        raise RuntimeError("a bug")

    registry = CollectorRegistry()
    Counter("orderbus_other", "another metric", registry=registry).inc()
    register_readiness(registry, ["ingest"], broken)
    for _ in range(3):
        text = generate_latest(registry).decode()
    assert 'orderbus_ready{component="ingest"} 0.0' in text
    assert "orderbus_other_total 1.0" in text
    assert [r.getMessage() for r in caplog.records] == ["readiness could not be computed for orderbus_ready"]
