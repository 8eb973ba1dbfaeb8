"""Group commit for the dedup table: a delivered record is finished only once its state is durable, and the
writes of every record finishing at about the same time share one SQLite transaction.

Why: after a crash, a record whose 2xx was not yet recorded is sent again (the downstream's idempotency key
absorbs it, but it is a duplicate request). Waiting for the durable write keeps that window to the records sent
and not yet recorded, while batching keeps SQLite's share of the work small.

Flushes are pipelined: the records finishing in one turn of the event loop share a flush, which starts at the end
of that turn without waiting for the flush before it, up to `MAX_UNDER_WAY` flushes at a time. The store's
connection thread runs them in order; a turn of the loop under load takes milliseconds, and a hop to the thread and
back takes one or two turns, so waiting for the previous flush first would add those turns to every record's wait.
Beyond `MAX_UNDER_WAY`, records gather for the next flush: each transaction has a fixed cost, and one per turn of
the loop made SQLite a fifth of the daemon's CPU (bench.py).
"""

from __future__ import annotations

import asyncio

from consumers.dedup import DedupStore

MAX_UNDER_WAY = 2


class GroupFlush:
    """`await durable()` returns once everything `put` before the call is on disk."""

    def __init__(self, store: DedupStore) -> None:
        self._store = store
        self._waiters: list[asyncio.Future[None]] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def durable(self) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        self._kick()
        await waiter

    def _kick(self) -> None:
        if not self._scheduled and self._waiters and len(self._tasks) < MAX_UNDER_WAY:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start)  # after this turn's finishing lanes joined the batch

    def _start(self) -> None:
        self._scheduled = False
        if not self._waiters or len(self._tasks) >= MAX_UNDER_WAY:
            return
        waiters, self._waiters = self._waiters, []
        task = asyncio.create_task(self._flush(waiters), name="dedup-group-flush")
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._kick()

    async def _flush(self, waiters: list[asyncio.Future[None]]) -> None:
        try:
            await self._store.flush()
        except BaseException as exc:  # a failed flush fails every record waiting on it
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def close(self) -> None:
        """Wait for the flushes under way."""
        if self._tasks:
            await asyncio.wait(list(self._tasks))
