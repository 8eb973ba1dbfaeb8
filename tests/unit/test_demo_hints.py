"""The commands `orderbus demo` prints to copy reach this run's daemon, also on ports moved by its options."""

from __future__ import annotations

import asyncio
import io
import time
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from daemon import demo as demo_module
from daemon.demo import _Demo
from daemon.demo_settings import DemoOptions, demo_layout
from daemon.settings import Settings


async def serve_until_stopped(settings: Settings, stop: asyncio.Event, **_: object) -> None:
    """`daemon.lifecycle.serve` without Kafka, sinks or a port."""
    await stop.wait()


async def listening(self: _Demo, daemon: asyncio.Task[None]) -> None:
    """`_Demo._wait_listening` for the fake daemon, which listens nowhere."""


async def demo_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> str:
    """What the demo says as its daemon starts, with --ingest-port 18091 and the settings' variables `env`."""
    monkeypatch.setattr(demo_module, "serve", serve_until_stopped)
    monkeypatch.setattr(_Demo, "_wait_listening", listening)
    options = DemoOptions(kafka_dir=tmp_path / "kafka", log_dir=tmp_path / "logs", ingest_port=18091)
    out = io.StringIO()
    demo = _Demo(demo_layout(options, env=env), options, out, asyncio.Event(), (time.monotonic(), time.time()))
    async with AsyncExitStack() as stack:
        await demo._start_daemon(stack)
    return out.getvalue()


async def test_the_status_line_asks_the_daemon_on_the_ingest_port_the_demo_was_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: with --ingest-port 18091, the README's `orderbus status --config deploy/dev/orderbus.toml`
    # asked port 8080, and the demo printed no command that asked the right one.
    said = (await demo_output(tmp_path, monkeypatch, {})).splitlines()
    assert (
        "orderbus demo: the sinks at a glance, from another terminal: orderbus status --url http://127.0.0.1:18091"
        in said
    )


async def test_with_an_admin_listener_the_demo_points_metrics_and_status_at_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Review: the demo printed the webhook's port for /metrics and `orderbus status`, where both answer 404.
    said = await demo_output(tmp_path, monkeypatch, {"ORDERBUS_ADMIN__PORT": "18092"})
    assert "ingest http://127.0.0.1:18091/v1/orders, metrics http://127.0.0.1:18092/metrics" in said
    assert "orderbus status --url http://127.0.0.1:18092" in said
