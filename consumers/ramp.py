"""Slow start after an outage: a sink whose circuit has just closed sends a few requests at once, then more.

A circuit closes when its probe succeeds: the downstream answers again, and every lane parked behind the circuit
wants to send at once, up to `max_in_flight` (256 by default). A system just back from an outage (a restarted
service with cold caches, a database catching up) can fall over again under that burst; the circuit opens again,
and the sink flaps. So after each close the sink's requests in flight are limited: `start` at first, one more
for each success (the limit doubles with each round of answers, as in TCP's slow start), until the limit reaches
`ceiling` (`max_in_flight`) and the ramp ends. A downstream that answers in 20 ms is back at 256 in flight within
~8 rounds (~0.2 s); a slow one gets time in proportion. A failure does not widen the limit, nor narrow it: a
downstream that still fails opens the circuit again (its window counts the failures), and one that fails now and
then (a 503 in twenty) must not stay held below `max_in_flight` for good. A lane waits in the ramp before the
pacer (`consumers.pacing`), so a `rate` and a Retry-After hold apply throughout; a probe is never held by it.
A credentials pause (401/403) that ends begins a ramp too: its lanes were parked behind it just the same; and so
does a Retry-After hold on a sink without a `rate` (`consumers.pacing` does not slow such a sink after the hold).

Waiters are admitted first come, first served. `acquire` returns a ticket that `release` gives back and
`succeeded` names: a request admitted by an earlier ramp, or sent before the ramp began (no ticket), neither frees
a place in this one nor widens it, as a circuit ignores the answers of calls it did not let out. It reads no
clock: the answers pace it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from topics.errors import ConfigError

__all__ = ["Ramp"]


class Ramp:
    """The slow start of one sink, shared by its lanes. See the module docstring for the rules."""

    def __init__(self, ceiling: int, *, start: int = 2) -> None:
        if ceiling < 1:
            raise ConfigError(f"ramp ceiling must be >= 1, got {ceiling}")
        if start < 1:
            raise ConfigError(f"ramp start must be >= 1, got {start}")
        self._ceiling = ceiling
        self._start = start
        self._limit: int | None = None  # None: no ramp, no limit but `max_in_flight`
        self._epoch = 0  # which ramp a ticket belongs to
        self._admitted = 0  # requests of this ramp under way
        self._waiters: deque[asyncio.Future[int | None]] = deque()

    @property
    def limit(self) -> int | None:
        """The requests in flight allowed now, or None when the sink is not ramping up."""
        return self._limit

    def begin(self) -> None:
        """The circuit has closed: from now on, `start` requests in flight, then more."""
        self._epoch += 1
        self._admitted = 0
        self._limit = self._start if self._start < self._ceiling else None
        self._wake()

    def succeeded(self, ticket: int | None) -> None:
        """The request `ticket` admitted was answered well: one more request in flight allowed."""
        if self._limit is None or ticket is None or ticket != self._epoch:
            return
        self._limit += 1
        if self._limit >= self._ceiling:
            self._limit = None
        self._wake()

    async def acquire(self) -> int | None:
        """Wait until one more request may go; the ticket is for `release` (None: not ramping, nothing counted)."""
        if self._limit is None:
            return None
        if not self._waiters and self._admitted < self._limit:
            self._admitted += 1
            return self._epoch
        waiter: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(waiter.result())  # admitted as it was cancelled: the place goes to the next
            else:
                with contextlib.suppress(ValueError):  # already taken off by `_wake`, which skips a cancelled one
                    self._waiters.remove(waiter)
            raise

    def release(self, ticket: int | None) -> None:
        """The request `ticket` admitted is over."""
        if ticket is not None and ticket == self._epoch:
            self._admitted -= 1
            self._wake()

    def _wake(self) -> None:
        while self._waiters and (self._limit is None or self._admitted < self._limit):
            waiter = self._waiters.popleft()
            if waiter.done():
                continue
            if self._limit is None:
                waiter.set_result(None)
            else:
                self._admitted += 1
                waiter.set_result(self._epoch)
