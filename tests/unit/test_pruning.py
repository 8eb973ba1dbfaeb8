"""The pruning loop: on schedule, and never ended by a failing prune (it is logged and tried again)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import pytest

from consumers.clock import FakeClock
from consumers.pruning import PRUNE_INTERVAL, RETRY_INTERVAL, prune_forever
from topics.errors import StoreError

RETENTION = 48 * 3600.0


class ScriptedStore:
    """A store's `prune`: answers from a script (a row count, or an exception to raise), and records each cutoff."""

    def __init__(self, *outcomes: int | Exception) -> None:
        self.outcomes = list(outcomes)
        self.cutoffs: list[float] = []

    async def prune(self, older_than: float) -> int:
        self.cutoffs.append(older_than)
        outcome = self.outcomes.pop(0) if self.outcomes else 0
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


@contextlib.asynccontextmanager
async def pruning(store: ScriptedStore, clock: FakeClock) -> AsyncIterator[None]:
    task = asyncio.create_task(prune_forever(store.prune, RETENTION, "dedup-crm", clock))
    try:
        await clock.advance(0)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_it_prunes_at_once_then_every_interval_with_the_wall_time_minus_the_retention() -> None:
    clock = FakeClock()
    store = ScriptedStore(0, 5, 0)
    async with pruning(store, clock):
        start = clock.wall()
        assert store.cutoffs == [start - RETENTION]
        await clock.advance(PRUNE_INTERVAL - 1)
        assert len(store.cutoffs) == 1
        await clock.advance(1 + PRUNE_INTERVAL)
    assert store.cutoffs == [start - RETENTION + n * PRUNE_INTERVAL for n in range(3)]


async def test_a_failed_prune_is_logged_with_its_store_and_tried_again_and_the_schedule_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    store = ScriptedStore(StoreError("dedup store x.sqlite: prune failed: disk I/O error"), 7)
    with caplog.at_level(logging.INFO, logger="consumers.pruning"):
        async with pruning(store, clock):
            start = clock.wall()
            await clock.advance(RETRY_INTERVAL)
            await clock.advance(PRUNE_INTERVAL)
    assert store.cutoffs == [
        c - RETENTION for c in (start, start + RETRY_INTERVAL, start + RETRY_INTERVAL + PRUNE_INTERVAL)
    ]
    failed, pruned = caplog.records
    assert (failed.levelno, failed.getMessage()) == (logging.ERROR, "pruning failed; next try in 300 s")
    assert vars(failed)["store"] == "dedup-crm"
    assert vars(failed)["error"] == "dedup store x.sqlite: prune failed: disk I/O error"
    assert not failed.exc_info  # an expected failure: no traceback
    assert (pruned.levelno, vars(pruned)["store"], vars(pruned)["rows"]) == (logging.INFO, "dedup-crm", 7)


async def test_a_bug_in_a_prune_is_logged_with_its_traceback_and_tried_again(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    store = ScriptedStore(TypeError("unsupported operand"), 0)
    with caplog.at_level(logging.ERROR, logger="consumers.pruning"):
        async with pruning(store, clock):
            await clock.advance(RETRY_INTERVAL)
    assert len(store.cutoffs) == 2
    (failed,) = caplog.records
    assert failed.exc_info is not None
    assert failed.exc_info[0] is TypeError
