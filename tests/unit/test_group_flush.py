"""Group commit: the records finishing together share one flush and one future, whose callbacks run once durable."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from consumers.dedup import DeliveryState, MemoryDedupStore
from consumers.group_flush import GroupFlush
from topics.errors import StoreError


def done(key: str) -> DeliveryState:
    return DeliveryState(key, "e", "o", "done", 1, 200, 1.0, 1.0, None, None, None, 1.0)


class HeldStore(MemoryDedupStore):
    """A flush waits for `release` (each flush, until it is set); `fail` makes the flushes raise instead."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.started = 0
        self.fail = False

    async def flush(self) -> int:
        self.started += 1
        await self.release.wait()
        if self.fail:
            raise StoreError("dedup store crm: flush failed: disk I/O error")
        return await super().flush()


async def turns(count: int = 5) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


async def test_callbacks_of_a_batch_run_once_its_states_are_durable_in_the_order_added() -> None:
    store = HeldStore()
    group = GroupFlush(store)
    seen: list[tuple[str, bool]] = []

    def noting(key: str) -> Callable[[object], None]:
        return lambda _: seen.append((key, key in store.tables.deliveries))

    for key in ("k1", "k2", "k3"):
        store.put(done(key))
        group.batch().add_done_callback(noting(key))
    await turns()
    assert store.started == 1, "one flush for the three records"
    assert seen == []
    store.release.set()
    await turns()
    assert seen == [("k1", True), ("k2", True), ("k3", True)]


async def test_a_failed_flush_reaches_every_callback_of_its_batch_and_every_waiter() -> None:
    store = HeldStore()
    store.fail = True
    group = GroupFlush(store)
    errors: list[BaseException | None] = []
    batch = group.batch()
    batch.add_done_callback(lambda future: errors.append(future.exception()))
    await turns()
    store.release.set()
    with pytest.raises(StoreError, match="disk I/O error"):
        await batch  # and whoever awaits it
    assert len(errors) == 1
    assert isinstance(errors[0], StoreError)


async def test_settled_returns_after_the_callbacks_of_every_batch_under_way() -> None:
    store = HeldStore()
    group = GroupFlush(store)
    ran: list[str] = []
    group.batch().add_done_callback(lambda _: ran.append("first"))
    await turns()
    group.batch().add_done_callback(lambda _: ran.append("second"))
    await turns()
    assert store.started == 2
    group.batch().add_done_callback(lambda _: ran.append("gathering"))  # waits for a flush to end first
    settled = asyncio.ensure_future(group.settled())
    await turns()
    assert not settled.done()
    store.release.set()
    await settled
    assert sorted(ran) == ["first", "gathering", "second"]


async def test_settled_does_not_raise_when_a_flush_failed() -> None:
    store = HeldStore()
    store.fail = True
    group = GroupFlush(store)
    told: list[bool] = []
    group.batch().add_done_callback(lambda future: told.append(future.exception() is not None))
    settled = asyncio.ensure_future(group.settled())
    await turns()
    store.release.set()
    await settled
    assert told == [True]


async def test_settled_with_nothing_under_way_returns_at_once() -> None:
    store = HeldStore()
    await GroupFlush(store).settled()
    assert store.started == 0


async def test_settled_runs_the_callbacks_of_a_batch_that_completed_just_before() -> None:
    # The flush has ended and its batch is complete, but its callbacks are only scheduled: a drain that asked
    # now saw nothing under way, returned, and committed before any of those records was finished.
    flushed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    class SignallingStore(MemoryDedupStore):
        async def flush(self) -> int:
            flushed.set_result(None)  # wakes the test before the batch's callbacks are scheduled
            return await super().flush()

    group = GroupFlush(SignallingStore())
    ran: list[str] = []
    batch = group.batch()
    batch.add_done_callback(lambda _: ran.append("settled"))
    await flushed
    assert batch.done()
    assert ran == []
    await group.settled()
    assert ran == ["settled"]
