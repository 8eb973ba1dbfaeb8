"""`consumers.order_state`: the downstream ids and blocks a sink's instances share through its state topic, with
the file as it is (`MemoryDedupStore`) and the topic in memory (`FakeStateTopic`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence

import pytest
from support import FakeStateTopic, at

from consumers import order_state
from consumers.blocks import Blocks
from consumers.dedup import MemoryDedupStore
from consumers.order_state import Entry, Fetched, SharedStateStore, decode_entry
from topics.errors import SharedStateError, StoreError


def shared() -> tuple[SharedStateStore, MemoryDedupStore, FakeStateTopic]:
    file, topic = MemoryDedupStore(), FakeStateTopic()
    return SharedStateStore(file, topic), file, topic


async def test_ids_and_blocks_reach_the_topic_with_the_flush_that_writes_them_to_the_file() -> None:
    store, file, topic = shared()
    store.put_downstream_id("SO-1", "d-1", origin=at(4))
    store.block_order("SO-2", '["k1"]', origin=at(0))
    store.unblock_order("SO-3", origin=at(2))
    assert topic.entries == []
    assert store.pending_writes == 9  # three in the file's tables, three in its outbox, three for the topic
    assert await store.flush() == 9
    assert topic.entries == [
        Entry(4, b"id:SO-1", b"d-1"),
        Entry(0, b"block:SO-2", b'["k1"]'),
        Entry(2, b"block:SO-3", None),  # a tombstone: the topic forgets the block
    ]
    assert await file.downstream_id("SO-1") == "d-1"
    assert await file.blocked_orders(["SO-2", "SO-3"]) == {"SO-2"}
    assert len(file.tables.outbox) == 3, "kept in the file until the topic has them"
    assert store.pending_writes == 3, "acknowledged: out of the outbox with the file's next flush"
    await store.file.flush()
    assert file.tables.outbox == {}


async def test_the_last_write_of_an_order_is_the_one_sent_and_a_write_without_a_partition_stays_in_the_file() -> None:
    store, _, topic = shared()
    store.block_order("SO-2", '["k1"]', origin=at(1))
    store.block_order("SO-2", '["k1","k2"]', origin=at(1))
    store.unblock_order("SO-2", origin=at(1))
    store.put_downstream_id("SO-4", "d-4")  # no partition said: the file's alone
    await store.flush()
    assert topic.entries == [Entry(1, b"block:SO-2", None)]


async def test_a_write_the_broker_refuses_fails_the_flush_and_goes_with_the_next() -> None:
    store, file, topic = shared()
    store.put_downstream_id("SO-1", "d-1", origin=at(0))
    store.block_order("SO-2", '["k1"]', origin=at(0))
    topic.failing = "kafka is unreachable"
    with pytest.raises(StoreError, match="kafka is unreachable"):
        await store.flush()
    assert await file.downstream_id("SO-1") == "d-1", "the file's part of the flush is done all the same"
    store.block_order("SO-2", '["k1","k2"]', origin=at(0))  # newer than the one that failed: it wins
    topic.failing = None
    await store.flush()
    assert topic.entries == [Entry(0, b"id:SO-1", b"d-1"), Entry(0, b"block:SO-2", b'["k1","k2"]')]
    await store.flush()
    assert store.pending_writes == 0
    assert file.tables.outbox == {}


async def test_what_the_topic_had_not_acknowledged_at_a_crash_is_written_after_the_next_open() -> None:
    # A record finishes on the file's flush (`SharedStateStore.file`): after a kill -9 it comes again as a dedup hit,
    # which writes nothing. Its id must reach the topic all the same.
    file, topic = MemoryDedupStore(), FakeStateTopic()
    store = SharedStateStore(file, topic)
    store.put_downstream_id("SO-1", "d-1", origin=at(3))
    store.block_order("SO-2", '["k1"]', origin=at(0))
    await store.file.flush()  # the group flush: the record is finished
    file.crash()  # killed before the commit's flush wrote the topic
    assert topic.entries == []
    again = SharedStateStore(MemoryDedupStore(file.tables), topic)
    await again.open()
    assert again.pending_writes == 0, "held until their partitions are assigned here"
    await again.restore([0, 3])
    await again.flush()
    assert topic.entries == [Entry(0, b"block:SO-2", b'["k1"]'), Entry(3, b"id:SO-1", b"d-1")]


async def test_what_a_crash_left_is_not_sent_once_another_instance_committed_its_record() -> None:
    # Killed with entries in its outbox, an instance may come back after another one delivered those records again
    # (and perhaps replayed and unblocked the order): the state that other instance wrote is the newer one.
    file, topic = MemoryDedupStore(), FakeStateTopic()
    store = SharedStateStore(file, topic)
    store.put_downstream_id("SO-1", "d-1", origin=("orders", 2, 10))
    store.block_order("SO-2", '["k1"]', origin=("orders", 3, 20))
    store.block_order("SO-3", '["k2"]', origin=("orders.replay.crm", 3, 5))
    await store.file.flush()
    file.crash()
    committed = {("orders", 2): 11, ("orders", 3): 20}  # partition 2's record committed since; 3's not

    async def committed_offset(topic: str, partition: int) -> int | None:
        return committed.get((topic, partition))

    again = SharedStateStore(MemoryDedupStore(file.tables), topic)
    await again.open()
    restored = await again.restore([2, 3], committed_offset)
    assert restored.error is None
    await again.flush()
    await again.file.flush()
    assert topic.entries == [Entry(3, b"block:SO-2", b'["k1"]'), Entry(3, b"block:SO-3", b'["k2"]')]
    assert file.tables.outbox == {}, "the stale id dropped, the others sent"


async def test_entries_held_for_a_partition_wait_when_its_committed_offset_cannot_be_asked() -> None:
    file, topic = MemoryDedupStore(), FakeStateTopic()
    store = SharedStateStore(file, topic)
    store.put_downstream_id("SO-1", "d-1", origin=("orders", 2, 10))
    await store.file.flush()
    again = SharedStateStore(MemoryDedupStore(file.tables), topic)
    await again.open()

    async def unreachable(topic: str, partition: int) -> int | None:
        raise SharedStateError("coordinator not available")

    assert "committed offset of orders [2] not known" in ((await again.restore([2], unreachable)).error or "")
    await again.flush()
    assert topic.entries == []
    await again.restore([2])  # the next assignment, the group answering (here: no committed offset)
    await again.flush()
    assert topic.entries == [Entry(2, b"id:SO-1", b"d-1")]


async def test_an_older_entrys_acknowledgement_leaves_a_newer_one_of_its_key_in_the_outbox() -> None:
    file, topic = MemoryDedupStore(), FakeStateTopic()
    store = SharedStateStore(file, topic)
    store.block_order("SO-2", '["k1"]', origin=at(0))
    writing = asyncio.create_task(store.flush())  # the older entry taken for the topic
    await asyncio.sleep(0)
    store.unblock_order("SO-2", origin=at(0))  # a newer one, put while the older is being written
    await writing
    await store.file.flush()
    assert file.tables.outbox == {b"block:SO-2": (b"block:SO-2", 0, None, "orders", 0)}, "the unblock waits for its own"
    await store.flush()
    await store.file.flush()
    assert file.tables.outbox == {}
    assert topic.entries[-1] == Entry(0, b"block:SO-2", None)


async def test_a_read_partition_overrides_the_file_and_says_which_chains_changed() -> None:
    store, file, topic = shared()
    file.put_downstream_id("SO-1", "stale")
    file.block_order("SO-3", '["old"]')  # left by this instance before another replayed it
    await file.flush()
    topic.entries = [
        Entry(0, b"id:SO-1", b"d-1"),
        Entry(0, b"block:SO-2", b'["k1"]'),
        Entry(0, b"block:SO-3", b'["old"]'),
        Entry(0, b"block:SO-3", None),
        Entry(0, b"id:SO-9", None),  # not a record orderbus writes: skipped
        Entry(0, b"mystery", b"x"),
        Entry(1, b"id:SO-5", b"d-5"),  # another partition: not read
    ]
    restored = await store.restore([0])
    assert topic.read_partitions == [[0]]
    assert restored.entries == 4
    assert restored.chains == {"SO-2": '["k1"]', "SO-3": None}
    assert store.pending_writes == 0, "what was read is in the file, not only in its buffer"
    assert [await file.downstream_id(order) for order in ("SO-1", "SO-5")] == ["d-1", None]
    assert await file.blocked_orders(["SO-2", "SO-3"]) == {"SO-2"}
    assert topic.entries[-1] == Entry(1, b"id:SO-5", b"d-5"), "nothing read is written back"


async def test_a_partition_read_again_is_read_from_where_the_files_last_read_ended() -> None:
    store, file, topic = shared()
    store.put_downstream_id("SO-1", "d-1", origin=at(0))
    await store.flush()
    assert (await store.restore([0])).entries == 1
    other = SharedStateStore(MemoryDedupStore(), topic)  # another instance, while this one does not hold 0
    other.block_order("SO-1", '["k1"]', origin=at(0))
    other.put_downstream_id("SO-2", "d-2", origin=at(1))
    await other.flush()
    restored = await store.restore([0, 1])
    assert restored.entries == 2, "SO-1's id is not read again; partition 1 from its beginning"
    assert restored.chains == {"SO-1": '["k1"]'}
    assert await file.downstream_id("SO-2") == "d-2"
    assert (await store.restore([0, 1])).entries == 0
    topic.failing = "not authorized"
    assert (await store.restore([0])).error == "not authorized"
    topic.failing = None
    assert (await store.restore([0])).entries == 0
    restarted = SharedStateStore(MemoryDedupStore(file.tables), topic)  # the same file, a new process
    assert (await restarted.restore([0, 1])).entries == 0, "a restart does not read every order again"
    assert (await SharedStateStore(MemoryDedupStore(), topic).restore([0, 1])).entries == 3, "a new file reads all"


class CutShort(FakeStateTopic):
    """A read that fails after its first batch (a broker gone mid-read, the read's time limit)."""

    async def read(self, partitions: Iterable[int], starts: Mapping[int, int]) -> AsyncIterator[Fetched]:
        async for fetched in super().read(partitions, starts):
            yield fetched
            if fetched.entries:
                raise SharedStateError("partitions not read within 120 s")


async def test_a_read_cut_short_keeps_what_it_flushed_and_the_next_goes_on_from_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(order_state, "RESTORE_FLUSH_EVERY", 2)
    file, topic = MemoryDedupStore(), CutShort()
    writer = SharedStateStore(MemoryDedupStore(), topic)
    for n in range(5):
        writer.put_downstream_id(f"SO-{n}", f"d-{n}", origin=at(0 if n < 3 else 1))
    writer.block_order("SO-1", '["k1"]', origin=at(0))
    await writer.flush()
    store = SharedStateStore(file, topic)
    restored = await store.restore([0, 1])
    assert restored.error == "partitions not read within 120 s"
    assert (restored.entries, restored.chains) == (4, {"SO-1": '["k1"]'}), "the engine's view takes what was read"
    assert file.pending_writes == 0, "what the read took is flushed all the same"
    assert file.tables.read_to == {(topic.topic, 0): 4}, "partition 0's read is in the file with its entries"
    assert file.tables.downstream_ids == {"SO-0": "d-0", "SO-1": "d-1", "SO-2": "d-2"}
    assert file.tables.blocked_orders == {"SO-1": '["k1"]'}
    restored = await store.restore([0, 1])  # partition 0 has nothing new; partition 1's entries, then the failure
    assert (restored.entries, restored.error) == (2, "partitions not read within 120 s")
    assert file.tables.read_to == {(topic.topic, 0): 4, (topic.topic, 1): 2}
    assert await store.restore([0, 1]) == order_state.Restored(0, {})


async def test_a_position_is_kept_only_after_the_flush_of_its_entries() -> None:
    class FailingFile(MemoryDedupStore):
        failing = False

        async def flush(self) -> int:
            if self.failing:
                raise StoreError("disk full")
            return await super().flush()

    file, topic = FailingFile(), FakeStateTopic()
    topic.entries = [Entry(0, b"id:SO-1", b"d-1")]
    file.failing = True
    restored = await SharedStateStore(file, topic).restore([0])
    assert restored.error == "disk full"
    assert file.tables.read_to == {}
    assert file.tables.downstream_ids == {}
    assert await file.read_to(topic.topic) == {}, "no position waits in the buffer either: its entries are not durable"
    file.failing = False
    assert (await SharedStateStore(file, topic).restore([0])).entries == 1


async def test_a_read_leaves_this_instances_own_newer_entries_that_the_topic_has_not_yet() -> None:
    store, file, topic = shared()
    store.block_order("SO-2", '["k1"]', origin=at(0))
    await store.flush()  # the block is on the topic
    store.unblock_order("SO-2", origin=at(0))  # replayed; the commit's flush fails: the tombstone waits
    topic.failing = "not acknowledged within 10 s"
    with pytest.raises(StoreError):
        await store.flush()
    topic.failing = None
    restored = await store.restore([0])  # the partition assigned again (an eager rebalance), read from its start
    assert restored.chains == {}, "the topic's older block is not the order's state"
    assert await file.blocked_orders(["SO-2"]) == set()
    await store.flush()
    assert topic.entries[-1] == Entry(0, b"block:SO-2", None)


class FailsFirstWrite(FakeStateTopic):
    async def write(self, entries: Sequence[Entry]) -> None:
        self.failing, first = None, self.failing
        await asyncio.sleep(0)
        if first is not None:
            raise SharedStateError(first)
        await super().write(entries)


async def test_an_older_entry_whose_write_failed_is_not_put_back_over_a_newer_one_being_written() -> None:
    topic = FailsFirstWrite()
    store = SharedStateStore(MemoryDedupStore(), topic)
    store.block_order("SO-2", '["k1"]', origin=at(0))
    topic.failing = "broker gone"
    first = asyncio.create_task(store.flush())  # takes the block, and fails
    await asyncio.sleep(0)
    store.unblock_order("SO-2", origin=at(0))
    second = asyncio.create_task(store.flush())  # takes the unblock, waits for the first write
    with pytest.raises(StoreError):
        await first
    await second
    await store.flush()
    assert topic.entries == [Entry(0, b"block:SO-2", None)], "the stale block never follows the unblock"


async def test_a_topic_made_again_is_read_from_its_beginning_and_the_files_position_starts_over() -> None:
    store, file, topic = shared()
    topic.entries = [Entry(0, f"id:SO-{n}".encode(), b"d") for n in range(3)]
    assert (await store.restore([0])).entries == 3
    topic.entries = []  # deleted and made again: empty, its offsets begin at 0
    assert (await store.restore([0])).entries == 0
    assert await file.read_to(topic.topic) == {0: 0}, "not 3: what the new topic takes first is read next time"
    topic.entries = [Entry(0, b"id:SO-7", b"d-7")]
    assert (await store.restore([0])).entries == 1
    assert await file.downstream_id("SO-7") == "d-7"


async def test_a_read_that_fails_says_why() -> None:
    store, _, topic = shared()
    topic.failing = "not authorized to read orders.state.crm"
    assert await store.restore([0, 1]) == order_state.Restored(0, {}, "not authorized to read orders.state.crm")


def test_a_record_of_the_topic_is_read_only_if_orderbus_could_have_written_it() -> None:
    assert decode_entry(b"id:SO-1", b"d-1") == ("id:", "SO-1", "d-1")
    assert decode_entry(b"block:SO-1", None) == ("block:", "SO-1", None)
    assert decode_entry(b"block:SO-1", b'["k"]') == ("block:", "SO-1", '["k"]')
    for key, value in [(None, b"x"), (b"id:", b"x"), (b"id:SO-1", None), (b"\xff", b"x"), (b"id:SO-1", b"\xff")]:
        assert decode_entry(key, value) is None


def test_the_view_of_blocks_takes_what_the_topic_says_over_what_it_knew() -> None:
    blocks = Blocks(MemoryDedupStore())
    blocks.learn({"SO-1": '["k1"]', "SO-2": '["k2"]'}, since=blocks.epoch)
    since = blocks.epoch
    blocks.restore({"SO-1": None, "SO-3": '["k3","k4"]'})
    assert (blocks.chain("SO-1"), blocks.chain("SO-2"), blocks.chain("SO-3")) == (None, ["k2"], ["k3", "k4"])
    blocks.learn({"SO-1": '["k1"]'}, since=since)  # a lookup begun before the read: older than it
    assert blocks.chain("SO-1") is None
