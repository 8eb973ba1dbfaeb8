"""SIGHUP: the log level and the sinks' rate limits change live; anything else is reported as needing a restart."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from consumers.engine import SinkEngine
from daemon.lifecycle import _notify_ready, _reload_on_request, _restart_needed
from daemon.settings import Settings, load_settings
from topics.errors import ConfigError


class RecordingEngine:
    def __init__(self) -> None:
        self.rates: list[float | None] = []
        self.skips: list[Mapping[tuple[str, int], Sequence[tuple[int, int]]]] = []
        self.held: list[bool] = []

    def set_rate(self, rate: float | None) -> None:
        self.rates.append(rate)

    def skip_unreadable(self, skips: Mapping[tuple[str, int], Sequence[tuple[int, int]]]) -> None:
        self.skips.append(skips)

    def set_held(self, held: bool) -> None:
        self.held.append(held)


def settings(**env: str) -> Settings:
    return load_settings(None, env={"ORDERBUS_SINKS__CRM__ENABLED": "true", **env})


def reloading(
    requested: asyncio.Event, loads: list[Settings | Exception], engine: RecordingEngine
) -> asyncio.Task[None]:
    """The reload task over one sink `engine`, each reload taking the next of `loads` (raised if an exception)."""

    def load() -> Settings:
        item = loads.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    engines = cast(dict[str, SinkEngine], {"crm": cast(Any, engine)})
    return asyncio.create_task(_reload_on_request(requested, load, settings(), engines))


async def test_sighup_applies_rate_and_log_level_and_names_what_needs_a_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = RecordingEngine()
    loads: list[Settings | Exception] = [
        settings(
            ORDERBUS_SINKS__CRM__RATE="5",
            ORDERBUS_LOG_LEVEL="DEBUG",
            ORDERBUS_SINKS__CRM__MAX_IN_FLIGHT="8",
            ORDERBUS_SINKS__CRM__SKIP_UNREADABLE='["orders:2@40", "orders:2@50-52"]',
            ORDERBUS_SINKS__CRM__PAUSED="true",
        ),
        ConfigError("invalid settings: sinks.crm.rate: must be > 0"),
    ]

    requested = asyncio.Event()
    root = logging.getLogger()
    level = root.level
    task = reloading(requested, loads, engine)
    try:
        with caplog.at_level(logging.INFO, logger="daemon.lifecycle"):
            requested.set()
            for _ in range(10):
                await asyncio.sleep(0)
            assert engine.rates == [5.0]
            assert engine.skips == [{("orders", 2): [(40, 40), (50, 52)]}]
            assert engine.held == [True]
            assert root.level == logging.DEBUG
            assert any(getattr(r, "settings", None) == ["sinks.crm.max_in_flight"] for r in caplog.records)
            [reloaded] = [r for r in caplog.records if r.getMessage() == "settings reloaded"]
            applied = ["log_level", "sinks.crm.paused", "sinks.crm.rate", "sinks.crm.skip_unreadable"]
            assert getattr(reloaded, "applied", None) == applied
            requested.set()
            for _ in range(10):
                await asyncio.sleep(0)
            assert engine.rates == [5.0], "a bad file changes nothing"
            assert any("reload refused" in r.getMessage() for r in caplog.records)
    finally:
        task.cancel()
        root.setLevel(level)


async def test_the_reloaded_line_names_the_live_keys_changed_since_the_last_reload(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # It named the log level alone: an operator who raised a rate saw no sign that it took.
    engine = RecordingEngine()
    faster = settings(ORDERBUS_SINKS__CRM__RATE="9", ORDERBUS_SINKS__ACCOUNTING__RATE="3")  # accounting: not enabled
    await reload_each([faster, faster, settings()], engine, caplog)
    reloaded = [getattr(r, "applied", None) for r in caplog.records if r.getMessage() == "settings reloaded"]
    assert reloaded == [["sinks.crm.rate"], [], ["sinks.crm.rate"]]
    assert engine.rates == [9.0, 9.0, None]


async def test_a_reload_that_raises_the_level_still_says_what_it_applied(caplog: pytest.LogCaptureFixture) -> None:
    # Review (operator): log_level = "WARNING" and a sink paused in one reload left no line at all.
    engine = RecordingEngine()
    requested = asyncio.Event()
    root = logging.getLogger()
    level = root.level
    task = reloading(requested, [settings(ORDERBUS_LOG_LEVEL="WARNING", ORDERBUS_SINKS__CRM__PAUSED="true")], engine)
    try:
        caplog.set_level(logging.INFO)  # the root's, as the daemon's level before the reload
        requested.set()
        for _ in range(10):
            await asyncio.sleep(0)
        assert root.level == logging.WARNING
    finally:
        task.cancel()
        root.setLevel(level)
    [reloaded] = [r for r in caplog.records if r.getMessage() == "settings reloaded"]
    assert getattr(reloaded, "applied", None) == ["log_level", "sinks.crm.paused"]


def test_restart_needed_lists_changed_keys_except_the_live_ones() -> None:
    old = settings()
    new = settings(
        ORDERBUS_SINKS__CRM__RATE="3",
        ORDERBUS_LOG_LEVEL="ERROR",
        ORDERBUS_INGEST__PORT="9999",
        ORDERBUS_SINKS__CRM__SKIP_UNREADABLE='["orders:2@40"]',
        ORDERBUS_SINKS__CRM__PAUSED="true",
    )
    assert _restart_needed(old, new) == ["ingest.port"]
    assert _restart_needed(old, old) == []


def test_a_rotated_secret_is_named_as_needing_a_restart_without_its_value(tmp_path: Path) -> None:
    # Every secret dumps as ********** in JSON: a rotated token looked unchanged, and the old one stayed in use.
    token, webhook = tmp_path / "crm-token", tmp_path / "webhook-secret"
    env = {
        "ORDERBUS_SINKS__CRM__AUTH__TYPE": "bearer",
        "ORDERBUS_SINKS__CRM__AUTH__TOKEN_FILE": str(token),
        "ORDERBUS_INGEST__WEBHOOK_SECRETS_FILE": str(webhook),
    }
    token.write_text("old-t0ken\n")
    webhook.write_text("whsec_b2xkLXNlY3JldC1vZi10aGUtc2hvcC0x\n")
    old = settings(**env)
    token.write_text("new-t0ken\n")
    webhook.write_text("whsec_b2xkLXNlY3JldC1vZi10aGUtc2hvcC0x\nwhsec_bmV3LXNlY3JldC1vZi10aGUtc2hvcC0y\n")
    changed = _restart_needed(old, settings(**env))
    assert changed == ["ingest.webhook_secrets", "sinks.crm.auth"]
    assert "t0ken" not in repr(changed)


async def test_a_reload_that_fails_unexpectedly_is_logged_and_the_next_one_still_heard(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Review (operator): an error other than ConfigError ended the reload task in silence; later SIGHUPs did nothing.
    engine = RecordingEngine()
    await reload_each([RuntimeError("a bug"), settings(ORDERBUS_SINKS__CRM__RATE="7")], engine, caplog)
    assert any(r.getMessage() == "reload failed, the running settings stay" and r.exc_info for r in caplog.records)
    assert engine.rates == [7.0]


async def reload_each(
    loads: list[Settings | Exception], engine: RecordingEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """One SIGHUP per item of `loads` (the reload task's lines captured at INFO), each given time to be handled."""
    requested = asyncio.Event()
    task = reloading(requested, loads, engine)
    try:
        with caplog.at_level(logging.INFO, logger="daemon.lifecycle"):
            for _ in range(len(loads)):
                requested.set()
                for _ in range(10):
                    await asyncio.sleep(0)
    finally:
        task.cancel()


class RecordingNotifier:
    def __init__(self) -> None:
        self.said: list[tuple[str, str | None]] = []

    def ready(self, status: str | None = None) -> bool:
        self.said.append(("READY", status))
        return True

    def status(self, text: str) -> bool:
        self.said.append(("STATUS", text))
        return True


def draining(stop: asyncio.Event, reasons: dict[str, str]) -> None:
    """The daemon stops: the lag measurements stop with the sinks, and would soon read as Kafka unreachable."""
    stop.set()
    reasons["sink.crm"] = "kafka is unreachable"


async def test_the_ingest_alone_is_ready_while_kafka_is_away_and_the_status_line_follows_the_state(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Review (operator): READY=1 waited for Kafka, so systemd killed the ingest at TimeoutStartSec, for ever; and the
    # status line said "ready" from the start on, through any outage.
    notifier = RecordingNotifier()
    publisher = cast(Any, type("Away", (), {"available": False})())
    reasons = {"ingest": "kafka is unreachable: the ingest cannot publish"}
    degraded: dict[str, str] = {}
    stop = asyncio.Event()
    broken = False

    def state() -> tuple[dict[str, str], dict[str, str]]:
        if broken:
            raise RuntimeError("a bug")
        return reasons, degraded

    def fail() -> None:
        nonlocal broken
        broken = True

    steps: list[Callable[[], object]] = [
        lambda: reasons.clear(),
        lambda: None,  # unchanged: nothing sent
        lambda: degraded.update({"sink.crm": "circuit open"}),
        fail,  # logged, the line stays, the task goes on
        lambda: None,
        lambda: draining(stop, reasons),
    ]

    async def sleep(_: float) -> None:
        steps.pop(0)()

    await _notify_ready(cast(Any, notifier), publisher, {}, state, stop, sleep=sleep)
    assert steps == []
    assert [r.getMessage() for r in caplog.records if r.exc_info] == ["the status line for systemd could not be made"]
    assert notifier.said == [
        ("READY", "NOT READY ingest: kafka is unreachable: the ingest cannot publish (ingest on, sinks none)"),
        ("STATUS", "ready: ingest on, sinks none"),
        ("STATUS", "DEGRADED sink.crm: circuit open (ingest on, sinks none)"),
    ]


async def test_with_sinks_ready_waits_for_kafka_they_cannot_start_without_it() -> None:
    notifier = RecordingNotifier()
    publisher = cast(Any, type("Away", (), {"available": False})())
    sink = cast(Any, type("Joined", (), {"joined": True})())
    polls: list[float] = []

    async def sleep(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 3:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await _notify_ready(
            cast(Any, notifier), publisher, {"crm": sink}, lambda: ({}, {}), asyncio.Event(), sleep=sleep
        )
    assert notifier.said == []
