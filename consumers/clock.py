"""Time as a dependency: the engine asks a `Clock` for "now" and for sleeps, so tests can drive time themselves.

`SystemClock` is the real one. `FakeClock` holds virtual time that moves only when a test says so:

- `advance(seconds)` moves time forward, waking due sleepers in deadline order (ties in the order they began to
  sleep) and letting the woken coroutines run before the next deadline is reached;
- `run_until_idle()` jumps from wake-up to wake-up until nothing sleeps on the clock any more;
- `autojump()` (an async context manager) does the same in the background, like trio's
  ``MockClock(autojump_threshold=0)``: whenever every task is blocked, time jumps to the next wake-up, so a
  100-second scenario runs in milliseconds and the test simply awaits its result.

"Every task is blocked" means the event loop has no ready callbacks. The stdlib loop exposes that as its
`_ready` queue; on a loop that hides it (uvloop) the fake clock yields a fixed number of turns instead.
Unit tests run on the stdlib loop.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import AsyncIterator, Sized
from contextlib import asynccontextmanager, suppress
from typing import Protocol

__all__ = ["Clock", "FakeClock", "SystemClock"]

# Loop turns after which a loop that never empties its ready queue counts as busy (a task spinning on sleep(0)).
_MAX_SETTLE_TURNS = 10_000
# Turns given to woken tasks on a loop whose ready queue cannot be inspected.
_OPAQUE_LOOP_TURNS = 64


class Clock(Protocol):
    """Monotonic time for deadlines, wall time for HTTP dates, and a sleep that follows the same clock."""

    def now(self) -> float:
        """Monotonic seconds: only differences mean anything."""
        ...

    def wall(self) -> float:
        """Unix seconds, for absolute times such as an HTTP-date Retry-After."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return after `seconds` of this clock's time; zero or negative only yields to the loop."""
        ...


class SystemClock:
    """The real clock: `time.monotonic`, `time.time` and `asyncio.sleep`."""

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """Virtual time for tests: it moves only through `advance`, `run_until_idle` or `autojump`.

    Sleepers are kept in a heap of (deadline, sequence, future); a cancelled sleeper leaves its entry behind,
    which is skipped when reached. Everything runs on the event loop of the awaiting task; nothing here is
    thread-safe, and nothing reads the real time.
    """

    def __init__(self, start: float = 1000.0, wall_start: float = 1_800_000_000.0) -> None:
        self._start = start
        self._now = start
        self._wall_start = wall_start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._sequence = itertools.count()
        self._new_sleeper: asyncio.Event | None = None

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._wall_start + (self._now - self._start)

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        deadline = self._now + seconds
        if math.isfinite(deadline):  # an infinite sleep is never woken, so it never enters the heap
            heapq.heappush(self._sleepers, (deadline, next(self._sequence), waiter))
            if self._new_sleeper is not None:
                self._new_sleeper.set()
        await waiter

    @property
    def next_wakeup(self) -> float | None:
        """The earliest deadline of a live sleeper, or None when nothing sleeps on this clock."""
        self._drop_cancelled()
        return self._sleepers[0][0] if self._sleepers else None

    @property
    def sleepers(self) -> int:
        """How many tasks sleep on this clock right now (cancelled sleeps excluded)."""
        return sum(1 for _, _, waiter in self._sleepers if not waiter.done())

    async def advance(self, seconds: float) -> None:
        """Move time forward by `seconds`, waking due sleepers in deadline order and letting them run.

        Time stops at each deadline on the way, so a coroutine woken at t=1 that sleeps 1 s again is woken at
        t=2 within the same `advance(5)`. On return the loop is idle and `now()` is exactly the target.
        """
        if seconds < 0 or math.isnan(seconds):
            raise ValueError(f"cannot advance a clock by {seconds} seconds")
        target = self._now + seconds
        await self._settle()
        while (deadline := self.next_wakeup) is not None and deadline <= target:
            self._wake_due(deadline)
            await self._settle()
        self._now = max(self._now, target)
        await self._settle()

    async def run_until_idle(self, *, limit: float = math.inf) -> None:
        """Jump from wake-up to wake-up until no task sleeps on this clock, or until `limit` seconds passed.

        Returns with the loop idle. Tasks that wait on something other than the clock (a queue no one feeds)
        do not keep it running; tasks that never stop sleeping make it run until `limit`.
        """
        stop_at = self._now + limit
        await self._settle()
        while (deadline := self.next_wakeup) is not None and deadline <= stop_at:
            self._wake_due(deadline)
            await self._settle()
        if math.isfinite(stop_at) and self.next_wakeup is not None:
            self._now = max(self._now, stop_at)

    @asynccontextmanager
    async def autojump(self) -> AsyncIterator[None]:
        """While inside, jump to the next wake-up whenever the loop is idle (trio's autojump_threshold=0)."""
        if self._new_sleeper is not None:
            raise RuntimeError("autojump is already running on this clock")
        self._new_sleeper = asyncio.Event()
        driver = asyncio.create_task(self._autojump_driver(self._new_sleeper), name="FakeClock.autojump")
        try:
            yield
        finally:
            driver.cancel()
            with suppress(asyncio.CancelledError):
                await driver
            self._new_sleeper = None

    async def _autojump_driver(self, new_sleeper: asyncio.Event) -> None:
        while True:
            await self._settle()
            deadline = self.next_wakeup
            if deadline is None:
                new_sleeper.clear()
                await new_sleeper.wait()
                continue
            self._wake_due(deadline)

    def _wake_due(self, deadline: float) -> None:
        """Set the time to `deadline` and wake every sleeper due by then, in order."""
        self._now = max(self._now, deadline)
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, waiter = heapq.heappop(self._sleepers)
            if not waiter.done():
                waiter.set_result(None)

    def _drop_cancelled(self) -> None:
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)

    async def _settle(self) -> None:
        """Yield until no other task is ready to run: woken coroutines proceed to their next real wait."""
        ready = getattr(asyncio.get_running_loop(), "_ready", None)
        if not isinstance(ready, Sized):
            for _ in range(_OPAQUE_LOOP_TURNS):
                await asyncio.sleep(0)
            return
        for _ in range(_MAX_SETTLE_TURNS):
            await asyncio.sleep(0)
            if not ready:
                return
        raise RuntimeError(f"the event loop did not go idle within {_MAX_SETTLE_TURNS} turns (a task spins?)")
