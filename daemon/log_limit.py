"""A flood of one log message, limited: at most `burst` lines of it in `interval` seconds, the rest counted.

Why: journald drops a service's messages once it writes more than its rate limit (by default 10,000 messages in
30 s), whatever they say, warnings and errors included, until the interval ends. A flood of one message (a client
sending a thousand badly signed webhooks a second, a downstream refusing every order) would take every other line
with it. Limited per message here, a flood costs only its own repeats:

- the first `burst` lines of a message in a window pass; the last of them carries ``"limited"``, saying that the
  rest of the window's lines of this message are counted, not written;
- the first line of the message in a later window carries ``"suppressed"``: how many were left out before it.

A message is its logger and its template (``record.msg`` before its arguments are filled in), so "order refused"
for every problem code is one message. A flood that stops reports its count with the message's next line; the
metrics count every event regardless. At most `max_messages` messages are tracked at once (the oldest is
forgotten first), so a template that differs per call cannot grow the table without bound.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

BURST = 50
INTERVAL = 10.0
MAX_MESSAGES = 1000


@dataclass(slots=True)
class _Window:
    start: float
    passed: int
    suppressed: int


class RepeatLimit(logging.Filter):
    """A handler's filter: at most `burst` records per message in `interval` seconds (see the module docstring)."""

    def __init__(
        self,
        burst: int = BURST,
        interval: float = INTERVAL,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_messages: int = MAX_MESSAGES,
    ) -> None:
        super().__init__()
        if burst < 1 or interval <= 0 or max_messages < 1:
            raise ValueError(f"log limit: burst {burst}, interval {interval} and max_messages {max_messages}")
        self._burst = burst
        self._interval = interval
        self._clock = clock
        self._max_messages = max_messages
        self._windows: dict[tuple[str, str], _Window] = {}
        self._note = f"at most {burst} lines of this message per {interval:g} s; the rest of these are counted"

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg if isinstance(record.msg, str) else type(record.msg).__name__)
        now = self._clock()
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) >= self._max_messages:
                del self._windows[next(iter(self._windows))]
            window = self._windows[key] = _Window(now, 0, 0)
        elif now - window.start >= self._interval:
            if window.suppressed:
                record.suppressed = window.suppressed
            window.start, window.passed, window.suppressed = now, 0, 0
        if window.passed == self._burst:
            window.suppressed += 1
            return False
        window.passed += 1
        if window.passed == self._burst:
            record.limited = self._note
        return True


__all__ = ["BURST", "INTERVAL", "MAX_MESSAGES", "RepeatLimit"]
