"""Logging as JSON lines: one event per line, with the `extra` fields of the call as keys.

Personal data (names, emails, addresses) is never passed to a log call; events carry ids and order numbers only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import time
from typing import TextIO

from aiohttp.http_exceptions import HttpProcessingError

from daemon.log_limit import RepeatLimit

_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
# json.dumps(event, default=str) builds an encoder per call; this one is the same, built once.
_ENCODE = json.JSONEncoder(default=str).encode


class JsonFormatter(logging.Formatter):
    """One JSON object per event: ``ts`` (UTC, milliseconds), ``level``, ``logger``, ``msg``, the `extra` fields of
    the call and, with an exception, ``exc``.

    It runs once per webhook answer, so it avoids the generic work: the timestamp's date and time are formatted
    once per second, and the encoder is built once.
    """

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._second_text = ""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, object] = {
            "ts": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                event[key] = value
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return _ENCODE(event)

    def _timestamp(self, created: float) -> str:
        """``datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")``, with the same rounding."""
        fraction, whole = math.modf(created)
        micros = round(fraction * 1e6)  # to the microsecond, half to even, as datetime.fromtimestamp does
        second = int(whole)
        if micros >= 1_000_000:
            second, micros = second + 1, micros - 1_000_000
        elif micros < 0:  # before 1970
            second, micros = second - 1, micros + 1_000_000
        if second != self._second:
            self._second, self._second_text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{micros // 1000:03d}+00:00"


class TickFlushingHandler(logging.StreamHandler[TextIO]):
    """A stream handler that flushes once per turn of the event loop, not after every line.

    The ingest logs a line per answered webhook; a flush is a write(2) each, ~5 us of the request's ~200 (py-spy,
    in-process harness). Lines at INFO and below, written on a running loop's thread, are flushed by a callback
    at the end of the loop's current turn, together; WARNING and above, and every line written outside a loop,
    are flushed at once, so the last words before a watchdog kill (a blocked loop, whose callbacks never run)
    reach the journal. A line can only be lost with the process killed within the turn it was written in.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._flush_due_on: asyncio.AbstractEventLoop | None = None  # the loop a flush is scheduled on

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
        except RecursionError:  # as StreamHandler.emit
            raise
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._flush_due_on is not loop:  # none due yet, or due on a loop that is gone
            self._flush_due_on = loop
            loop.call_soon(self._flush_turn)

    def _flush_turn(self) -> None:
        self._flush_due_on = None
        self.flush()


# Libraries whose chatter says nothing an operator needs, at the least level that still does.
QUIETED = {
    "aiokafka": logging.ERROR,  # a warning per retry while the broker is away; our own events say it once
    "aiosqlite": logging.INFO,  # at DEBUG, every statement with its parameters (client-chosen idempotency keys)
}


# aiokafka's loggers that say, at ERROR, every retry to reach a broker that is away (every 5 s of an outage: 17,000
# lines a day), every failed fetch of each sink's consumer and every failed coordinator lookup (~200 lines in a
# 14 s outage with three sinks). Once per message in `RECONNECT_INTERVAL`, the next one with the count of those left
# out: orderbus's own events, /readyz and `orderbus_ready` say the outage already. By the names aiokafka's modules
# log under: aiokafka.client logs as "aiokafka", and a filter on a logger sees only what is logged through it, not
# what its children pass up (tests/unit/test_logs.py logs through the modules' own loggers).
RECONNECTING = (
    "aiokafka",
    "aiokafka.conn",
    "aiokafka.consumer.fetcher",
    "aiokafka.consumer.group_coordinator",
    "aiokafka.producer.sender",
)
RECONNECT_INTERVAL = 300.0


class MalformedRequests(logging.Filter):
    """aiohttp's server logs a request it cannot parse (a body longer than its Content-Length on a closing
    connection, a broken chunked encoding) at ERROR with a traceback whose message quotes the bytes it choked on:
    a webhook's order, names and addresses included. Such a record becomes one INFO line naming the error's kind;
    the sender got aiohttp's 400. Everything else the server logs (a handler's bug, a 500) passes as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.msg = "malformed HTTP request refused (%d): %s"
            record.args = (error.code or 400, type(error).__name__)
            if record.levelno > logging.INFO:  # aiohttp's DEBUG for a first request that is no HTTP stays DEBUG
                record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
            return logging.getLogger(record.name).isEnabledFor(record.levelno)
        return True


def configure(level: str, stream: TextIO = sys.stderr, limit: RepeatLimit | None = None) -> None:
    """Send every log event to `stream` as JSON lines at `level`; quiet the libraries in `QUIETED`.

    `limit` (default: `RepeatLimit()`, 50 lines of one message per 10 s) keeps a flood of one message from
    crossing journald's rate limit, which would drop every other line too (`daemon.log_limit`).

    A record no longer collects what no event shows: the caller's file, line and function (a walk up the stack
    per call), the thread and the process (see "Optimization" in the logging HOWTO).
    """
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = TickFlushingHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(limit if limit is not None else RepeatLimit())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name, least in QUIETED.items():
        logging.getLogger(name).setLevel(max(logging.getLevelName(level), least))
    for name in RECONNECTING:
        logging.getLogger(name).filters[:] = [RepeatLimit(burst=1, interval=RECONNECT_INTERVAL)]
    logging.getLogger("aiohttp.server").filters[:] = [MalformedRequests()]
