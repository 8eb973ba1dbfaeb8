"""The command line's plumbing that every command shares."""

from __future__ import annotations

import pytest
from aiokafka.conn import AIOKafkaConnection

from daemon import cli


def test_every_command_runs_with_kafka_connection_writes_guarded(monkeypatch: pytest.MonkeyPatch) -> None:
    # The guard is process-wide and once applied stays: start this test from aiokafka's own method.
    monkeypatch.setattr(
        AIOKafkaConnection, "send", getattr(AIOKafkaConnection.send, "__wrapped__", None) or AIOKafkaConnection.send
    )
    assert not getattr(AIOKafkaConnection.send, "_orderbus_guarded", False)

    async def guarded_while_running() -> bool:
        return bool(getattr(AIOKafkaConnection.send, "_orderbus_guarded", False))

    assert cli._run_async(guarded_while_running())
