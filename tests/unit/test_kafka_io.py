"""`keep_metadata_synchronizer` on a real `AIOKafkaClient` whose metadata request is faked (no broker), and
`guard_connection_writes` on a real `AIOKafkaConnection` whose socket writer is faked.

aiokafka's metadata synchronizer survives a KafkaError or a timeout only; under uvloop a write to a connection the
broker has just reset raises RuntimeError instead (aio-libs/aiokafka#1038). That ended the task once after a broker
restart, and every `force_metadata_update()` (the group coordinator's lookup, holding the lock every commit needs)
then waited for ever: tests/integration/test_chaos_short.py timed out about one run in twenty.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiokafka.client import AIOKafkaClient
from aiokafka.conn import AIOKafkaConnection, CloseReason
from aiokafka.errors import IncompatibleBrokerVersion, KafkaConnectionError
from aiokafka.protocol.metadata import MetadataRequest

from consumers.kafka_io import guard_connection_writes, keep_metadata_synchronizer

RESET = RuntimeError("unable to perform operation on <TCPTransport closed=True reading=False>; the handler is closed")


class FakeMetadata:
    """`AIOKafkaClient._metadata_update`: raises the scripted errors first, then answers True (updated)."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self, cluster: object, topics: object) -> bool:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return True


async def started(metadata: FakeMetadata, *, kept: bool = True) -> AIOKafkaClient:
    """A client as `bootstrap()` leaves it: its synchronizer running (here without a broker)."""
    client = AIOKafkaClient(bootstrap_servers="127.0.0.1:9")
    client._metadata_update = metadata
    client._sync_task = asyncio.create_task(client._md_synchronizer())
    if kept:
        keep_metadata_synchronizer(client, "test", delay=0)
    return client


async def test_a_metadata_update_awaited_when_the_synchronizer_dies_is_made_by_its_replacement(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metadata = FakeMetadata(RESET)
    client = await started(metadata)
    try:
        assert await asyncio.wait_for(client.force_metadata_update(), 2) is True
        assert metadata.calls == 2
        assert await asyncio.wait_for(client.force_metadata_update(), 2) is True  # and it goes on serving
        assert metadata.calls == 3
        died = [r for r in caplog.records if r.msg == "kafka metadata task died, restarting it"]
        assert [(r.levelno, r.__dict__["client"], r.__dict__["error"]) for r in died] == [
            (logging.ERROR, "test", repr(RESET))
        ]
    finally:
        await client.close()
    assert client._sync_task is None


async def test_without_it_the_update_waits_for_ever() -> None:
    """What the chaos run hit: aiokafka alone never answers the update the dead synchronizer was making."""
    client = await started(FakeMetadata(RESET), kept=False)
    update = client.force_metadata_update()
    for _ in range(10):  # turns of the loop: the synchronizer takes the request and dies of the reset
        await asyncio.sleep(0)
    assert client._sync_task.done()
    assert isinstance(client._sync_task.exception(), RuntimeError)
    assert not update.done(), "nothing else will ever answer it"
    update.cancel()
    client._sync_task = None  # its error is the point here, not something for close() to raise


async def test_a_synchronizer_failing_again_is_restarted_again() -> None:
    metadata = FakeMetadata(RESET, RuntimeError("again"), RESET)
    client = await started(metadata)
    try:
        assert await asyncio.wait_for(client.force_metadata_update(), 2) is True
        assert metadata.calls == 4
    finally:
        await client.close()


async def test_a_closed_client_is_not_restarted() -> None:
    metadata = FakeMetadata()
    client = await started(metadata)
    assert await asyncio.wait_for(client.force_metadata_update(), 2) is True
    task = client._sync_task
    await client.close()
    for _ in range(10):  # turns of the loop, as a restart (delay 0) would take
        await asyncio.sleep(0)
    assert task.cancelled()
    assert client._sync_task is None


class ResetWriter:
    """A stream writer over a transport the broker has reset, as uvloop's behaves: every write raises RESET."""

    def write(self, data: bytes) -> None:
        raise RESET

    def close(self) -> None:
        return None


def connection_with(
    writer: ResetWriter, closes: list[object], versions: dict[int, tuple[int, int]]
) -> AIOKafkaConnection:
    """A connection as `connect()` leaves it (reader, writer, read task, API versions), without a broker."""
    conn = AIOKafkaConnection("127.0.0.1", 9, on_close=lambda _, reason: closes.append(reason))
    reading: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    reading.set_result(None)
    conn._reader, conn._writer, conn._read_task, conn._versions = object(), writer, reading, versions
    return conn


async def test_a_reset_connection_write_is_a_connection_error_and_closes_the_connection() -> None:
    guard_connection_writes()
    guard_connection_writes()  # once per process, however often it is called
    assert not getattr(AIOKafkaConnection.send.__wrapped__, "_orderbus_guarded", False)
    closes: list[object] = []
    conn = connection_with(ResetWriter(), closes, {MetadataRequest.API_KEY: (0, 8)})
    with pytest.raises(KafkaConnectionError, match="the handler is closed"):
        conn.send(MetadataRequest(["orders"]))
    assert closes == [CloseReason.CONNECTION_BROKEN]  # the client drops it and connects anew
    assert conn._writer is None


async def test_aiokafkas_own_errors_pass_the_guard_unchanged() -> None:
    """aiokafka's errors are RuntimeErrors too; they are its callers' to handle, and the connection stays."""
    guard_connection_writes()
    closes: list[object] = []
    conn = connection_with(ResetWriter(), closes, {})  # no API versions: the request cannot be prepared
    with pytest.raises(IncompatibleBrokerVersion):
        conn.send(MetadataRequest(["orders"]))
    assert closes == []
    conn.close()
