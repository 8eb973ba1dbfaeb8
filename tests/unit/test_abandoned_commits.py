"""A commit request left running by a cancelled commit fails later: one INFO line, not asyncio's ERROR traceback."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest
from aiokafka.consumer.group_coordinator import GroupCoordinator as AiokafkaGroupCoordinator
from aiokafka.errors import UnknownMemberIdError

from consumers import abandoned_commits


class GroupCoordinator:
    """Named as aiokafka's: its commit request is what `asyncio.shield` leaves running."""

    async def _do_commit_offsets(self) -> None:
        raise UnknownMemberIdError()

    async def _other(self) -> None:
        raise UnknownMemberIdError()


async def orphan(coroutine: object) -> None:
    """Run `coroutine` as a task that fails and that nobody awaits, then let it go: asyncio reports it."""
    task = asyncio.ensure_future(coroutine)  # type: ignore[call-overload]
    await asyncio.wait([task])
    del task
    gc.collect()


def test_aiokafka_still_names_its_commit_request_so() -> None:
    assert AiokafkaGroupCoordinator._do_commit_offsets.__qualname__ == abandoned_commits.COMMIT_REQUEST


async def test_an_abandoned_commits_failure_is_one_info_line(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    abandoned_commits.install(loop)
    abandoned_commits.install(loop)  # once is enough: not two handlers in a chain
    with caplog.at_level(logging.INFO):
        await orphan(GroupCoordinator()._do_commit_offsets())
    said = [(record.levelno, record.getMessage()) for record in caplog.records]
    assert said == [
        (logging.INFO, "a commit given up at its deadline failed later (it is made again): UnknownMemberIdError()")
    ]
    assert caplog.records[0].exc_info is None


async def test_any_other_unretrieved_error_is_reported_as_before(caplog: pytest.LogCaptureFixture) -> None:
    abandoned_commits.install(asyncio.get_running_loop())
    with caplog.at_level(logging.INFO):
        await orphan(GroupCoordinator()._other())
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage().startswith("Task exception was never retrieved")
