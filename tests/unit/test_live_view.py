"""The demo's live view and summary: rendered from a registry with known values, and free of personal data."""

from __future__ import annotations

import io
import random

from prometheus_client import CollectorRegistry

from consumers.metrics import EngineMetrics
from daemon.generator import Answer, GeneratorStats, Mix, Plan
from daemon.live_view import (
    LiveView,
    SinkState,
    SinkSummary,
    Snapshot,
    Summary,
    read_sinks,
    render_frame,
    render_line,
    render_summary,
    snapshot,
    state_of,
)

SINKS = ("crm", "accounting", "shipping")


def registry_with(delivered: dict[str, int], *, lag: dict[str, list[int]] | None = None) -> CollectorRegistry:
    """Every sink's series at zero, then `delivered` deliveries and the lag per partition."""
    registry = CollectorRegistry()
    metrics = EngineMetrics(registry)
    for sink in SINKS:
        metrics.add_sink(sink)
        metrics.assigned_partitions.labels(sink).set(4)
        metrics.deliveries.labels(sink, "delivered").inc(delivered.get(sink, 0))
        for partition, value in enumerate((lag or {}).get(sink, [])):
            metrics.lag.labels(sink, str(partition)).set(value)
    return registry


def test_read_sinks_takes_outcomes_and_gauges_and_sums_the_lag_over_partitions() -> None:
    registry = registry_with({"crm": 120, "accounting": 7}, lag={"crm": [3, 4, 5], "shipping": [1]})
    sinks = read_sinks(registry, SINKS)
    assert sinks["crm"] == SinkState(delivered=120, lag=12, assigned=4)
    assert sinks["accounting"] == SinkState(delivered=7, assigned=4)
    assert sinks["shipping"].lag == 1
    assert read_sinks(registry, ["crm"]).keys() == {"crm"}, "only the sinks asked for"


def test_read_sinks_sees_dead_letters_duplicates_parked_keys_and_states() -> None:
    registry = CollectorRegistry()
    metrics = EngineMetrics(registry)
    metrics.add_sink("crm")
    metrics.deliveries.labels("crm", "dead_lettered").inc(3)
    metrics.deliveries.labels("crm", "duplicate").inc(2)
    metrics.parked.labels("crm").set(5)
    metrics.in_flight.labels("crm").set(6)
    metrics.throttled_seconds.labels("crm").inc(2.5)
    metrics.retries.labels("crm", "throttled").inc(4)
    metrics.retries.labels("crm", "5xx").inc(9)
    metrics.dead_letters.labels("crm", "rejected").inc(8)
    metrics.retry_after.labels("crm").set(2)
    metrics.circuit.labels("crm").set(1)
    metrics.auth_paused.labels("crm").set(1)
    assert read_sinks(registry, ["crm"])["crm"] == SinkState(
        dead_lettered=3,
        duplicates=2,
        retrying=5,
        in_flight=6,
        throttled_retries=4,
        throttled_seconds=2.5,
        retry_after=2,
        circuit=1,
        auth_paused=1,
    )


def stats(created: int, updated: int = 0, cancelled: int = 0, repeats: int = 0) -> GeneratorStats:
    return GeneratorStats(
        requests=created + updated + cancelled + repeats,
        created=created,
        updated=updated,
        cancelled=cancelled,
        repeats=repeats,
        repeats_replayed=repeats,
    )


def test_a_frame_shows_each_sink_with_its_rate_over_the_last_interval() -> None:
    before = snapshot(registry_with({"crm": 100, "accounting": 90, "shipping": 80}), SINKS, stats(100), at=10.0)
    now_registry = registry_with({"crm": 140, "accounting": 110, "shipping": 80}, lag={"shipping": [20, 5]})
    now = snapshot(now_registry, SINKS, stats(130, 8, 2, repeats=3), at=12.0)
    lines = render_frame(before, now, elapsed=75.0)
    assert lines[0] == "orderbus demo · 1:15"
    assert lines[1] == (
        "orders sent 140 (20.0/s): 130 new, 8 updates, 2 cancels; 3 webhook repeats answered from the idempotency store"
    )
    assert lines[3].split() == ["sink", "delivered", "rate/s", "retrying", "dead-lettered", "lag", "state"]
    assert lines[4].split() == ["crm", "140", "20.0", "0", "0", "0", "ok"]
    assert lines[5].split() == ["accounting", "110", "10.0", "0", "0", "0", "ok"]
    assert lines[6].split() == ["shipping", "80", "0.0", "0", "0", "25", "ok"]
    assert render_frame(None, now, elapsed=0.0, status="stopping")[0] == "orderbus demo · 0:00 · stopping"


def test_the_state_column_names_the_most_urgent_thing() -> None:
    calm = SinkState(assigned=3)
    assert state_of(None, calm) == "ok"
    assert state_of(None, SinkState()) == "joining its consumer group"
    assert state_of(None, SinkState(assigned=3, retrying=2)) == "retrying"
    held = SinkState(assigned=3, throttled_seconds=4.0, retry_after=2)
    assert state_of(SinkState(assigned=3, throttled_seconds=2.0), held) == "throttled: Retry-After 2 s"
    assert state_of(held, held) == "ok", "no new throttling in this interval"
    answered_429 = SinkState(assigned=3, throttled_retries=1, retry_after=2)
    assert state_of(SinkState(assigned=3), answered_429) == "throttled: Retry-After 2 s", "as soon as the 429 came"
    assert state_of(None, SinkState(assigned=3, circuit=1)) == "circuit half-open: probing"
    assert state_of(None, SinkState(assigned=3, circuit=2, retrying=1)) == "circuit open: the system keeps failing"
    assert state_of(None, SinkState(circuit=2, auth_paused=1)) == "paused: credentials refused (401/403)"


def test_off_a_terminal_each_frame_is_one_plain_line() -> None:
    out = io.StringIO()
    view = LiveView(out)  # StringIO is no terminal
    view.show(snapshot(registry_with({"crm": 1}), SINKS, stats(2), at=1.0), 3.0)
    view.show(snapshot(registry_with({"crm": 5}), SINKS, stats(6), at=2.0), 4.0, "stopping")
    first, second = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue()
    assert first.startswith("0:03 sent 2 | crm delivered 1 (0.0/s) retrying 0 dead 0 lag 0 ok | accounting")
    assert second.startswith("0:04 sent 6 | crm delivered 5 (4.0/s)")
    assert second.endswith(" | stopping")


def test_on_a_terminal_the_frame_is_redrawn_in_place() -> None:
    out = io.StringIO()
    view = LiveView(out, tty=True)
    view.show(snapshot(registry_with({}), SINKS, stats(0), at=1.0), 1.0)
    first = out.getvalue()
    view.show(snapshot(registry_with({"crm": 3}), SINKS, stats(3), at=2.0), 2.0)
    second = out.getvalue()[len(first) :]
    assert not first.startswith("\x1b[")
    assert first.count("\n") == 7
    assert second.startswith("\x1b[7F"), "back up over the 7 lines drawn"
    assert all(line.endswith("\x1b[K") for line in second.splitlines()), "each line erases what was left of it"
    assert "\x1b[1msink" in second, "the table header in bold"


def test_the_summary_gives_per_sink_outcomes_and_where_to_look() -> None:
    summary = Summary(
        seconds=62.4,
        generator=stats(1000, 150, 50, repeats=20),
        sinks={
            "crm": SinkSummary(1200, 0, 0, 0, 1200, 0, 2.31),
            "accounting": SinkSummary(1170, 30, 1, 0, 1170, 0, 2.4),
            "shipping": SinkSummary(1199, 0, 0, 12, None, None, None),
        },
        hints=["  orderbus dlq list --sink accounting --config deploy/dev/orderbus.toml"],
    )
    lines = render_summary(summary)
    assert lines[0] == "orderbus demo: stopped after 1:02."
    assert lines[1] == "  orders sent: 1000 new, 150 updates, 50 cancels = 1200 events (1220 requests)"
    assert lines[2] == (
        "  webhook repeats: 20, 20 of them answered from the idempotency store, nothing published again"
    )
    assert lines[3].split()[:3] == ["sink", "delivered", "applied"]
    assert lines[4].split() == ["crm", "1200", "1200", "0", "0", "0", "2.3", "s"]
    assert lines[5].split() == ["accounting", "1170", "1170", "30", "1", "0", "2.4", "s"]
    assert lines[6].split() == ["shipping", "1199", "?", "0", "12", "?", "?"], "unknown, not zero"
    assert "duplicates avoided: 12 requests repeated after a lost answer" in lines[7]
    assert "1 records found already applied" in lines[8]
    assert lines[-1] == "  orderbus dlq list --sink accounting --config deploy/dev/orderbus.toml"


def test_nothing_of_an_orders_content_reaches_the_terminal() -> None:
    plan = Plan(random.Random(8), Mix(update=0.3, cancel=0.1, repeat=0.05))
    personal: set[str] = set()
    for _ in range(300):
        message = plan.next()
        order = message.order
        customer, address = order.customer, order.shipping_address
        personal |= {customer.name, customer.email, address.line1, address.city, order.order_number}
        personal |= {value for value in (customer.phone, customer.vat_id, customer.company) if value}
        plan.answered(message, Answer(202, replayed=message.kind == "repeat"))
    registry = registry_with({"crm": 250, "accounting": 240, "shipping": 249}, lag={"crm": [2, 1]})
    before = snapshot(registry_with({}), SINKS, GeneratorStats(), at=0.0)
    now = snapshot(registry, SINKS, plan.stats, at=1.0)
    rows = {name: SinkSummary(250, 1, 0, 3, 250, 0, 2.0) for name in SINKS}
    shown = "\n".join(
        [
            *render_frame(before, now, 12.0, "stopping"),
            render_line(before, now, 12.0),
            *render_summary(Summary(12.0, plan.stats, rows)),
        ]
    )
    assert plan.stats.accepted > 250
    leaked = sorted(value for value in personal if value in shown)
    assert not leaked, leaked


def test_a_snapshot_copies_the_generators_counts() -> None:
    counts = stats(5)
    taken: Snapshot = snapshot(registry_with({}), SINKS, counts, at=0.0)
    counts.created += 1
    assert taken.generator.created == 5
