"""`orderbus demo` stops the broker it launched, and leaves running one it found (``orderbus kafka start``)."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path

import pytest

from daemon import kafka_local
from daemon.demo import _Demo
from daemon.demo_settings import DemoOptions, demo_layout
from daemon.kafka_local import BrokerInfo
from topics.errors import LocalKafkaError


class FakeKafka:
    """`kafka_local.start` and `stop` without a broker: `start` answers `found` (or raises it) once `go` is set."""

    def __init__(self, found: BrokerInfo | LocalKafkaError) -> None:
        self.found = found
        self.go = threading.Event()
        self.go.set()
        self.stopped: list[Path] = []

    def start(self, data_dir: Path, *, port: int = 0) -> BrokerInfo:
        assert self.go.wait(10), "the test never let the start finish"
        if isinstance(self.found, LocalKafkaError):
            raise self.found
        return self.found

    def stop(self, data_dir: Path) -> bool:
        self.stopped.append(data_dir)
        return True


@pytest.fixture
def demo(tmp_path: Path) -> _Demo:
    options = DemoOptions(kafka_dir=tmp_path / "kafka", log_dir=tmp_path / "logs")
    return _Demo(demo_layout(options, env={}), options, io.StringIO(), asyncio.Event(), (time.monotonic(), time.time()))


def broker(data_dir: Path, *, launched: bool) -> BrokerInfo:
    info = BrokerInfo(4321, "127.0.0.1:19092", 19092, 19093, data_dir, "abc", data_dir / "logs" / "server.log")
    return replace(info, launched=launched)


def use(monkeypatch: pytest.MonkeyPatch, fake: FakeKafka) -> FakeKafka:
    monkeypatch.setattr(kafka_local, "start", fake.start)
    monkeypatch.setattr(kafka_local, "stop", fake.stop)
    return fake


def said(demo: _Demo) -> str:
    out = demo.out
    assert isinstance(out, io.StringIO)
    return out.getvalue()


async def test_a_broker_the_demo_launched_is_stopped_with_it(demo: _Demo, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = use(monkeypatch, FakeKafka(broker(demo.options.kafka_dir, launched=True)))
    async with AsyncExitStack() as stack:
        await demo._start_kafka(stack)
    assert fake.stopped == [demo.options.kafka_dir]
    assert "Kafka ready in" in said(demo)


async def test_a_broker_found_running_is_left_running_and_the_demo_says_so(
    demo: _Demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: after `orderbus kafka start`, the demo printed "Kafka ready in 0.0 s" and stopped that broker.
    fake = use(monkeypatch, FakeKafka(broker(demo.options.kafka_dir, launched=False)))
    async with AsyncExitStack() as stack:
        await demo._start_kafka(stack)
    assert fake.stopped == []
    assert "Kafka was already running (pid 4321): the demo uses it and leaves it running" in said(demo)
    stop = f"orderbus kafka stop --data-dir {demo.options.kafka_dir}"
    assert f"Kafka left running, as it was before the demo; `{stop}` stops it" in said(demo)


async def test_a_start_that_failed_stops_nothing(demo: _Demo, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = use(monkeypatch, FakeKafka(LocalKafkaError("the broker (pid 4321) did not answer in time")))
    with pytest.raises(LocalKafkaError, match="did not answer"):
        async with AsyncExitStack() as stack:
            await demo._start_kafka(stack)
    assert fake.stopped == []


@pytest.mark.parametrize("launched", [True, False])
async def test_a_second_ctrl_c_during_the_start_waits_for_it_and_stops_only_a_launched_broker(
    demo: _Demo, monkeypatch: pytest.MonkeyPatch, launched: bool
) -> None:
    fake = use(monkeypatch, FakeKafka(broker(demo.options.kafka_dir, launched=launched)))
    fake.go.clear()
    entered = asyncio.Event()

    async def run() -> None:
        async with AsyncExitStack() as stack:
            entered.set()
            await demo._start_kafka(stack)

    task = asyncio.create_task(run())
    await entered.wait()  # the task waits on the start now
    task.cancel()  # the second Ctrl-C, while the start still runs
    fake.go.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fake.stopped == ([demo.options.kafka_dir] if launched else [])
