"""Forgetting old state on a schedule: the loop behind every SQLite store the daemon prunes by itself (each sink's
delivery states, the ingest's idempotency keys).

It prunes at once, then every `PRUNE_INTERVAL`. A prune that fails (the disk full or failing, the file locked by
someone else for longer than its busy timeout, the key store's process gone) is logged as an error naming the
store and tried again after `RETRY_INTERVAL`: the loop never ends on a failure. One that did would stop pruning
for the rest of the process's life, unseen, and the file would grow until the next restart.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

from consumers.clock import Clock
from topics.errors import StoreError

__all__ = ["PRUNE_INTERVAL", "RETRY_INTERVAL", "prune_forever"]

log = logging.getLogger(__name__)

PRUNE_INTERVAL: Final = 3600.0  # seconds between two prunes
RETRY_INTERVAL: Final = 300.0  # seconds after a failed prune before the next try


async def prune_forever(prune: Callable[[float], Awaitable[int]], retention: float, store: str, clock: Clock) -> None:
    """Call ``prune(older_than)`` with the wall time `retention` seconds ago, forever; `store` names it in logs."""
    while True:
        try:
            removed = await prune(clock.wall() - retention)
        except Exception as exc:  # a StoreError as a rule; anything else is a bug, said with its traceback
            bug = not isinstance(exc, StoreError)
            extra = {"store": store, "error": str(exc)}
            log.error("pruning failed; next try in %.0f s", RETRY_INTERVAL, exc_info=bug, extra=extra)
            await clock.sleep(RETRY_INTERVAL)
            continue
        if removed:
            log.info("pruned old rows", extra={"store": store, "rows": removed})
        await clock.sleep(PRUNE_INTERVAL)
