"""The pace of one sink: a token bucket shared by all its keys, which the server can slow down.

Two things decide when `Pacer.acquire()` returns:

1. **The token bucket.** Tokens refill at the current rate up to `burst` (default 1, so requests are evenly
   spaced and the configured rate is never exceeded over any window, sliding or fixed). Each acquire takes one.
2. **The server's pace.** `hold(seconds)` (a 429 with its Retry-After or 0, a 503 with its Retry-After) makes
   every acquire wait until ``now + seconds`` (a shorter hold never shortens a longer one), and halves the current
   rate, never below `min_rate` -- once per episode: not again while the hold lasts, nor within `DECREASE_GUARD`
   of the last decrease. The answers to every request sent before the server's first "slow down" come back with
   it, and a burst of 256 such answers is one signal, not 256 halvings down to `min_rate`. The rate then recovers
   additively: `recovery_step` more for every `recovery_interval` seconds after the hold ends without a new one,
   up to the configured rate and never above it. When a hold ends, one request may go at once; the rest follow at
   the lowered rate (no burst right after the server said "slow down").

Waiters are served first come, first served (an `asyncio.Lock` is FIFO), and a waiter cancelled while it waits
takes no token. The rate is a function of the clock (piecewise constant between recovery steps), so nothing
runs in the background: every value is computed when asked.

An unlimited pacer (rate None or 0) never waits for tokens and is never slowed, but a hold still pauses it. Slowing
it from the pace it was sending at was tried: a downstream whose 429s are not about our pace (the chaos runs'
sandboxes answer 2 % of requests 429 in short episodes, whatever the rate) kept it far below that pace (halved at
every episode, a tenth back every 5 s): the short chaos run took 109 s instead of ~60. A sink that must respect a
rate limit gets a `rate`. Its lanes start slowly after a hold instead (`consumers.ramp`, begun by the lane that
met the answer), or every one parked meanwhile would send the moment it ends.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator

from consumers.clock import Clock
from topics.errors import ConfigError

__all__ = ["Pacer"]

# What `hold` multiplies the current rate by.
DECREASE_FACTOR = 0.5
# Seconds after a decrease (or after the hold it came with, if longer) during which `hold` does not lower the rate.
DECREASE_GUARD = 1.0
# The default recovery step, as a share of the configured rate.
DEFAULT_RECOVERY_SHARE = 0.1
# Tokens are floats; this absorbs rounding so that a waiter woken at the exact refill time gets its token.
_EPSILON = 1e-9


class Pacer:
    """The rate limiter of one sink, shared by all its keys. See the module docstring for the rules."""

    def __init__(
        self,
        rate: float | None,
        *,
        clock: Clock,
        burst: int | None = None,
        min_rate: float = 1.0,
        recovery_step: float | None = None,
        recovery_interval: float = 5.0,
    ) -> None:
        if burst is not None and (isinstance(burst, bool) or burst < 1):
            raise ConfigError(f"pacing burst must be an integer >= 1, got {burst}")
        if not (math.isfinite(min_rate) and min_rate > 0):
            raise ConfigError(f"pacing min_rate must be a number > 0, got {min_rate}")
        if recovery_step is not None and not (math.isfinite(recovery_step) and recovery_step > 0):
            raise ConfigError(f"pacing recovery_step must be a number > 0, got {recovery_step}")
        if not (math.isfinite(recovery_interval) and recovery_interval > 0):
            raise ConfigError(f"pacing recovery_interval must be a number > 0 seconds, got {recovery_interval}")
        self._clock = clock
        self._configured = _limited(rate)
        self._burst = burst or 1
        self._min_rate = min_rate
        self._step = recovery_step
        self._interval = recovery_interval
        now = clock.now()
        self._tokens = float(self._burst)
        self._updated = now  # the bucket holds `_tokens` at this time
        self._lowered: float | None = None  # the rate set by the last hold, while it has not recovered fully
        self._recover_from = now  # the end of the last hold: recovery steps count from here
        self._held_until = now
        self._lower_again_at = now  # `hold` lowers the rate only from this time on (`DECREASE_GUARD`)
        self._throttled = 0.0
        self._last_retry_after: float | None = None
        self._lock = asyncio.Lock()
        self._reconfigured: asyncio.Future[None] | None = None

    # --- state ----------------------------------------------------------------------------------------------

    @property
    def rate(self) -> float | None:
        """The configured rate in requests per second; None when unlimited."""
        return self._configured

    @property
    def burst(self) -> int:
        return self._burst

    @property
    def current_rate(self) -> float:
        """The rate in force now: the configured one, or lower after a hold; `math.inf` when unlimited."""
        return self._rate_at(self._clock.now())

    @property
    def held_until(self) -> float:
        """The clock time until which every acquire waits; at or before now when not held."""
        return self._held_until

    @property
    def throttled_seconds(self) -> float:
        """Total seconds during which acquire callers were blocked by a hold, counted once per sink (not per
        caller) and only while someone was waiting; a wait still under way is added when it ends."""
        return self._throttled

    @property
    def last_retry_after(self) -> float | None:
        """The seconds of the latest `hold`, or None if there was none."""
        return self._last_retry_after

    # --- use ------------------------------------------------------------------------------------------------

    async def acquire(self) -> None:
        """Wait for this sink's turn: until any hold ends, then for a token. FIFO, cancellation-safe."""
        if self._configured is None and not self._lock.locked() and self._clock.now() >= self._held_until:
            return  # no rate and no hold, and no one queued to go first: the common case, without the lock
        async with self._lock:
            while True:
                now = self._clock.now()
                if now < self._held_until:
                    await self._wait_for_hold(now)
                    continue
                if self._configured is None:
                    return
                self._refill(now)
                if self._tokens >= 1.0 - _EPSILON:
                    self._tokens = max(0.0, self._tokens - 1.0)
                    return
                await self._sleep_or_reconfigured(self._time_until_token(now))

    def hold(self, seconds: float) -> None:
        """The server set the pace (429/503): pause every acquire for `seconds` and halve the current rate (once
        per episode, see the module docstring).

        `hold(0)` (a 429 without Retry-After) only lowers the rate. Negative or NaN seconds count as 0.
        """
        seconds = seconds if seconds > 0 else 0.0
        now = self._clock.now()
        self._last_retry_after = seconds
        lower = now >= self._lower_again_at
        if lower and self._configured is not None:
            self._refill(now)  # settle the bucket under the old rate before the rate changes
            lowered = max(self._min_rate, self._rate_at(now) * DECREASE_FACTOR)
            self._lowered = min(self._configured, lowered)
        self._held_until = max(self._held_until, now + seconds)
        if lower:
            self._lower_again_at = max(self._held_until, now + DECREASE_GUARD)
        self._recover_from = self._held_until
        if self._held_until > now:
            self._tokens = 1.0  # one request may go when the hold ends
            self._updated = max(self._updated, self._held_until)
        else:
            self._tokens = min(self._tokens, 1.0)

    def set_rate(self, rate: float | None) -> None:
        """Change the configured rate (live reload); None or 0 means unlimited. A lowered rate stays lowered
        (recovering towards the new rate) unless the new rate is already at or below it. Waiters re-plan."""
        limited = _limited(rate)
        now = self._clock.now()
        if self._configured is not None:
            self._refill(now)
        elif limited is not None:
            self._tokens = float(self._burst)
            self._updated = max(now, self._updated)
        self._configured = limited
        if limited is None or (self._lowered is not None and self._lowered >= limited):
            self._lowered = None
        if self._reconfigured is not None and not self._reconfigured.done():
            self._reconfigured.set_result(None)

    # --- internals ------------------------------------------------------------------------------------------

    def _rate_at(self, when: float) -> float:
        return next(self._segments(when))[2]

    def _segments(self, start: float) -> Iterator[tuple[float, float, float]]:
        """The rate from `start` on, as (from, to, rate) pieces of constant rate; the last piece never ends."""
        configured = math.inf if self._configured is None else self._configured
        if self._lowered is None or self._configured is None:
            yield start, math.inf, configured
            return
        step = self._step if self._step is not None else self._configured * DEFAULT_RECOVERY_SHARE
        steps = 0 if start < self._recover_from else int((start - self._recover_from) // self._interval)
        begin = start
        while True:
            rate = min(configured, self._lowered + steps * step)
            if rate >= configured:
                yield begin, math.inf, configured
                return
            end = self._recover_from + (steps + 1) * self._interval
            if end > begin:  # float rounding of the floor division may put `begin` on the next step
                yield begin, end, rate
                begin = end
            steps += 1

    def _refill(self, now: float) -> None:
        """Add the tokens earned from `_updated` to `now`, piece by piece of constant rate, capped at `burst`."""
        if now <= self._updated:
            return
        for begin, end, rate in self._segments(self._updated):
            until = min(end, now)
            self._tokens = min(float(self._burst), self._tokens + (until - begin) * rate)
            if until >= now:
                break
        self._updated = now
        if self._lowered is not None and self._rate_at(now) >= (self._configured or math.inf):
            self._lowered = None  # fully recovered

    def _time_until_token(self, now: float) -> float:
        """Seconds from `now` (the bucket refilled to `now`) until it holds one whole token."""
        need = 1.0 - self._tokens
        for begin, end, rate in self._segments(now):
            if (end - begin) * rate >= need:
                return begin + need / rate - now
            need -= (end - begin) * rate
        raise AssertionError("unreachable: the last rate segment never ends")

    async def _wait_for_hold(self, now: float) -> None:
        try:
            await self._sleep_or_reconfigured(self._held_until - now)
        finally:
            self._throttled += self._clock.now() - now

    async def _sleep_or_reconfigured(self, seconds: float) -> None:
        """Sleep on the clock, or less if `set_rate` changes the plan meanwhile."""
        if self._reconfigured is None or self._reconfigured.done():
            self._reconfigured = asyncio.get_running_loop().create_future()
        reconfigured = self._reconfigured
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        try:
            await asyncio.wait((sleeper, reconfigured), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
        if sleeper.done() and not sleeper.cancelled():
            sleeper.result()  # re-raise a failing clock instead of spinning


def _limited(rate: float | None) -> float | None:
    """A finite rate > 0, or None for unlimited (None, 0 or infinity)."""
    if rate is None or rate == 0 or rate == math.inf:
        return None
    if not (rate > 0 and math.isfinite(rate)):
        raise ConfigError(f"pacing rate must be >= 0 requests per second (0 = unlimited), got {rate}")
    return float(rate)
