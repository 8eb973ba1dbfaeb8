"""Logging as JSON lines: one event per line, with the `extra` fields of the call as keys.

Personal data (names, emails, addresses) is never passed to a log call; events carry ids and order numbers only.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                event[key] = value
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str)


# Libraries whose chatter says nothing an operator needs, at the least level that still does.
QUIETED = {
    "aiokafka": logging.ERROR,  # a warning per retry while the broker is away; our own events say it once
    "aiosqlite": logging.INFO,  # at DEBUG, every statement with its parameters (client-chosen idempotency keys)
}


def configure(level: str, stream: TextIO = sys.stderr) -> None:
    """Send every log event to `stream` as JSON lines at `level`; quiet the libraries in `QUIETED`."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name, least in QUIETED.items():
        logging.getLogger(name).setLevel(max(logging.getLevelName(level), least))
