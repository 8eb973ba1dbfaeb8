"""Logging as JSON lines: one event per line, with the `extra` fields of the call as keys.

Personal data (names, emails, addresses) is never passed to a log call; events carry ids and order numbers only.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import TextIO

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


# Libraries whose chatter says nothing an operator needs, at the least level that still does.
QUIETED = {
    "aiokafka": logging.ERROR,  # a warning per retry while the broker is away; our own events say it once
    "aiosqlite": logging.INFO,  # at DEBUG, every statement with its parameters (client-chosen idempotency keys)
}


def configure(level: str, stream: TextIO = sys.stderr) -> None:
    """Send every log event to `stream` as JSON lines at `level`; quiet the libraries in `QUIETED`.

    A record no longer collects what no event shows: the caller's file, line and function (a walk up the stack
    per call), the thread and the process (see "Optimization" in the logging HOWTO).
    """
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name, least in QUIETED.items():
        logging.getLogger(name).setLevel(max(logging.getLevelName(level), least))
