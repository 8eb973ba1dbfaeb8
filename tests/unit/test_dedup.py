"""The per-sink delivery-state table: both stores give the same answers; the SQLite one also survives kills."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from consumers import dedup, dedup_sql
from consumers.dedup import (
    BLOCKED_ORDER_COLUMNS,
    BLOCKED_ORDERS_TABLE,
    DELIVERIES_TABLE,
    DELIVERY_COLUMNS,
    DOWNSTREAM_ID_COLUMNS,
    DOWNSTREAM_IDS_TABLE,
    DedupStore,
    DeliveryState,
    DeliveryStatus,
    MemoryDedupStore,
    MemoryTables,
    SqliteDedupStore,
    StateFile,
)
from consumers.dedup_sql import LAYOUT, SCHEMA, check_layout
from consumers.sqlite_files import MAX_VARIABLES, ROW_STEP
from topics.errors import ConfigError, StoreError

REPO_ROOT = Path(__file__).resolve().parents[2]


def of(*keys: str, order_ref: str = "SO-1001") -> dict[str, str]:
    """What `get_many` takes: each key with the order number `state` gives it by default."""
    return dict.fromkeys(keys, order_ref)


def state(
    key: str = "crm:evt-1",
    *,
    status: DeliveryStatus = "done",
    order_ref: str = "SO-1001",
    updated_at: float = 100.0,
    attempts: int = 1,
) -> DeliveryState:
    return DeliveryState(
        key=key,
        event_id=f"evt-of-{key}",
        order_ref=order_ref,
        status=status,
        attempts=attempts,
        last_status=201 if status == "done" else None,
        first_attempt_at=updated_at - 1.0,
        last_attempt_at=updated_at,
        downstream_id="crm-77" if status == "done" else None,
        reply_digest="ab" * 32 if status == "done" else None,
        reason="retries exhausted" if status == "dead" else None,
        updated_at=updated_at,
    )


class Backend:
    """Makes stores over one durable "file": a second store is what a restarted process would see."""

    def __init__(self, kind: str, path: Path) -> None:
        self.kind = kind
        self.path = path
        self.tables = MemoryTables()

    def new(self) -> StateFile:
        if self.kind == "memory":
            return MemoryDedupStore(self.tables)
        return SqliteDedupStore(self.path)


@pytest.fixture(params=["sqlite", "memory"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return Backend(request.param, tmp_path / "crm.dedup.sqlite3")


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[StateFile]:
    async with backend.new() as opened:
        yield opened


# --- buffering --------------------------------------------------------------------------------------------


async def test_a_buffered_put_is_invisible_to_another_store_until_flushed(backend: Backend) -> None:
    async with backend.new() as writer, backend.new() as reader:
        writer.put(state("k1"))
        assert writer.pending_writes == 1
        assert await reader.get_many(of("k1")) == {}
        assert await writer.flush() == 1
        assert writer.pending_writes == 0
        assert await reader.get_many(of("k1")) == {"k1": state("k1")}


async def test_reads_see_buffered_writes(store: DedupStore) -> None:
    store.put(state("k1", status="in_flight"))
    assert await store.get_many(of("k1", "unknown")) == {"k1": state("k1", status="in_flight")}
    await store.flush()
    store.put(state("k1", status="done", updated_at=200.0))  # buffered over a flushed row
    assert await store.get_many(of("k1")) == {"k1": state("k1", status="done", updated_at=200.0)}


async def test_the_last_put_per_key_wins_and_is_written_once(store: DedupStore) -> None:
    store.put(state("k1", status="in_flight", attempts=1))
    store.put(state("k1", status="in_flight", attempts=2))
    store.put(state("k1", status="dead", attempts=3))
    store.put(state("k2"))
    assert store.pending_writes == 2
    assert await store.flush() == 2
    got = await store.get_many(of("k1", "k2"))
    assert got["k1"] == state("k1", status="dead", attempts=3)


async def test_flush_with_nothing_buffered_writes_nothing(store: DedupStore) -> None:
    assert await store.flush() == 0


async def test_get_many_of_no_keys_and_of_a_key_under_another_order(store: DedupStore) -> None:
    store.put(state("k1"))
    assert await store.get_many({}) == {}
    await store.flush()
    assert await store.get_many(of("k1")) == {"k1": state("k1")}
    assert await store.get_many({"k1": "SO-ANOTHER"}) == {}  # a key is looked up under its order number


async def test_get_many_answers_a_batch_larger_than_sqlites_variable_limit(store: DedupStore) -> None:
    with contextlib.closing(sqlite3.connect(":memory:")) as probe:
        limit = probe.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)  # this build's; 32,766 or 250,000 commonly
    keys = [f"crm:evt-{i}" for i in range(limit + 10)]
    for key in keys[::1000]:
        store.put(state(key))
    await store.flush()
    store.put(state("crm:evt-7"))
    got = await store.get_many(of(*keys))
    assert sorted(got) == sorted([*keys[::1000], "crm:evt-7"])


async def test_flushes_of_any_size_write_every_state_and_downstream_id(backend: Backend) -> None:
    sizes = [1, 2, 63, 64, 65, 83, 84, 140, 511, 1000]
    async with backend.new() as writer:
        for size in sizes:
            for i in range(size):
                writer.put(state(f"crm:{size}-{i}", order_ref=f"SO-{size}-{i}"))
                writer.put_downstream_id(f"SO-{size}-{i}", f"crm-{size}-{i}")
            assert await writer.flush() == 2 * size
    async with backend.new() as reader:
        keys = {f"crm:{size}-{i}": f"SO-{size}-{i}" for size in sizes for i in range(size)}
        got = await reader.get_many(keys)
        assert sorted(got) == sorted(keys)
        assert got["crm:140-139"] == state("crm:140-139", order_ref="SO-140-139")
        assert await reader.downstream_id("SO-1000-999") == "crm-1000-999"
        assert await reader.downstream_id("SO-65-64") == "crm-65-64"


async def test_flushes_of_every_size_use_few_statement_texts(tmp_path: Path) -> None:
    # A connection caches 128 prepared statements; a text per row count would be prepared again on most flushes.
    traced: list[str] = []  # as run, with the values bound
    async with SqliteDedupStore(tmp_path / "crm.dedup.sqlite3") as store:
        await store._on_thread(lambda db: db.set_trace_callback(traced.append))  # the writer's thread
        for size in range(1, 301):
            for i in range(size):
                store.put(state(f"crm:{size}-{i}", order_ref=f"SO-{size}-{i}"))
                store.put_downstream_id(f"SO-{size}-{i}", f"crm-{size}-{i}")
            await store.flush()
    per_flush: list[dict[str, list[int]]] = []  # row counts of each table's statements, flush by flush
    for text in traced:
        if text == "BEGIN IMMEDIATE":
            per_flush.append({DELIVERIES_TABLE: [], DOWNSTREAM_IDS_TABLE: []})
        for table, counts in per_flush[-1].items():
            if text.lstrip().startswith(f"INSERT INTO {table} "):
                counts.append(text.count("), (") + 1)
    assert len(per_flush) == 300
    most = MAX_VARIABLES // len(DELIVERY_COLUMNS) // ROW_STEP * ROW_STEP  # 72 rows of 13 columns
    for size, flush in enumerate(per_flush, start=1):
        assert sum(flush[DELIVERIES_TABLE]) == sum(flush[DOWNSTREAM_IDS_TABLE]) == size
        assert len(flush[DELIVERIES_TABLE]) <= size // most + 2, "as many rows as fit, then two statements at most"
        assert len(flush[DOWNSTREAM_IDS_TABLE]) <= 2
    texts = {
        table: {n for flush in per_flush for n in flush[table]} for table in (DELIVERIES_TABLE, DOWNSTREAM_IDS_TABLE)
    }
    assert texts[DELIVERIES_TABLE] == {most, *range(8, most, 8), *range(1, 8)}
    assert texts[DOWNSTREAM_IDS_TABLE] == {*range(8, 301, 8), *range(1, 8)}


async def test_every_field_round_trips(backend: Backend) -> None:
    full = DeliveryState(
        key="shipping:5f0c",
        event_id="5f0c6a56-9c7e-4d55-a6a4-1b1f8d1f0c11",
        order_ref="SO-2024-0001",
        status="duplicate",
        attempts=4,
        last_status=409,
        first_attempt_at=1_718_000_000.25,
        last_attempt_at=1_718_000_012.5,
        downstream_id="shp_91",
        reply_digest="0f" * 32,
        reason="409 already exists",
        updated_at=1_718_000_012.75,
    )
    empty = dataclasses.replace(
        full,
        key="shipping:none",
        status="in_flight",
        last_status=None,
        first_attempt_at=None,
        last_attempt_at=None,
        downstream_id=None,
        reply_digest=None,
        reason=None,
    )
    async with backend.new() as writer:
        writer.put(full)
        writer.put(empty)
    async with backend.new() as reader:
        assert await reader.get_many({full.key: full.order_ref, empty.key: empty.order_ref}) == {
            full.key: full,
            empty.key: empty,
        }


async def test_close_flushes(backend: Backend) -> None:
    async with backend.new() as writer:
        writer.put(state("k1"))
        writer.put_downstream_id("SO-1001", "crm-77")
        writer.block_order("SO-9", "dead-lettered: 422")
    async with backend.new() as reader:
        assert await reader.get_many(of("k1")) == {"k1": state("k1")}
        assert await reader.downstream_id("SO-1001") == "crm-77"
        assert await reader.blocked_orders(["SO-9"]) == {"SO-9"}


async def test_a_put_during_a_flush_stays_buffered(backend: Backend) -> None:
    async with backend.new() as writer, backend.new() as reader:
        writer.put(state("k1", status="in_flight"))

        async def put_newer() -> None:
            writer.put(state("k1", status="done", updated_at=200.0))

        # gather runs the flush up to its first await (the batch is taken), then the put.
        written, _ = await asyncio.gather(writer.flush(), put_newer())
        assert written == 1
        assert writer.pending_writes == 1
        assert (await writer.get_many(of("k1")))["k1"].status == "done"
        assert (await reader.get_many(of("k1")))["k1"].status == "in_flight"
        await writer.flush()
        assert (await reader.get_many(of("k1")))["k1"].status == "done"


# --- downstream ids and blocked orders --------------------------------------------------------------------


async def test_downstream_ids_are_buffered_read_back_and_replaced(backend: Backend) -> None:
    async with backend.new() as writer, backend.new() as reader:
        assert await writer.downstream_id("SO-1001") is None
        writer.put_downstream_id("SO-1001", "crm-77")
        assert await writer.downstream_id("SO-1001") == "crm-77"
        assert await reader.downstream_id("SO-1001") is None
        assert await writer.flush() == 1
        assert await reader.downstream_id("SO-1001") == "crm-77"
        writer.put_downstream_id("SO-1001", "crm-78")
        assert await writer.downstream_id("SO-1001") == "crm-78"
        await writer.flush()
        assert await reader.downstream_id("SO-1001") == "crm-78"


async def test_states_and_downstream_ids_flush_in_one_call(backend: Backend) -> None:
    async with backend.new() as writer, backend.new() as reader:
        writer.put(state("k1"))
        writer.put_downstream_id("SO-1001", "crm-77")
        writer.block_order("SO-2", "dead-lettered")
        assert writer.pending_writes == 3
        assert await writer.flush() == 3
        assert await reader.get_many(of("k1")) == {"k1": state("k1")}
        assert await reader.downstream_id("SO-1001") == "crm-77"
        assert await reader.blocked_orders(["SO-2"]) == {"SO-2"}


async def test_blocked_orders_until_unblocked(backend: Backend) -> None:
    async with backend.new() as writer, backend.new() as reader:
        writer.block_order("SO-1", "dead-lettered predecessor crm:evt-1")
        writer.block_order("SO-2", "422")
        assert await writer.blocked_orders(["SO-1", "SO-2", "SO-3"]) == {"SO-1", "SO-2"}
        assert await reader.blocked_orders(["SO-1", "SO-2"]) == set()
        await writer.flush()
        assert await reader.blocked_orders(["SO-1", "SO-2", "SO-3"]) == {"SO-1", "SO-2"}
        writer.unblock_order("SO-1")  # replayed
        assert await writer.blocked_orders(["SO-1", "SO-2"]) == {"SO-2"}  # buffered unblock is seen
        assert await reader.blocked_orders(["SO-1"]) == {"SO-1"}
        await writer.flush()
        assert await reader.blocked_orders(["SO-1", "SO-2"]) == {"SO-2"}


async def test_how_far_a_state_topic_was_read_is_buffered_flushed_and_kept_per_topic(backend: Backend) -> None:
    async with backend.new() as writer, backend.new() as reader:
        writer.put_read_to("orders.state.crm", 0, 5)
        writer.put_read_to("orders.state.crm", 0, 9)  # the last write wins
        writer.put_read_to("orders.state.crm", 3, 2)
        writer.put_read_to("other.orders.state.crm", 0, 70)  # another topic's (a prefix changed): apart
        assert await writer.read_to("orders.state.crm") == {0: 9, 3: 2}
        assert await reader.read_to("orders.state.crm") == {}
        assert writer.pending_writes == 3
        await writer.flush()
        assert await reader.read_to("orders.state.crm") == {0: 9, 3: 2}
        assert await reader.read_to("other.orders.state.crm") == {0: 70}
        assert await reader.read_to("orders.state.shipping") == {}
    async with backend.new() as restarted:
        assert await restarted.read_to("orders.state.crm") == {0: 9, 3: 2}


async def test_the_outbox_keeps_entries_for_the_state_topic_until_they_are_dropped(backend: Backend) -> None:
    async with backend.new() as writer:
        for n in range(700):  # more than one statement's rows
            writer.put_outbox((f"id:SO-{n}".encode(), n % 12, f"d-{n}".encode(), "orders", n))
        writer.put_outbox((b"block:SO-1", 3, None, "orders.replay.crm", 4))  # a tombstone
        await writer.flush()
        writer.drop_outbox(b"id:SO-5")
        writer.drop_outbox(b"id:SO-6")
        writer.put_outbox((b"id:SO-6", 6, b"d-6b", "orders.replay.crm", 9))  # sent, then written again: it stays
        writer.put_outbox((b"id:SO-7", 7, b"d-7b", "orders", 7))
        writer.drop_outbox(b"id:SO-7")  # its last entry sent before any flush: never written
        await writer.flush()
    async with backend.new() as restarted:
        kept = {
            key: (partition, value, topic, offset) for key, partition, value, topic, offset in await restarted.outbox()
        }
    assert len(kept) == 700 - 2 + 1
    assert kept[b"id:SO-6"] == (6, b"d-6b", "orders.replay.crm", 9)
    assert kept[b"block:SO-1"] == (3, None, "orders.replay.crm", 4)
    assert b"id:SO-5" not in kept
    assert b"id:SO-7" not in kept
    assert kept[b"id:SO-699"] == (699 % 12, b"d-699", "orders", 699)


async def test_a_block_written_by_another_store_is_seen_after_an_empty_table_was(backend: Backend) -> None:
    async with backend.new() as writer, backend.new() as reader:
        assert await reader.blocking(["SO-1"]) == {}
        assert await reader.blocked_orders(["SO-1"]) == set()
        writer.block_order("SO-1", "422")
        await writer.flush()
        assert await reader.blocking(["SO-1", "SO-2"]) == {"SO-1": "422"}
        assert await reader.blocked_orders(["SO-1", "SO-2"]) == {"SO-1"}


async def test_block_then_unblock_before_a_flush_leaves_the_order_unblocked(store: DedupStore) -> None:
    store.block_order("SO-1", "422")
    store.unblock_order("SO-1")
    store.unblock_order("SO-never-blocked")
    assert store.pending_writes == 2
    await store.flush()
    assert await store.blocked_orders(["SO-1", "SO-never-blocked"]) == set()


async def test_blocked_orders_answers_many_orders_at_once(store: DedupStore) -> None:
    refs = [f"SO-{i}" for i in range(2_000)]
    for ref in refs[::7]:
        store.block_order(ref, "422")
    await store.flush()
    assert await store.blocked_orders(refs) == set(refs[::7])


# --- prune ------------------------------------------------------------------------------------------------


async def test_prune_deletes_terminal_rows_updated_strictly_before_the_cutoff(store: DedupStore) -> None:
    terminal: list[tuple[str, DeliveryStatus]] = [("done", "done"), ("dup", "duplicate"), ("dead", "dead")]
    for key, status in terminal:
        store.put(state(key, status=status, updated_at=100.0))
    store.put(state("newer", updated_at=200.0))
    assert await store.prune(older_than=100.0) == 0
    assert await store.prune(older_than=100.5) == 3
    assert await store.prune(older_than=100.5) == 0
    assert sorted(await store.get_many(of("done", "dup", "dead", "newer"))) == ["newer"]


async def test_prune_never_deletes_in_flight_rows(store: DedupStore) -> None:
    store.put(state("k1", status="in_flight", updated_at=1.0))
    await store.flush()
    assert await store.prune(older_than=1e12) == 0
    assert (await store.get_many(of("k1")))["k1"].status == "in_flight"


async def test_prune_sees_buffered_writes(store: DedupStore) -> None:
    store.put(state("old", updated_at=10.0))
    store.put(state("in-flight", status="in_flight", updated_at=10.0))
    assert await store.prune(older_than=50.0) == 1
    assert store.pending_writes == 0
    assert sorted(await store.get_many(of("old", "in-flight"))) == ["in-flight"]


async def test_prune_keeps_downstream_ids_of_orders_with_a_row_left(store: DedupStore) -> None:
    # SO-OLD: only old rows -> its id goes. SO-LIVE: an old row and a newer one -> kept.
    # SO-RETRYING: an old row and an old in-flight one -> kept. SO-BLOCKED: blocks are never pruned.
    store.put(state("old-1", order_ref="SO-OLD", updated_at=10.0))
    store.put(state("live-1", order_ref="SO-LIVE", updated_at=10.0))
    store.put(state("live-2", order_ref="SO-LIVE", updated_at=100.0))
    store.put(state("retry-1", order_ref="SO-RETRYING", updated_at=10.0))
    store.put(state("retry-2", order_ref="SO-RETRYING", status="in_flight", updated_at=10.0))
    store.put(state("blocked-1", order_ref="SO-BLOCKED", status="dead", updated_at=10.0))
    for ref in ("SO-OLD", "SO-LIVE", "SO-RETRYING"):
        store.put_downstream_id(ref, f"id-{ref}")
    store.block_order("SO-BLOCKED", "422")
    assert await store.prune(older_than=100.0) == 4
    assert await store.downstream_id("SO-OLD") is None
    assert await store.downstream_id("SO-LIVE") == "id-SO-LIVE"
    assert await store.downstream_id("SO-RETRYING") == "id-SO-RETRYING"
    assert await store.blocked_orders(["SO-BLOCKED"]) == {"SO-BLOCKED"}


async def test_prune_keeps_the_downstream_id_of_a_blocked_order_whose_rows_are_all_pruned(store: DedupStore) -> None:
    # Found in review: dead letters outlive delivery rows (720 h against 168 h), and an update replayed after its
    # order's rows were pruned had no id to address the downstream object with.
    store.put(state("create", order_ref="SO-1", updated_at=1.0))
    store.put_downstream_id("SO-1", "crm-77")
    store.put(state("update", order_ref="SO-1", status="dead", updated_at=2.0))
    store.block_order("SO-1", '["update"]')
    store.put(state("other", order_ref="SO-2", updated_at=1.0))
    store.put_downstream_id("SO-2", "crm-78")
    assert await store.prune(older_than=1000.0) == 3
    assert await store.blocking(["SO-1"]) == {"SO-1": '["update"]'}
    assert await store.downstream_id("SO-1") == "crm-77"
    assert await store.downstream_id("SO-2") is None, "an order neither live nor blocked loses its id"
    store.unblock_order("SO-1")  # replayed and delivered: the id goes with the next prune
    assert await store.prune(older_than=1000.0) == 0
    assert await store.downstream_id("SO-1") is None


async def test_a_prune_deletes_a_chunk_a_transaction_and_another_writer_gets_in_between(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `orderbus dedup prune` beside a running daemon (operator's experiment): 5 million rows in one transaction
    # held the write lock 15-18 s, the daemon's flush gave up after its 5 s busy timeout and the daemon stopped.
    path = tmp_path / "dedup.sqlite"
    monkeypatch.setattr(dedup, "PRUNE_CHUNK", 3)
    chunks: list[object] = []
    other = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)  # waits for no lock

    def chunked(step: Callable[..., object]) -> Callable[..., object]:
        def run(db: sqlite3.Connection, *args: object) -> object:
            result = step(db, *args)
            other.execute(f"INSERT INTO {BLOCKED_ORDERS_TABLE} VALUES (?, 'x')", (f"W-{len(chunks)}",))  # noqa: S608
            chunks.append(result)
            return result

        return run

    monkeypatch.setattr(dedup, "delete_prunable_states", chunked(dedup_sql.delete_prunable_states))
    monkeypatch.setattr(dedup, "delete_unneeded_ids", chunked(dedup_sql.delete_unneeded_ids))
    async with SqliteDedupStore(path) as store:
        store.prune_pause = 0.0
        for n in range(10):
            store.put(state(f"k{n}", order_ref=f"SO-{n:02d}", updated_at=10.0))
            store.put_downstream_id(f"SO-{n:02d}", f"id-{n}")
        store.put(state("live", order_ref="SO-05", updated_at=500.0))
        assert await store.prune(older_than=100.0) == 10
        assert chunks == [3, 3, 3, 1, "SO-02", "SO-05", "SO-08", None], "a short chunk is the last"
        assert await store.downstream_id("SO-05") == "id-5", "an order with a row left keeps its id"
        assert [await store.downstream_id(f"SO-{n:02d}") for n in (0, 4, 9)] == [None, None, None]
    other.close()


# --- integrity --------------------------------------------------------------------------------------------


async def test_integrity_check_is_ok(store: DedupStore) -> None:
    store.put(state("k1"))
    await store.flush()
    assert await store.integrity_check() == "ok"


# --- memory only ------------------------------------------------------------------------------------------


async def test_memory_crash_drops_only_unflushed_writes() -> None:
    store = MemoryDedupStore()
    store.put(state("flushed"))
    store.put_downstream_id("SO-1", "crm-1")
    await store.flush()
    store.put(state("flushed", status="dead", updated_at=300.0))
    store.put(state("lost"))
    store.put_downstream_id("SO-2", "crm-2")
    store.block_order("SO-3", "422")
    store.crash()
    assert store.pending_writes == 0
    assert await store.get_many(of("flushed", "lost")) == {"flushed": state("flushed")}
    assert await store.downstream_id("SO-2") is None
    assert await store.blocked_orders(["SO-3"]) == set()
    assert store.tables.deliveries == {"flushed": state("flushed")}


# --- SQLite only: the file --------------------------------------------------------------------------------


def test_column_constants_are_the_fields_of_delivery_state_in_order() -> None:
    assert tuple(f.name for f in dataclasses.fields(DeliveryState)) == DELIVERY_COLUMNS


async def test_the_file_is_wal_with_the_named_tables_and_columns(tmp_path: Path) -> None:
    path = tmp_path / "crm.dedup.sqlite3"
    async with SqliteDedupStore(path):
        pass
    with sqlite3.connect(path) as plain:
        assert plain.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        columns = {
            table: tuple(row[1] for row in plain.execute(f"PRAGMA table_info({table})"))
            for table in (DELIVERIES_TABLE, DOWNSTREAM_IDS_TABLE, BLOCKED_ORDERS_TABLE)
        }
    plain.close()
    assert columns == {
        DELIVERIES_TABLE: DELIVERY_COLUMNS,
        DOWNSTREAM_IDS_TABLE: DOWNSTREAM_ID_COLUMNS,
        BLOCKED_ORDERS_TABLE: BLOCKED_ORDER_COLUMNS,
    }


async def test_a_file_from_an_earlier_version_loses_its_order_ref_index(tmp_path: Path) -> None:
    """Every flush paid for that index (a random page per row); opening the file drops it, the rows stay."""
    path = tmp_path / "crm.dedup.sqlite3"
    async with SqliteDedupStore(path) as store:
        store.put(state("k1", order_ref="SO-1"))
    with contextlib.closing(sqlite3.connect(path)) as plain:
        plain.execute(f"CREATE INDEX {DELIVERIES_TABLE}_order_ref ON {DELIVERIES_TABLE} (order_ref)")
        plain.commit()
    async with SqliteDedupStore(path) as store:
        assert (await store.get_many({"k1": "SO-1"}))["k1"].order_ref == "SO-1"
    with contextlib.closing(sqlite3.connect(path)) as plain:
        indexes = {row[1] for row in plain.execute(f"PRAGMA index_list({DELIVERIES_TABLE})")}
    assert f"{DELIVERIES_TABLE}_order_ref" not in indexes
    assert f"{DELIVERIES_TABLE}_prunable" in indexes


# The deliveries table as it was before its unique index moved to (order number, key): unique by key.
_BY_KEY_SCHEMA = f"""
CREATE TABLE {DELIVERIES_TABLE} (
    key              TEXT NOT NULL PRIMARY KEY,
    event_id         TEXT NOT NULL,
    order_ref        TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('in_flight', 'done', 'duplicate', 'dead')),
    attempts         INTEGER NOT NULL,
    last_status      INTEGER,
    first_attempt_at REAL,
    last_attempt_at  REAL,
    downstream_id    TEXT,
    reply_digest     TEXT,
    reason           TEXT,
    updated_at       REAL NOT NULL
);
CREATE INDEX {DELIVERIES_TABLE}_prunable ON {DELIVERIES_TABLE} (updated_at) WHERE status <> 'in_flight';
"""


def delivery_indexes(path: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (columns, origin) of the deliveries table's indexes, as another connection sees the file."""
    with contextlib.closing(sqlite3.connect(path)) as plain:
        listed = plain.execute(f"PRAGMA index_list({DELIVERIES_TABLE})").fetchall()
        return {
            name: ([row[2] for row in plain.execute(f"PRAGMA index_info({name})")], origin)
            for _, name, _, origin, _ in listed
        }


async def test_the_unique_index_is_on_order_number_and_key_not_the_key_alone(tmp_path: Path) -> None:
    path = tmp_path / "crm.dedup.sqlite3"
    async with SqliteDedupStore(path):
        pass
    indexes = delivery_indexes(path)
    assert indexes[f"{DELIVERIES_TABLE}_order_key"] == (["order_ref", "key"], "c")
    assert all(columns != ["key"] for columns, _ in indexes.values())


async def test_a_file_unique_by_key_is_rebuilt_at_open_and_keeps_every_row(tmp_path: Path) -> None:
    path = tmp_path / "crm.dedup.sqlite3"
    rows = [state("k1", order_ref="SO-1"), state("k2", order_ref="SO-2", status="in_flight", updated_at=5.0)]
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as old:
        old.execute("PRAGMA journal_mode = WAL")
        old.executescript(_BY_KEY_SCHEMA)
        marks = ", ".join("?" * len(_EARLIER_COLUMNS))
        old.executemany(
            f"INSERT INTO {DELIVERIES_TABLE} VALUES ({marks})",  # noqa: S608 -- constant
            [dataclasses.astuple(row)[: len(_EARLIER_COLUMNS)] for row in rows],
        )
    async with SqliteDedupStore(path) as store:
        assert await store.get_many({"k1": "SO-1", "k2": "SO-2"}) == {"k1": rows[0], "k2": rows[1]}
        assert await store.prune(older_than=200.0) == 1  # the done row; the in-flight one stays
        store.put(state("k2", order_ref="SO-2"))  # an upsert on the new unique index
        assert await store.flush() == 1
        assert await store.get_many({"k2": "SO-2"}) == {"k2": state("k2", order_ref="SO-2")}
    indexes = delivery_indexes(path)
    assert indexes[f"{DELIVERIES_TABLE}_order_key"] == (["order_ref", "key"], "c")
    assert f"{DELIVERIES_TABLE}_prunable" in indexes
    assert all(origin != "pk" for _, origin in indexes.values())
    with contextlib.closing(sqlite3.connect(path)) as plain:
        tables = {name for (name,) in plain.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert f"{DELIVERIES_TABLE}_by_key" not in tables


# The layout before the event type was kept: the current one without its last column.
_EARLIER_COLUMNS = DELIVERY_COLUMNS[: DELIVERY_COLUMNS.index("event_type")]


async def test_a_file_without_event_types_gains_the_column_at_open_and_keeps_every_row(tmp_path: Path) -> None:
    path = tmp_path / "crm.dedup.sqlite3"
    async with SqliteDedupStore(path):
        pass
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as old:
        old.execute(f"ALTER TABLE {DELIVERIES_TABLE} DROP COLUMN event_type")
        marks = ", ".join("?" * len(_EARLIER_COLUMNS))
        row = dataclasses.astuple(state("k1", order_ref="SO-1"))[: len(_EARLIER_COLUMNS)]
        old.execute(f"INSERT INTO {DELIVERIES_TABLE} VALUES ({marks})", row)  # noqa: S608 -- constant
    with contextlib.closing(sqlite3.connect(path)) as plain, pytest.raises(StoreError, match="earlier orderbus"):
        check_layout(plain)  # what a read-only reader says of it
    async with SqliteDedupStore(path) as store:
        assert await store.get_many({"k1": "SO-1"}) == {"k1": state("k1", order_ref="SO-1")}  # event_type None
        cancelled = dataclasses.replace(state("k2", order_ref="SO-1"), event_type="order.cancelled")
        store.put(cancelled)
        assert await store.flush() == 1
        assert await store.get_many({"k2": "SO-1"}) == {"k2": cancelled}
    with contextlib.closing(sqlite3.connect(path)) as plain:
        check_layout(plain)
    assert user_version(path) == LAYOUT, "stamped once brought up to date"


def user_version(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        return int(version)


async def test_a_file_is_stamped_with_its_layout_and_one_a_later_orderbus_wrote_is_refused(tmp_path: Path) -> None:
    # Review (operator): rolled back, an earlier orderbus opened a file of a later layout and every flush failed
    # ("ON CONFLICT clause does not match"), the daemon restarting for ever; nothing said which version wrote it.
    path = tmp_path / "crm.dedup.sqlite3"
    async with SqliteDedupStore(path):
        pass
    assert user_version(path) == LAYOUT
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute(f"PRAGMA user_version = {LAYOUT + 1}")
    message = rf"state_dir: dedup store {path} has layout {LAYOUT + 1}, written by a later orderbus"
    with pytest.raises(ConfigError, match=message):
        async with SqliteDedupStore(path):
            pass
    assert user_version(path) == LAYOUT + 1, "left as it was"
    with contextlib.closing(sqlite3.connect(path)) as plain, pytest.raises(ConfigError, match=message):
        check_layout(plain)  # `orderbus trace` and `reconcile` say the same


async def test_synchronous_full_is_accepted_and_anything_else_refused(tmp_path: Path) -> None:
    async with SqliteDedupStore(tmp_path / "full.sqlite3", synchronous="FULL") as store:
        store.put(state("k1"))
        assert await store.flush() == 1
    with pytest.raises(ConfigError, match="synchronous"):
        SqliteDedupStore(tmp_path / "x.sqlite3", synchronous="OFF")  # type: ignore[arg-type]


async def test_open_and_close_are_idempotent(tmp_path: Path) -> None:
    store = SqliteDedupStore(tmp_path / "crm.dedup.sqlite3")
    await store.open()
    await store.open()
    store.put(state("k1"))
    await store.close()
    await store.close()
    async with SqliteDedupStore(tmp_path / "crm.dedup.sqlite3") as reopened:
        assert await reopened.get_many(of("k1")) == {"k1": state("k1")}


async def test_using_a_closed_store_is_a_store_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "crm.dedup.sqlite3"
    store = SqliteDedupStore(path)
    with pytest.raises(StoreError, match="not open") as exc:
        store.put(state("k1"))  # refused at once: a write buffered in a closed store would be lost silently
    assert str(path) in str(exc.value)
    with pytest.raises(StoreError, match="not open"):
        await store.get_many(of("k1"))


async def test_a_corrupt_file_is_a_store_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "crm.dedup.sqlite3"
    path.write_bytes(b"this is not a database, just bytes " * 200)
    with pytest.raises(StoreError) as exc:
        await SqliteDedupStore(path).open()
    assert str(path) in str(exc.value)
    assert isinstance(exc.value.__cause__, sqlite3.Error)


async def test_a_failed_flush_writes_nothing_and_keeps_the_buffer(tmp_path: Path) -> None:
    path = tmp_path / "crm.dedup.sqlite3"
    async with SqliteDedupStore(path) as store:
        store.put(state("k1"))
        store.put_downstream_id("SO-1001", "crm-77")
        with sqlite3.connect(path) as vandal:
            vandal.execute(f"DROP TABLE {DOWNSTREAM_IDS_TABLE}")  # the second statement of the flush fails
        vandal.close()
        with pytest.raises(StoreError, match="flush failed") as exc:
            await store.flush()
        assert str(path) in str(exc.value)
        assert store.pending_writes == 2
        # The states written before the failing statement were rolled back. (Read with plain sqlite3: opening
        # another store would create the dropped table again.)
        with sqlite3.connect(path) as plain:
            rows = plain.execute(f"SELECT count(*) FROM {DELIVERIES_TABLE}").fetchall()  # noqa: S608 -- constant
        plain.close()
        assert rows == [(0,)]
        with pytest.raises(StoreError, match="flush failed"):
            await store.close()  # close still flushes, fails the same way, and closes anyway
    with pytest.raises(StoreError, match="not open"):
        await store.flush()


# The writer that gets killed: it flushes batches of 100 states (one order each, with a downstream id) and
# prints the number of each batch once its flush has returned.
_WRITER = """
import asyncio, sys
from consumers.dedup import DeliveryState, SqliteDedupStore

async def main() -> None:
    async with SqliteDedupStore(sys.argv[1]) as store:
        batch = 0
        while True:
            for i in range(100):
                store.put(DeliveryState(
                    key=f"{batch}:{i}", event_id=f"e{batch}:{i}", order_ref=f"SO-{batch}", status="done",
                    attempts=1, last_status=201, first_attempt_at=1.0, last_attempt_at=2.0,
                    downstream_id=f"d{batch}", reply_digest=None, reason=None, updated_at=float(batch),
                ))
            store.put_downstream_id(f"SO-{batch}", f"d{batch}")
            await store.flush()
            print(batch, flush=True)
            batch += 1

asyncio.run(main())
"""


async def test_flushes_do_not_wait_for_each_other_and_reads_see_writes_under_way(tmp_path: Path) -> None:
    async with SqliteDedupStore(tmp_path / "crm.dedup.sqlite3") as store:
        store.put(state("k1"))
        first = asyncio.ensure_future(store.flush())
        await asyncio.sleep(0)  # the first flush took the buffer and is on the connection's thread
        store.put(state("k2"))
        store.put_downstream_id("SO-1001", "crm-77")
        second = asyncio.ensure_future(store.flush())
        await asyncio.sleep(0)
        assert store.pending_writes == 3, "both batches under way, none confirmed yet"
        found = await store.get_many(of("k1", "k2"))
        assert sorted(found) == ["k1", "k2"]
        assert await store.downstream_id("SO-1001") == "crm-77"
        assert list(await asyncio.gather(first, second)) == [1, 2]
        assert store.pending_writes == 0


async def test_a_flush_called_while_an_earlier_one_fails_fails_too_and_the_writes_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "crm.dedup.sqlite3"
    async with SqliteDedupStore(path) as store:
        store.put_downstream_id("SO-1001", "crm-77")
        with sqlite3.connect(path) as vandal:
            vandal.execute(f"DROP TABLE {DOWNSTREAM_IDS_TABLE}")
        vandal.close()
        failing = asyncio.ensure_future(store.flush())
        await asyncio.sleep(0)
        store.put(state("k1"))
        later = asyncio.ensure_future(store.flush())  # its own write succeeds; the earlier one's does not
        results = await asyncio.gather(failing, later, return_exceptions=True)
        assert all(isinstance(result, StoreError) for result in results), results
        assert "an earlier write failed" in str(results[1])
        assert store.pending_writes == 1, "the failed write is buffered again"
        assert await store.downstream_id("SO-1001") == "crm-77"
        with pytest.raises(StoreError):
            await store.close()


def _file_rows(path: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]]]:
    """(key, status) of the deliveries, the downstream ids and the blocks in the file, read with plain sqlite3."""
    with sqlite3.connect(path) as plain:
        states = plain.execute(f"SELECT key, status FROM {DELIVERIES_TABLE}").fetchall()  # noqa: S608 -- constant
        ids = plain.execute(f"SELECT * FROM {DOWNSTREAM_IDS_TABLE}").fetchall()  # noqa: S608 -- constant
        blocks = plain.execute(f"SELECT * FROM {BLOCKED_ORDERS_TABLE}").fetchall()  # noqa: S608 -- constant
    plain.close()
    return states, ids, blocks


def _drop_downstream_ids(path: Path) -> None:
    """Make every flush that writes a downstream id fail (its table is gone) until `_restore_downstream_ids`."""
    with sqlite3.connect(path) as vandal:
        vandal.execute(f"DROP TABLE {DOWNSTREAM_IDS_TABLE}")
    vandal.close()


def _restore_downstream_ids(path: Path) -> None:
    with sqlite3.connect(path) as plain:
        plain.executescript(SCHEMA)  # CREATE ... IF NOT EXISTS: only the dropped table is made again
    plain.close()


async def test_two_failed_flushes_put_back_the_newer_write_not_the_older(tmp_path: Path) -> None:
    # A record's first attempt failed (in_flight, its order blocked); a retry was delivered (done, unblocked).
    # Both flushes fail; the older must not be put back over the newer, or the next flush writes in_flight
    # for a record whose offset is committed as done.
    path = tmp_path / "crm.dedup.sqlite3"
    async with SqliteDedupStore(path) as store:
        _drop_downstream_ids(path)
        store.put(state("k1", status="in_flight", updated_at=1.0))
        store.put_downstream_id("SO-1001", "crm-old")
        store.block_order("SO-1001", '["k1"]')
        first = asyncio.ensure_future(store.flush())
        await asyncio.sleep(0)  # the first batch is on the connection's thread
        store.put(state("k1", status="done", updated_at=2.0))
        store.put_downstream_id("SO-1001", "crm-new")
        store.unblock_order("SO-1001")
        second = asyncio.ensure_future(store.flush())
        results = await asyncio.gather(first, second, return_exceptions=True)
        _restore_downstream_ids(path)
        assert all(isinstance(result, StoreError) for result in results), results
        assert (await store.get_many(of("k1")))["k1"].status == "done"
        assert await store.downstream_id("SO-1001") == "crm-new"
        assert await store.blocked_orders(["SO-1001"]) == set()
        assert await store.flush() == 3, "the newer write of each key, once"
    assert _file_rows(path) == ([("k1", "done")], [("SO-1001", "crm-new")], [])


async def test_a_failed_flush_does_not_put_back_what_a_newer_flush_wrote(tmp_path: Path) -> None:
    # The same, but the newer flush succeeds: the file says done and unblocked; the older batch, put back,
    # would turn them back to in_flight and blocked at the next flush.
    path = tmp_path / "crm.dedup.sqlite3"
    async with SqliteDedupStore(path) as store:
        _drop_downstream_ids(path)
        store.put(state("k1", status="in_flight", updated_at=1.0))
        store.put_downstream_id("SO-9", "crm-9")  # makes this batch fail
        store.block_order("SO-1001", '["k1"]')
        first = asyncio.ensure_future(store.flush())
        await asyncio.sleep(0)
        store.put(state("k1", status="done", updated_at=2.0))
        store.unblock_order("SO-1001")
        second = asyncio.ensure_future(store.flush())
        await asyncio.gather(first, second, return_exceptions=True)
        _restore_downstream_ids(path)
        assert _file_rows(path) == ([("k1", "done")], [], [])
        assert store.pending_writes == 1, "only the downstream id nothing newer replaced is put back"
        assert await store.flush() == 1
        assert (await store.get_many(of("k1")))["k1"].status == "done"
        assert await store.blocked_orders(["SO-1001"]) == set()
    assert _file_rows(path) == ([("k1", "done")], [("SO-9", "crm-9")], [])


async def test_a_file_reopened_after_its_writer_was_killed_has_every_flushed_state(tmp_path: Path) -> None:
    path = tmp_path / "crm.dedup.sqlite3"
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WRITER, str(path), cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE
    )
    assert writer.stdout is not None
    last_reported = -1
    try:
        while last_reported < 30:
            line = await writer.stdout.readline()
            assert line, f"the writer exited early with {await writer.wait()}"
            last_reported = int(line)
    finally:
        writer.send_signal(signal.SIGKILL)  # mid-run: it keeps writing while we read
        await writer.wait()
    async with SqliteDedupStore(path) as reopened:
        assert await reopened.integrity_check() == "ok"
        for batch in range(last_reported + 1):
            keys = of(*(f"{batch}:{i}" for i in range(100)), order_ref=f"SO-{batch}")
            got = await reopened.get_many(keys)
            assert sorted(got) == sorted(keys), f"batch {batch} was flushed but is not complete"
            assert {s.order_ref for s in got.values()} == {f"SO-{batch}"}
            assert await reopened.downstream_id(f"SO-{batch}") == f"d{batch}"
        # A batch whose flush the kill interrupted is all there or not there at all.
        after = await reopened.get_many(
            of(*(f"{last_reported + 1}:{i}" for i in range(100)), order_ref=f"SO-{last_reported + 1}")
        )
        assert len(after) in (0, 100)


async def test_a_state_file_and_its_wal_are_for_their_owner_alone_whatever_the_umask(tmp_path: Path) -> None:
    # Review (security): with umask 022 they were -rw-r--r--, and a group-readable state_dir (a volume mount, fsGroup)
    # showed order numbers and idempotency keys to others.
    path = tmp_path / "dedup-crm.sqlite"
    before = os.umask(0o022)
    try:
        async with SqliteDedupStore(path) as store:
            store.put(state("crm:1", order_ref="SO-1"))
            await store.flush()
            files = [path, path.with_name(f"{path.name}-wal"), path.with_name(f"{path.name}-shm")]
            assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: "0o600" for f in files}
    finally:
        os.umask(before)
    path.chmod(0o644)  # a file of an earlier version: made private at the next open
    async with SqliteDedupStore(path):
        assert oct(path.stat().st_mode & 0o777) == "0o600"
