"""Group commit for the dedup table: a delivered record is finished only once its state is durable, and the
writes of every record finishing at about the same time share one SQLite transaction.

Why: after a crash, a record whose 2xx was not yet recorded is sent again (the downstream's idempotency key
absorbs it, but it is a duplicate request). Waiting for the durable write keeps that window to the requests
under way plus one flush, while batching keeps SQLite's share of the work small.
"""

from __future__ import annotations

import asyncio

from consumers.dedup import DedupStore


class GroupFlush:
    """`await durable()` returns once everything `put` before the call is on disk."""

    def __init__(self, store: DedupStore) -> None:
        self._store = store
        self._waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None

    async def durable(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush_while_waited_for(), name="dedup-group-flush")
        await waiter

    async def _flush_while_waited_for(self) -> None:
        while self._waiters:
            await asyncio.sleep(0)  # let the lanes finishing in this turn of the loop join the batch
            waiters, self._waiters = self._waiters, []
            try:
                await self._store.flush()
            except BaseException as exc:  # a failed flush fails every record waiting on it
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            await asyncio.wait([self._task])
