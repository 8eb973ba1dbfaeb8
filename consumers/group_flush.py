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

Every record of one flush shares one future (`batch`): a lane registers what to do once its record is durable as a
done-callback of it, which the event loop calls, instead of suspending its task on a future of its own and being
resumed (a future, a task wake-up and a resumed chain of coroutines per record).
"""

from __future__ import annotations

import asyncio

from consumers.dedup import DedupStore

MAX_UNDER_WAY = 2


class GroupFlush:
    """`batch()` is a future that completes once everything `put` before the call is on disk.

    Its result is None; if the flush failed, its exception is the flush's error (it is cancelled if the flush was).
    """

    def __init__(self, store: DedupStore) -> None:
        self._store = store
        self._next: asyncio.Future[None] | None = None  # the batch that the next flush makes durable
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._under_way: set[asyncio.Future[None]] = set()  # the batches of those flushes

    def batch(self) -> asyncio.Future[None]:
        """The future of the next flush, which writes everything put so far; shared by every caller until it starts."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        self._kick()
        return self._next

    async def settled(self) -> None:
        """Return once every batch taken before the call is complete and its done-callbacks have run.

        It does not raise: the callbacks of a failed batch are told, and handle it.
        """
        if self._next is None and not self._under_way:
            # A batch completed just now may not have run its callbacks yet: they were scheduled when it completed,
            # so one turn of the loop runs them before this returns.
            await asyncio.sleep(0)
            return
        batches = [*self._under_way, self.batch()]
        # Each batch's callbacks are called in the order they were added, and this waiter's were added last.
        await asyncio.wait(batches)
        for batch in batches:
            if not batch.cancelled():
                batch.exception()  # retrieved: the callbacks were told; nobody else may have asked

    def _kick(self) -> None:
        if not self._scheduled and self._next is not None and len(self._tasks) < MAX_UNDER_WAY:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start)  # after this turn's finishing lanes joined the batch

    def _start(self) -> None:
        self._scheduled = False
        if self._next is None or len(self._tasks) >= MAX_UNDER_WAY:
            return
        batch, self._next = self._next, None
        self._under_way.add(batch)
        task = asyncio.create_task(self._flush(batch), name="dedup-group-flush")
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._kick()

    async def _flush(self, batch: asyncio.Future[None]) -> None:
        try:
            await self._store.flush()
        except asyncio.CancelledError:
            batch.cancel()
            raise
        except BaseException as exc:  # a failed flush fails every record of its batch
            if not batch.done():
                batch.set_exception(exc)
            return
        finally:
            self._under_way.discard(batch)
        if not batch.done():
            batch.set_result(None)

    async def close(self) -> None:
        """Wait for the flushes under way."""
        if self._tasks:
            await asyncio.wait(list(self._tasks))
