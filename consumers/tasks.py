"""Ending background tasks at shutdown: cancel them, wait until they have ended, and say if one had failed.

The daemon's background loops (pruning, the systemd watchdog and readiness, reloads) end only by cancellation, and
each is cancelled from the exit stack that started it. Waiting for them matters: a task still running while its
store closes would use a closed connection. A task that had already ended with an error raises it here, so a loop
that died is not forgotten at shutdown. Only the tasks' own cancellation is absorbed: if the caller is cancelled
while it waits, that cancellation goes on.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["cancel_and_wait"]


async def cancel_and_wait(*tasks: asyncio.Task[Any]) -> None:
    """Cancel `tasks` and wait for all of them; re-raise the first error one of them ended with."""
    for task in tasks:
        task.cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
            raise outcome
