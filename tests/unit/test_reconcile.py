"""``orderbus reconcile``: what was delivered (a real state file), what the system answers (a real HTTP server or a
fake reader), and the verdicts."""

from __future__ import annotations

import asyncio
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
from daemon.reconcile import Checked, CredentialsRefusedError, Delivered, check_all, delivered_orders, explain
from daemon.reconcile import reconcile as reconcile_sink
from daemon.settings import Settings
from topics.errors import ConfigError, OrderbusError

T0 = 1.8e9


def state(order: str, event: str, status: DeliveryStatus, at: float) -> DeliveryState:
    return DeliveryState(
        idempotency_key("accounting", event), event, order, status, 1, 201, at, at, None, None, None, at
    )


async def write_states(path: Path) -> None:
    async with SqliteDedupStore(path) as store:
        store.put(state("SO-1", "e-1", "done", T0))
        store.put(state("SO-1", "e-2", "done", T0 + 50))  # its latest delivery counts
        store.put_downstream_id("SO-1", "acc-1")
        store.put(state("SO-2", "e-3", "duplicate", T0 + 10))  # the system had it: it should have it still
        store.put(state("SO-3", "e-4", "in_flight", T0 + 20))  # not delivered (yet)
        store.put(state("SO-4", "e-5", "dead", T0 + 30))  # never accepted
        store.put(state("SO-5", "e-6", "done", T0 - 3600))  # before the window
        await store.flush()


def files(directory: Path) -> list[tuple[str, int]]:
    return sorted((file.name, file.stat().st_mtime_ns) for file in directory.iterdir())


async def test_the_orders_delivered_in_the_window_come_from_the_state_file_read_only(tmp_path: Path) -> None:
    path = tmp_path / "dedup-accounting.sqlite"
    await write_states(path)
    before = files(tmp_path)
    assert delivered_orders(path, T0 - 60) == [
        Delivered("SO-2", None, T0 + 10),
        Delivered("SO-1", "acc-1", T0 + 50),
    ]
    assert files(tmp_path) == before
    assert [d.order_number for d in delivered_orders(path, 0)] == ["SO-5", "SO-2", "SO-1"]
    with pytest.raises(OrderbusError, match=r"no delivery-state file .*dedup-crm\.sqlite"):
        delivered_orders(tmp_path / "dedup-crm.sqlite", 0)


def ok(status: int = 200, retry_after: str | None = None) -> Reply:
    return Reply(status, retry_after, b"{}", 0.01)


ORDERS = [Delivered(f"SO-{i}", f"acc-{i}", T0 + i) for i in range(6)]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=1000.0, wall_start=T0 + 100)


def run(
    clock: FakeClock, answers: Callable[[Delivered, int], Reply | TransportFailure], concurrency: int = 2
) -> tuple[list[Checked], list[float], dict[str, int]]:
    """check_all over ORDERS with `answers(order, nth call for it)`; the results, the sleeps, the calls per order."""
    slept: list[float] = []
    calls: dict[str, int] = {}

    async def read(order: Delivered) -> Reply | TransportFailure:
        calls[order.order_number] = calls.get(order.order_number, 0) + 1
        await asyncio.sleep(0)
        return answers(order, calls[order.order_number])

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def main() -> list[Checked]:
        pacer = Pacer(None, clock=clock)
        return await check_all(ORDERS, read, concurrency=concurrency, pacer=pacer, sleep=sleep, wall=clock.wall)

    return asyncio.run(main()), slept, calls


def test_each_answer_is_a_verdict_in_the_orders_order(clock: FakeClock) -> None:
    statuses = {"SO-0": 200, "SO-1": 404, "SO-2": 410, "SO-3": 204, "SO-4": 400, "SO-5": 301}
    checked, slept, calls = run(clock, lambda order, _: ok(statuses[order.order_number]))
    assert [(c.order.order_number, c.verdict, c.detail) for c in checked] == [
        ("SO-0", "present", "HTTP 200"),
        ("SO-1", "missing", "HTTP 404"),
        ("SO-2", "missing", "HTTP 410"),
        ("SO-3", "present", "HTTP 204"),
        ("SO-4", "unknown", "HTTP 400"),
        ("SO-5", "unknown", "HTTP 301"),
    ]
    assert slept == []
    assert set(calls.values()) == {1}


def test_a_busy_or_failing_system_is_asked_again_as_it_says_then_the_order_is_unknown(clock: FakeClock) -> None:
    def answers(order: Delivered, nth: int) -> Reply | TransportFailure:
        match order.order_number:
            case "SO-0":
                return ok(429, "7") if nth == 1 else ok()  # Retry-After: 7 s, then there
            case "SO-1":
                return TransportFailure("timeout", "no answer within 10 s", 10.0) if nth < 3 else ok(404)
            case "SO-2":
                return ok(503)  # never better
        return ok()

    checked, slept, calls = run(clock, answers, concurrency=1)
    assert [c.verdict for c in checked[:3]] == ["present", "missing", "unknown"]
    assert checked[2].detail == "HTTP 503, 4 tries"
    assert (calls["SO-0"], calls["SO-1"], calls["SO-2"]) == (2, 3, 4)
    assert slept == [7.0, 1.0, 2.0, 1.0, 2.0, 4.0]


def test_refused_credentials_stop_the_run(clock: FakeClock) -> None:
    with pytest.raises(CredentialsRefusedError, match=r"refused the credentials \(HTTP 401\) for order SO-"):
        run(clock, lambda order, _: ok(401 if order.order_number == "SO-1" else 200), concurrency=1)


def test_no_more_requests_at_once_than_asked_for(clock: FakeClock) -> None:
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
        return await check_all(ORDERS * 5, read, concurrency=3, pacer=Pacer(None, clock=clock))

    assert len(asyncio.run(main())) == 30
    assert peak == 3


def test_the_report_lists_what_is_not_present() -> None:
    checked = [
        Checked(Delivered("SO-1", "acc-1", T0), "present", "HTTP 200"),
        Checked(Delivered("SO-2", None, T0 + 60), "missing", "HTTP 404"),
        Checked(Delivered("SO-3", "acc-3", T0 + 120), "unknown", "HTTP 503, 4 tries"),
    ]
    assert explain("accounting", T0 - 3600, checked, " --config my.toml") == [
        "accounting: 3 order(s) delivered from this host since 2027-01-15T07:00:00+00:00;"
        " the system was asked for each",
        "  present  1",
        "  missing  1",
        "  unknown  1",
        "missing (the system answers that it has no such order; lost, or removed on a cancel):",
        "  SO-2, by number, delivered 2027-01-15T08:01:00+00:00: HTTP 404",
        "unknown (no answer that says; ask again later):",
        "  SO-3, downstream id acc-3, delivered 2027-01-15T08:02:00+00:00: HTTP 503, 4 tries",
        "what orderbus has of an order: orderbus trace ORDER --config my.toml",
    ]


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

        def settings(token: str) -> Settings:
            sink = {"base_url": base, "auth": {"type": "bearer", "token": token}}
            return Settings.model_validate({"state_dir": str(tmp_path), "sinks": {"accounting": sink}})

        checked = await reconcile_sink(settings("s3cret"), "accounting", since=T0 - 60, concurrency=2)
        assert [(c.order.order_number, c.verdict) for c in checked] == [("SO-2", "missing"), ("SO-1", "present")]
        assert sorted(request.path for request in seen) == ["/orders/acc-1", "/orders/by-number/SO-2"]
        assert all(request.method == "GET" and "Idempotency-Key" not in request.headers for request in seen)

        with pytest.raises(CredentialsRefusedError):
            await reconcile_sink(settings("wrong"), "accounting", since=T0 + 20, concurrency=1)
        with pytest.raises(ConfigError, match=r"sinks\.billing: no such sink"):
            await reconcile_sink(settings("s3cret"), "billing", since=0, concurrency=1)
