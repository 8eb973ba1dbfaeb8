"""Coarse timeouts for many concurrent operations: one sweeper for all of them, instead of a timer each.

`asyncio.timeout` schedules a timer on entry and cancels it on exit; at a few thousand HTTP requests a second
that was 5-8 % of the daemon's CPU (py-spy, tests/bench/hotpath.py). A delivery's timeout is seconds long and
only has to fire within a fraction of a second of its deadline, so here a scope is an entry in a set, and one
sweeper wakes every `resolution` seconds while any scope is open and cancels the tasks whose deadline passed.

Inside a scope that expired, the task sees `asyncio.CancelledError` at its next await, and the scope turns it
into `TimeoutError` on exit, exactly as `asyncio.timeout` does (a cancellation from elsewhere stays a
cancellation). A deadline fires at most `resolution` late, never early.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from consumers.clock import Clock

DEFAULT_RESOLUTION = 0.05


class Deadlines:
    """`with deadlines.within(seconds):` bounds the awaits inside, like ``async with asyncio.timeout(seconds)``."""

    def __init__(self, clock: Clock, *, resolution: float = DEFAULT_RESOLUTION) -> None:
        self._clock = clock
        self._resolution = resolution
        self._open: set[_Scope] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def within(self, seconds: float) -> _Scope:
        return _Scope(self, self._clock.now() + seconds)

    @property
    def open(self) -> int:
        """Scopes entered and not exited yet."""
        return len(self._open)

    def _enter(self, scope: _Scope) -> None:
        self._open.add(scope)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="deadlines-sweeper")

    def _exit(self, scope: _Scope) -> None:
        self._open.discard(scope)

    async def _sweep(self) -> None:
        try:
            while self._open:
                await self._clock.sleep(self._resolution)
                now = self._clock.now()
                for scope in [s for s in self._open if s.deadline <= now]:
                    self._open.discard(scope)
                    scope.expire()
        finally:
            self._sweeper = None


class _Scope:
    __slots__ = ("_cancelling", "_owner", "_task", "deadline", "expired")

    def __init__(self, owner: Deadlines, deadline: float) -> None:
        self._owner = owner
        self.deadline = deadline
        self.expired = False
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0

    def __enter__(self) -> _Scope:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline scope must be entered inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._owner._enter(self)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._owner._exit(self)
        if self.expired:
            assert self._task is not None
            # As asyncio.timeout: our cancel becomes a TimeoutError; one from elsewhere stays a cancellation.
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc

    def expire(self) -> None:
        if not self.expired and self._task is not None:
            self.expired = True
            self._task.cancel()
