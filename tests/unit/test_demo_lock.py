"""`orderbus demo` runs alone on its Kafka data dir: a second one says who holds it and touches nothing."""

from __future__ import annotations

import io
import os
from pathlib import Path

from daemon.demo import _only_demo, run_demo
from daemon.demo_settings import DemoOptions


def test_the_first_demo_holds_the_lock_and_a_second_is_told_its_pid(tmp_path: Path) -> None:
    kafka_dir = tmp_path / "run" / "kafka"
    with _only_demo(kafka_dir) as first:
        assert first is None
        with _only_demo(kafka_dir) as second:
            assert second == str(os.getpid())
    with _only_demo(kafka_dir) as again:  # released with the first
        assert again is None


def test_other_data_dirs_do_not_share_the_lock(tmp_path: Path) -> None:
    with _only_demo(tmp_path / "a" / "kafka") as first, _only_demo(tmp_path / "b" / "kafka") as other:
        assert (first, other) == (None, None)


async def test_a_second_demo_exits_1_before_it_starts_anything(tmp_path: Path) -> None:
    # It found the first demo's broker, failed on the busy ports, and stopped that broker on its way out.
    kafka_dir = tmp_path / "kafka"
    out = io.StringIO()
    options = DemoOptions(kafka_dir=kafka_dir, log_dir=tmp_path / "logs")
    with _only_demo(kafka_dir):
        assert await run_demo(options, out) == 1
    assert f"another demo (pid {os.getpid()}) is running" in out.getvalue()
    assert not (tmp_path / "logs").exists()  # nothing started, not even its log
