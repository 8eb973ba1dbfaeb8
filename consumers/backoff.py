"""When to try a failed delivery again, and when to stop: capped exponential backoff with full jitter.

Attempts are counted from 1: `delay(1, rng)` is the wait after the first failed attempt. Full jitter draws the
whole delay uniformly from ``[0, min(cap, base * 2 ** (attempt - 1))]`` so that many keys failing together do
not retry together (the AWS Architecture Blog's "Exponential Backoff And Jitter"). A Retry-After from the
server is a floor: the retry is never earlier than the server asked, whatever the draw.

The engine checks `exhausted` after each failed attempt and, if it is not, parks the key until `retry_at`.
The check is made at failure time, so the last retry may start after ``first_attempt_at + max_elapsed``
when a long Retry-After pushed it there; it is then the last one.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from topics.errors import ConfigError

__all__ = ["Backoff"]

# 2.0 ** 1023 is the largest finite power of two; beyond it the product only grows to the cap anyway.
_MAX_EXPONENT = 1023


@dataclass(frozen=True, slots=True)
class Backoff:
    """Retry timing of one sink: base and cap of the delay (seconds), and the two limits that end retrying."""

    base: float = 0.5
    cap: float = 60.0
    max_attempts: int = 12
    max_elapsed: float = 3600.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.base) and self.base > 0):
            raise ConfigError(f"backoff.base must be a number > 0, got {self.base}")
        if not (math.isfinite(self.cap) and self.cap >= self.base):
            raise ConfigError(f"backoff.cap must be a number >= backoff.base ({self.base}), got {self.cap}")
        if isinstance(self.max_attempts, bool) or self.max_attempts < 1:
            raise ConfigError(f"backoff.max_attempts must be an integer >= 1, got {self.max_attempts}")
        if not self.max_elapsed > 0:
            raise ConfigError(f"backoff.max_elapsed must be > 0 seconds, got {self.max_elapsed}")

    def ceiling(self, attempt: int) -> float:
        """The largest delay after failed attempt number `attempt` (1-based): ``min(cap, base * 2**(attempt-1))``."""
        if attempt < 1:
            raise ValueError(f"attempts are counted from 1, got {attempt}")
        return min(self.cap, self.base * 2.0 ** min(attempt - 1, _MAX_EXPONENT))

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: a uniform draw from ``[0, ceiling(attempt)]``. Uses exactly one draw of `rng`."""
        return rng.uniform(0.0, self.ceiling(attempt))

    def exhausted(self, attempts: int, first_attempt_at: float, now: float) -> bool:
        """True when `attempts` failed attempts reached `max_attempts`, or `max_elapsed` passed since the first."""
        return attempts >= self.max_attempts or now - first_attempt_at >= self.max_elapsed

    def retry_at(self, attempt: int, now: float, rng: random.Random, floor: float | None = None) -> float:
        """The clock time of the next attempt after failed attempt `attempt`.

        `floor` is a Retry-After in seconds from `now` (as `policy.parse_retry_after` returns it, already capped):
        the result is ``now + max(delay, floor)``. The jitter is drawn even when the floor wins, so a seeded
        `rng` gives the same sequence whatever the server said.
        """
        wait = self.delay(attempt, rng)
        if floor is not None:
            wait = max(wait, floor)
        return now + wait
