"""``orderbus reconcile``: what was delivered (a real state file), what the system answers (a real HTTP server or a
fake reader), and the verdicts."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from consumers.clock import FakeClock
from consumers.dedup import SqliteDedupStore
from consumers.delivery import Reply, TransportFailure
from consumers.delivery_state import DeliveryState, DeliveryStatus
from consumers.pacing import Pacer
from consumers.work import idempotency_key
from daemon.reconcile import (
    STOP_AFTER,
    Checked,
    Delivered,
    Run,
    RunStopped,
    accounted_for,
    check_all,
    delivered_orders,
    explain,
    pace,
    prepare,
)
from daemon.reconcile import reconcile as reconcile_sink
from daemon.settings import RECONCILE_RATE, Settings
from topics.errors import ConfigError, OrderbusError

T0 = 1.8e9


def state(
    order: str, event: str, status: DeliveryStatus, at: float, kind: str | None = "order.created"
) -> DeliveryState:
    return DeliveryState(
        idempotency_key("accounting", event), event, order, status, 1, 201, at, at, None, None, None, at, kind
    )


async def write_states(path: Path) -> None:
    async with SqliteDedupStore(path) as store:
        store.put(state("SO-1", "e-1", "done", T0))
        store.put(state("SO-1", "e-2", "done", T0 + 50, "order.updated"))  # its latest delivery counts
        store.put_downstream_id("SO-1", "acc-1")
        store.put(state("SO-2", "e-3", "duplicate", T0 + 10))  # the system had it: it should have it still
        store.put(state("SO-3", "e-4", "in_flight", T0 + 20))  # not delivered (yet)
        store.put(state("SO-4", "e-5", "dead", T0 + 30))  # never accepted
        store.put(state("SO-5", "e-6", "done", T0 - 3600))  # before the window
        store.put(state("SO-6", "e-7", "done", T0 + 30))
        store.put(state("SO-6", "e-8", "done", T0 + 40, "order.cancelled"))  # its last event: the cancel
        store.put(state("SO-7", "e-9", "done", T0 + 45, None))  # written before event types were kept
        await store.flush()


def files(directory: Path) -> list[tuple[str, int]]:
    return sorted((file.name, file.stat().st_mtime_ns) for file in directory.iterdir())


async def test_the_orders_delivered_in_the_window_come_from_the_state_file_read_only(tmp_path: Path) -> None:
    path = tmp_path / "dedup-accounting.sqlite"
    await write_states(path)
    before = files(tmp_path)
    assert delivered_orders(path, T0 - 60) == [
        Delivered("SO-2", None, T0 + 10, cancelled=False),
        Delivered("SO-6", None, T0 + 40, cancelled=True),
        Delivered("SO-7", None, T0 + 45, cancelled=None),
        Delivered("SO-1", "acc-1", T0 + 50, cancelled=False),
    ]
    assert files(tmp_path) == before
    assert [d.order_number for d in delivered_orders(path, 0)] == ["SO-5", "SO-2", "SO-6", "SO-7", "SO-1"]
    with pytest.raises(OrderbusError, match=r"no delivery-state file .*dedup-crm\.sqlite"):
        delivered_orders(tmp_path / "dedup-crm.sqlite", 0)


def ok(status: int = 200, retry_after: str | None = None, body: bytes = b'{"id": "x"}') -> Reply:
    return Reply(status, retry_after, body, 0.01)


ORDERS = [Delivered(f"SO-{i}", f"acc-{i}", T0 + i) for i in range(6)]
Answers = Callable[[Delivered, int], Reply | TransportFailure]


def run_checks(
    answers: Answers, *, concurrency: int = 1, orders: list[Delivered] = ORDERS, cap: float = 300.0
) -> tuple[Run, list[tuple[str, float]], RunStopped | None]:
    """check_all over `orders` with `answers(order, nth call for it)` on virtual time: the run, every call as
    (order, seconds since the start), and the stop, if any."""
    clock = FakeClock(start=1000.0, wall_start=T0 + 100)
    calls: list[tuple[str, float]] = []

    async def read(order: Delivered) -> Reply | TransportFailure:
        calls.append((order.order_number, clock.now() - 1000.0))
        await asyncio.sleep(0)
        return answers(order, sum(1 for number, _ in calls if number == order.order_number))

    async def main() -> tuple[Run, RunStopped | None]:
        run = Run(orders, T0)
        pacer = Pacer(None, clock=clock)
        async with clock.autojump():
            try:
                await check_all(
                    run,
                    read,
                    concurrency=concurrency,
                    pacer=pacer,
                    retry_after_cap=cap,
                    sleep=clock.sleep,
                    wall=clock.wall,
                )
            except RunStopped as stopped:
                return run, stopped
        return run, None

    run, stopped = asyncio.run(main())
    return run, calls, stopped


def test_each_answer_is_a_verdict_in_the_orders_order() -> None:
    replies = {
        "SO-0": ok(),
        "SO-1": ok(404),
        "SO-2": ok(410),
        "SO-3": ok(204, body=b""),
        "SO-4": ok(200, body=b"<html>Sign in</html>"),  # a proxy's page, not the order
        "SO-5": ok(301, body=b""),
    }
    run, calls, stopped = run_checks(lambda order, _: replies[order.order_number], concurrency=2)
    assert stopped is None
    assert [(c.order.order_number, c.verdict, c.detail) for c in run.checked] == [
        ("SO-0", "present", "HTTP 200"),
        ("SO-1", "missing", "HTTP 404"),
        ("SO-2", "missing", "HTTP 410"),
        ("SO-3", "unknown", "HTTP 204 without a JSON object: not the order"),
        ("SO-4", "unknown", "HTTP 200 without a JSON object: not the order"),
        ("SO-5", "unknown", "HTTP 301"),
    ]
    assert len(calls) == 6


def test_a_busy_or_failing_system_is_asked_again_as_it_says_then_the_order_is_unknown() -> None:
    def answers(order: Delivered, nth: int) -> Reply | TransportFailure:
        match order.order_number:
            case "SO-0":
                return ok(429, "7") if nth == 1 else ok()  # Retry-After: 7 s, then there
            case "SO-1":
                return TransportFailure("timeout", "no answer within 10 s", 10.0) if nth < 3 else ok(404)
            case "SO-2":
                return ok(500)  # never better
        return ok()

    run, calls, stopped = run_checks(answers)
    assert stopped is None
    assert [c.verdict for c in run.checked[:3]] == ["present", "missing", "unknown"]
    assert run.checked[2].detail == "HTTP 500, 4 tries"
    assert [at for number, at in calls if number == "SO-0"] == [0.0, 7.0]
    assert [at for number, at in calls if number == "SO-1"] == [7.0, 8.0, 10.0]  # after 1 s, then 2 s
    assert [at for number, at in calls if number == "SO-2"] == [10.0, 11.0, 13.0, 17.0]


def test_a_retry_after_holds_every_request_up_to_the_sinks_cap() -> None:
    def answers(order: Delivered, nth: int) -> Reply:
        return ok(503, "120") if (order.order_number, nth) == ("SO-0", 1) else ok()

    run, calls, _ = run_checks(answers, concurrency=3, cap=30.0)
    assert all(c.verdict == "present" for c in run.checked)
    assert sorted(at for _, at in calls)[3:] == [30.0] * 4  # the other workers waited too, 30 s, not 120


def test_refused_credentials_stop_the_run_and_keep_what_was_found() -> None:
    refused = Reply(
        401,
        None,
        b'{"detail":"the token endpoint refused the client (invalid_client)","error":"credentials_refused"}',
        0.01,
    )
    run, _, stopped = run_checks(lambda order, _: refused if order.order_number == "SO-2" else ok())
    assert stopped is not None
    assert stopped.configuration
    assert "the credentials were refused (HTTP 401: " in str(stopped)
    assert "invalid_client" in str(stopped)
    assert "order SO-2" in str(stopped)
    assert [c.order.order_number for c in run.checked] == ["SO-0", "SO-1"]


def test_an_untrusted_certificate_stops_the_run() -> None:
    failure = TransportFailure("connection", "ClientConnectorCertificateError: self-signed", 0.01, True)
    _, calls, stopped = run_checks(lambda order, _: failure)
    assert stopped is not None
    assert stopped.configuration
    assert "TLS certificate is not trusted" in str(stopped)
    assert len(calls) == 1, "not asked again, nor any other order"


def test_no_verdict_for_many_orders_in_a_row_stops_the_run() -> None:
    orders = [Delivered(f"SO-{i}", None, T0 + i) for i in range(30)]
    run, calls, stopped = run_checks(lambda order, _: ok(405, body=b""), orders=orders)
    assert stopped is not None
    assert not stopped.configuration
    assert f"no verdict for {STOP_AFTER} orders in a row, the last: HTTP 405" in str(stopped)
    assert len(run.checked) == len(calls) == STOP_AFTER


def test_no_more_requests_at_once_than_asked_for() -> None:
    clock = FakeClock()
    under_way = peak = 0

    async def read(order: Delivered) -> Reply:
        nonlocal under_way, peak
        under_way += 1
        peak = max(peak, under_way)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        under_way -= 1
        return ok()

    async def main() -> list[Checked]:
        return await check_all(Run(ORDERS * 5, T0), read, concurrency=3, pacer=Pacer(None, clock=clock))

    assert len(asyncio.run(main())) == 30
    assert peak == 3


def test_the_pace_is_never_unlimited() -> None:
    assert pace(None, None) == RECONCILE_RATE
    assert pace(None, 5.0) == 5.0
    assert pace(2.0, 5.0) == 2.0


def test_the_report_lists_what_is_not_present() -> None:
    run = Run([Delivered("SO-1", "acc-1", T0), Delivered("SO-2", None, T0 + 60), Delivered("SO-3", "acc-3", T0 + 120)])
    run.since = T0 - 3600
    run.found = {
        0: Checked(run.orders[0], "present", "HTTP 200"),
        1: Checked(run.orders[1], "missing", "HTTP 404"),
        2: Checked(run.orders[2], "unknown", "HTTP 503, 4 tries"),
    }
    assert explain("accounting", run, " --config my.toml") == [
        "accounting: 3 order(s) delivered from this host since 2027-01-15T07:00:00+00:00;"
        " the system was asked for each",
        "  present  1",
        "  missing  1",
        "  unknown  1",
        "missing (the system answers that it has no such order, and orderbus did not cancel it there):",
        "  SO-2, by number, delivered 2027-01-15T08:01:00+00:00: HTTP 404",
        "unknown (no answer that says; ask again later):",
        "  SO-3, downstream id acc-3, delivered 2027-01-15T08:02:00+00:00: HTTP 503, 4 tries",
        "what orderbus has of an order: orderbus trace ORDER --config my.toml",
        "to send the missing ones again: orderbus reconcile --sink accounting --resend --config my.toml",
    ]
    assert explain("accounting", run, "", resending=True)[-1] == "what orderbus has of an order: orderbus trace ORDER"
    del run.found[2]
    assert explain("accounting", run, "")[0].endswith("; 2 asked")


def test_the_report_counts_cancelled_orders_gone_apart_and_warns_of_rows_without_event_types() -> None:
    gone, old = Delivered("SO-1", "acc-1", T0, cancelled=True), Delivered("SO-2", None, T0 + 60, cancelled=None)
    run = Run([gone, old], since=T0 - 3600)
    run.found = {0: Checked(gone, "removed", "HTTP 404"), 1: Checked(old, "missing", "HTTP 404")}
    assert explain("accounting", run, "")[1:] == [
        "  present  0",
        "  removed  1",
        "  missing  1",
        "  unknown  0",
        "missing (the system answers that it has no such order; lost, or, for those delivered before orderbus kept"
        " event types, removed on a cancel):",
        "  SO-2, by number, delivered 2027-01-15T08:01:00+00:00: HTTP 404",
        "removed: cancelled orders the system deleted, as orderbus's cancel asked",
        "what orderbus has of an order: orderbus trace ORDER",
        "to send the missing ones again: orderbus reconcile --sink accounting --resend",
    ]


def test_a_cancelled_order_gone_is_removed_and_one_still_there_present() -> None:
    orders = [
        Delivered("SO-0", None, T0, cancelled=True),
        Delivered("SO-1", None, T0, cancelled=True),
        Delivered("SO-2", None, T0, cancelled=False),
        Delivered("SO-3", None, T0, cancelled=None),
    ]
    replies = {"SO-0": ok(404), "SO-1": ok(), "SO-2": ok(404), "SO-3": ok(410)}
    run, _, stopped = run_checks(lambda order, _: replies[order.order_number], orders=orders)
    assert stopped is None
    assert [c.verdict for c in run.checked] == ["removed", "present", "missing", "missing"]
    assert accounted_for(run.checked[:2])  # the exit status's 0
    assert not accounted_for(run.checked[:3])


async def test_a_state_file_of_an_earlier_version_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "dedup-accounting.sqlite"
    await write_states(path)
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("ALTER TABLE deliveries DROP COLUMN event_type")
    with pytest.raises(OrderbusError, match=r"earlier orderbus version.*restart it"):
        delivered_orders(path, 0)


# --- against a real HTTP server, with the sink's settings --------------------------------------------------------


@pytest.fixture
def system() -> tuple[web.Application, list[web.Request]]:
    seen: list[web.Request] = []

    async def by_id(request: web.Request) -> web.Response:
        seen.append(request)
        if request.headers.get("Authorization") != "Bearer s3cret":
            return web.json_response({"error": "unauthorized"}, status=401)
        return web.json_response({"id": request.match_info["id"]})

    async def by_number(request: web.Request) -> web.Response:
        seen.append(request)
        return web.json_response({"error": "not_found"}, status=404)

    app = web.Application()
    app.router.add_get("/orders/{id}", by_id)
    app.router.add_get("/orders/by-number/{number}", by_number)
    return app, seen


async def test_reconcile_asks_the_system_by_id_or_number_with_the_sinks_credentials(
    tmp_path: Path, system: tuple[web.Application, list[web.Request]]
) -> None:
    app, seen = system
    await write_states(tmp_path / "dedup-accounting.sqlite")
    async with TestServer(app) as server:
        base = str(server.make_url("")).rstrip("/")

        def settings(token: str, **more: object) -> Settings:
            sink = {"base_url": base, "auth": {"type": "bearer", "token": token}, **more}
            return Settings.model_validate({"state_dir": str(tmp_path), "sinks": {"accounting": sink}})

        run = prepare(settings("s3cret"), "accounting", T0 - 60, now=T0 + 100)
        checked = await reconcile_sink(settings("s3cret"), "accounting", run, concurrency=2, rate=None)
        assert [(c.order.order_number, c.verdict) for c in checked] == [
            ("SO-2", "missing"),
            ("SO-6", "removed"),  # cancelled: gone as the cancel asked
            ("SO-7", "missing"),
            ("SO-1", "present"),
        ]
        assert sorted(request.path for request in seen) == [
            "/orders/acc-1",
            "/orders/by-number/SO-2",
            "/orders/by-number/SO-6",
            "/orders/by-number/SO-7",
        ]
        assert all(request.method == "GET" and "Idempotency-Key" not in request.headers for request in seen)
        assert all(request.headers["User-Agent"].endswith(" reconcile") for request in seen)

        with pytest.raises(RunStopped, match=r"sinks\.accounting: the credentials were refused") as refused:
            await reconcile_sink(settings("wrong"), "accounting", run, concurrency=1, rate=None)
        assert refused.value.configuration
        with pytest.raises(ConfigError, match=r"sinks\.billing: no such sink"):
            prepare(settings("s3cret"), "billing", 0, now=T0)
        # States are kept dedup_retention_hours: the window starts there at the earliest.
        kept = prepare(settings("s3cret", dedup_retention_hours=1), "accounting", 0, now=T0 + 100)
        assert kept.since == T0 + 100 - 3600
        assert [order.order_number for order in kept.orders] == ["SO-2", "SO-6", "SO-7", "SO-1"]
        assert [order.order_number for order in prepare(settings("s3cret"), "accounting", 0, now=T0).orders] == [
            "SO-5",
            "SO-2",
            "SO-6",
            "SO-7",
            "SO-1",
        ]
