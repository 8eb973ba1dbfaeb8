"""A circuit breaker per sink: stop calling a downstream that keeps failing, and probe it now and then.

States and moves::

    closed ──(>= min_calls seen, failure ratio >= failure_ratio in the last `window` calls)──▶ open
    open ──(open_for seconds passed; seen on the next `state`/`allow()`)──▶ half_open
    half_open ──(`probes` probes succeeded)──▶ closed   (window cleared, open_for back to its start)
    half_open ──(a probe failed)──▶ open                 (open_for doubled, up to max_open_for)

What counts as a failure is the caller's decision. The engine records as failures only the outcomes that say
"the downstream is unwell": retryable ones (5xx, 408/425/429, timeouts, connection errors). A 400 is the
downstream working correctly on bad data, so it is recorded as a success (or not at all) and never opens the
circuit. A 429 or 503 with a Retry-After is not recorded either: the server set the pace and the sink's pacer
holds every request until then (a rate limiter answers a whole burst so; counted, it would open the circuit).

`allow()` claims a probe slot in half_open; the caller must answer each allowed call with `record(...,
probe=True)`, or with `release()` when the call ended without an outcome (cancelled), or the slot stays taken.
Outcomes that arrive while open (calls started before it opened) are ignored, and so are outcomes in half_open
of calls that are not probes: a call sent before the circuit opened and answered after its pause (a
`request_timeout` longer than `open_for`) says nothing of the system now, and must not decide for the probe.
The circuit reads the clock and never sleeps; it is not thread-safe (one event loop).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Literal

from consumers.clock import Clock
from topics.errors import ConfigError

__all__ = ["Circuit", "CircuitState"]

CircuitState = Literal["closed", "open", "half_open"]


class Circuit:
    """The breaker of one sink. `on_change(old, new)` is called after every state change (logs, metrics)."""

    def __init__(
        self,
        clock: Clock,
        *,
        window: int = 20,
        min_calls: int = 10,
        failure_ratio: float = 0.5,
        open_for: float = 30.0,
        max_open_for: float = 300.0,
        probes: int = 1,
        on_change: Callable[[CircuitState, CircuitState], None] | None = None,
    ) -> None:
        if window < 1:
            raise ConfigError(f"circuit window must be >= 1 calls, got {window}")
        if not 1 <= min_calls <= window:
            raise ConfigError(f"circuit min_calls must be between 1 and the window ({window}), got {min_calls}")
        if not 0 < failure_ratio <= 1:
            raise ConfigError(f"circuit failure_ratio must be in (0, 1], got {failure_ratio}")
        if not (math.isfinite(open_for) and open_for > 0):
            raise ConfigError(f"circuit open_for must be a number > 0 seconds, got {open_for}")
        if not (math.isfinite(max_open_for) and max_open_for > 0):
            raise ConfigError(f"circuit max_open_for must be a number > 0 seconds, got {max_open_for}")
        if probes < 1:
            raise ConfigError(f"circuit probes must be >= 1, got {probes}")
        self._clock = clock
        self._min_calls = min_calls
        self._failure_ratio = failure_ratio
        self._base_open_for = open_for
        self._max_open_for = max(max_open_for, open_for)  # a long first pause is not cut short by the maximum
        self._probes = probes
        self.on_change = on_change
        self._outcomes: deque[bool] = deque(maxlen=window)  # True = failure
        self._failures = 0
        self._state: CircuitState = "closed"
        self._open_for = open_for
        self._opened_until = -math.inf
        self._probes_out = 0
        self._probes_ok = 0

    @property
    def state(self) -> CircuitState:
        """The current state; an open circuit whose time is up becomes half_open here."""
        if self._state == "open" and self._clock.now() >= self._opened_until:
            self._probes_out = 0
            self._probes_ok = 0
            self._move("half_open")
        return self._state

    @property
    def opened_until(self) -> float | None:
        """The clock time at which an open circuit turns half_open; None when not open."""
        return self._opened_until if self.state == "open" else None

    @property
    def open_for(self) -> float:
        """How long the next (or current) opening lasts: `open_for`, doubled by every failed probe."""
        return self._open_for

    @property
    def failure_ratio(self) -> float:
        """The failure ratio over the calls in the window (0.0 when empty)."""
        return self._failures / len(self._outcomes) if self._outcomes else 0.0

    def allow(self) -> bool:
        """May a call go now? Always when closed, never when open, and in half_open while a probe slot is free
        (claiming it: answer with `record` or `release`)."""
        state = self.state
        if state == "closed":
            return True
        if state == "open" or self._probes_out + self._probes_ok >= self._probes:
            return False
        self._probes_out += 1
        return True

    def record(self, success: bool, *, probe: bool = False) -> None:
        """The outcome of an allowed call; `probe`: the call held a probe slot (`allow()` in half_open). See the
        module docstring for what the caller counts as failure."""
        state = self.state
        if state == "closed":
            self._add(failure=not success)
            if len(self._outcomes) >= self._min_calls and self.failure_ratio >= self._failure_ratio:
                self._open()
        elif state == "half_open" and probe and self._probes_out > 0:
            self._probes_out -= 1
            if not success:
                self._open_for = min(self._open_for * 2, self._max_open_for)
                self._open()
                return
            self._probes_ok += 1
            if self._probes_ok >= self._probes:
                self._close()

    def release(self) -> None:
        """An allowed call ended without an outcome (cancelled, shut down): free its probe slot, if it held one."""
        if self.state == "half_open" and self._probes_out > 0:
            self._probes_out -= 1

    def _add(self, *, failure: bool) -> None:
        if len(self._outcomes) == self._outcomes.maxlen and self._outcomes[0]:
            self._failures -= 1
        self._outcomes.append(failure)
        self._failures += failure

    def _open(self) -> None:
        self._opened_until = self._clock.now() + self._open_for
        self._probes_out = 0
        self._probes_ok = 0
        self._move("open")

    def _close(self) -> None:
        self._outcomes.clear()
        self._failures = 0
        self._open_for = self._base_open_for
        self._probes_out = 0
        self._probes_ok = 0
        self._move("closed")

    def _move(self, new: CircuitState) -> None:
        old, self._state = self._state, new
        if self.on_change is not None and old != new:
            self.on_change(old, new)
