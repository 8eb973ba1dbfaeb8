"""The outcome of a commit that its deadline gave up on, said in one line instead of asyncio's traceback.

A sink's commit is bounded (`consumers.engine`, ``commit_timeout``): past it, the commit is cancelled. aiokafka runs
the commit's request under ``asyncio.shield`` (``GroupCoordinator.commit_offsets``), so the request goes on without
anyone awaiting it, and when the broker fails it later (a broker frozen for 15 s, then back: the group has moved on,
``UnknownMemberIdError``; or the connection closed at a stop) asyncio logs "Task exception was never retrieved"
at ERROR with a traceback, 2 to 9 times after each freeze, and 3 times at a stop. Nothing is wrong then: the
engine said "commit failed, will retry" at the deadline and commits those offsets again.

`install` sets an event-loop exception handler that logs such an outcome at INFO, one line naming the error, and
hands every other context on to the handler there was before (asyncio's default, which logs it as always).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Final

from aiokafka.errors import KafkaError

__all__ = ["COMMIT_REQUEST", "install"]

log = logging.getLogger(__name__)

# aiokafka's coroutine under the shield (its name is checked against the installed aiokafka by a test).
COMMIT_REQUEST: Final = "GroupCoordinator._do_commit_offsets"

Handler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


def install(loop: asyncio.AbstractEventLoop) -> None:
    """Say `loop`'s abandoned commits' failures in one line; everything else goes where it went before."""
    previous: Handler | None = loop.get_exception_handler()
    if getattr(previous, "_orderbus_abandoned_commits", False):
        return  # installed already (a second daemon run on this loop, as in tests)

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        task, exc = context.get("future"), context.get("exception")
        if isinstance(task, asyncio.Task) and isinstance(exc, KafkaError) and _runs(task, COMMIT_REQUEST):
            log.info("a commit given up at its deadline failed later (it is made again): %r", exc)
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handle._orderbus_abandoned_commits = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handle)


def _runs(task: asyncio.Task[Any], qualname: str) -> bool:
    return getattr(task.get_coro(), "__qualname__", None) == qualname
