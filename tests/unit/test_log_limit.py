"""The log flood limit: at most `burst` lines of one message per window, the rest counted and reported."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from daemon import logs
from daemon.log_limit import RepeatLimit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(msg: str, *args: object, name: str = "daemon.ingest") -> logging.LogRecord:
    return logging.LogRecord(name, logging.INFO, __file__, 1, msg, args, None)


def passed(
    limit: RepeatLimit, records: Iterator[logging.LogRecord] | list[logging.LogRecord]
) -> list[logging.LogRecord]:
    return [r for r in records if limit.filter(r)]


def test_the_first_burst_lines_pass_the_last_of_them_says_so_and_the_rest_are_dropped() -> None:
    limit = RepeatLimit(burst=3, interval=10.0, clock=Clock())
    records = [record("order refused") for _ in range(10)]
    kept = passed(limit, records)
    assert kept == records[:3]
    assert [hasattr(r, "limited") for r in kept] == [False, False, True]
    assert "at most 3 lines of this message per 10 s" in kept[2].__dict__["limited"]


def test_the_next_window_starts_afresh_and_its_first_line_counts_what_was_left_out() -> None:
    clock = Clock()
    limit = RepeatLimit(burst=2, interval=10.0, clock=clock)
    passed(limit, [record("order refused") for _ in range(7)])
    clock.now += 9.9
    assert not limit.filter(record("order refused"))
    clock.now += 0.1
    later = [record("order refused") for _ in range(3)]
    kept = passed(limit, later)
    assert kept == later[:2]
    assert kept[0].__dict__["suppressed"] == 6
    assert not hasattr(kept[1], "suppressed")


def test_a_quiet_message_reports_nothing_and_keeps_its_whole_burst() -> None:
    clock = Clock()
    limit = RepeatLimit(burst=2, interval=10.0, clock=clock)
    passed(limit, [record("order refused")])
    clock.now += 60
    kept = passed(limit, [record("order refused"), record("order refused")])
    assert len(kept) == 2
    assert not any(hasattr(r, "suppressed") for r in kept)


def test_a_message_is_its_logger_and_template_whatever_the_arguments() -> None:
    limit = RepeatLimit(burst=1, interval=10.0, clock=Clock())
    assert limit.filter(record("commit failed for %s", "crm"))
    assert not limit.filter(record("commit failed for %s", "shipping"))
    assert limit.filter(record("commit failed for %s", "crm", name="consumers.engine"))
    assert limit.filter(record("dead-lettered"))


def test_at_most_max_messages_are_tracked_and_the_oldest_is_forgotten_first() -> None:
    limit = RepeatLimit(burst=1, interval=10.0, clock=Clock(), max_messages=2)
    assert passed(limit, [record("a"), record("b")])
    assert not limit.filter(record("a"))
    assert limit.filter(record("c"))  # "a" is forgotten to make room
    assert limit.filter(record("a"))  # ... so it has a fresh window
    assert not limit.filter(record("c"))


@pytest.mark.parametrize(("burst", "interval", "most"), [(0, 10.0, 10), (5, 0.0, 10), (5, 10.0, 0)])
def test_limits_that_would_log_nothing_are_refused(burst: int, interval: float, most: int) -> None:
    with pytest.raises(ValueError, match="log limit"):
        RepeatLimit(burst=burst, interval=interval, max_messages=most)


def test_the_daemons_logging_limits_a_flood_and_lets_every_other_message_through() -> None:
    root = logging.getLogger()
    saved = root.level, root.handlers[:]
    stream = io.StringIO()
    try:
        logs.configure("INFO", stream)
        log = logging.getLogger("daemon.ingest")
        for _ in range(1000):
            log.info("order refused", extra={"status": 401, "problem": "invalid-signature"})
        logging.getLogger("consumers.engine").error("commit failed, will retry", extra={"sink": "crm"})
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    refused = [e for e in events if e["msg"] == "order refused"]
    assert len(refused) == 50
    assert "limited" in refused[-1]
    assert events[-1]["msg"] == "commit failed, will retry"
