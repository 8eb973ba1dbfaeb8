"""The per-sink delivery-state table: what happened to each event, keyed by its idempotency key.

Kafka redelivers; this table turns that into exactly-once *effect* per sink (brief, invariant 1). Before a
record is sent, the engine looks its idempotency key up under its order number (`get_many`, one query per fetched
batch: every copy of an event carries its order number, the record key); a key already ``done``, ``duplicate`` or
``dead`` is skipped. Each sink has its own SQLite file, so sinks never share a lock.

Three tables, all in one file (names below, as module constants):

- `DELIVERIES_TABLE`: one `DeliveryState` per order number and idempotency key (``in_flight`` while attempts run,
  then a terminal status); why it is unique by both and not by the key alone is in `consumers.dedup_sql`. Its
  columns are `DELIVERY_COLUMNS`, in the order of `DeliveryState`'s fields.
- `DOWNSTREAM_IDS_TABLE`: per order, the id the downstream create returned; the order's later updates and
  cancels address the downstream object by it.
- `BLOCKED_ORDERS_TABLE`: orders with records in the dead-letter topic, each with the value the engine blocked it
  with: its *chain*, the idempotency keys of those records, oldest first (`consumers.blocks`). Until a replay has
  delivered the last of them, the order's later records follow them there, so a replay re-applies them in order
  (invariant 8).

**Writes are buffered.** `put`, `put_downstream_id`, `block_order` and `unblock_order` are plain calls that
only remember the write (the last write per key or order wins); `flush` writes them all in one transaction. The
engine flushes once per commit interval, then commits the offsets of records whose terminal state was in that
flush -- the durable order "2xx -> row done -> offset commit" of invariant 2, at one transaction per batch
instead of one per record (and group commit, `consumers.group_flush`, flushes as records finish). Reads
(`get_many`, `downstream_id`, `blocked_orders`) see buffered writes and flushes under way too, so the engine never
has to care what is flushed yet. Writes go through one connection on its own thread; reads use a second,
read-only connection on the event loop's thread (WAL lets it read beside the writer). A crash loses the
buffer; that is safe because the engine commits no offset of a record whose state is still buffered: the
records come again, and the ``Idempotency-Key`` header absorbs a request the downstream had already applied.

**Durability.** The file is in WAL mode with ``synchronous=NORMAL`` by default: a committed flush survives
the process being killed (the WAL pages are in the OS before `flush` returns), and the file is never
corrupted, but an OS crash or power cut may roll back the last flushes, because NORMAL syncs the WAL only at
checkpoints. Their offsets may already be committed in Kafka by then: the records do not come again, so losing
their ``done`` rows costs nothing, but a lost downstream id or a lost block would (an update with nothing to
address, a record delivered after its dead-lettered predecessor). Where the host can lose power,
``synchronous="FULL"`` syncs the WAL on every commit; since writes are batched that is one fsync per flush,
not per record.

**Pruning.** `prune(older_than)` deletes terminal rows (``done``, ``duplicate``, ``dead``) updated strictly
before `older_than`; an ``in_flight`` row is never pruned, whatever its age (its record is not finished). A
downstream id is kept as long as its order has any delivery row left or is blocked, so ids of orders with
activity at or after the cutoff (or in flight) stay, and so do those of orders whose dead letters may still be
replayed; retention must outlast the time an order can still change. Blocked orders are never pruned: only a
replay unblocks them. `prune` flushes first, so it sees buffered writes.

`SqliteDedupStore` is the production store (one instance per file; its statements are in `consumers.dedup_sql`, a
row and the write buffer in `consumers.delivery_state`); `MemoryDedupStore` (`consumers.dedup_memory`, re-exported
here with the row's names) is its twin for unit tests, with the same answers, whose `crash()` drops the buffer as
a killed process would. Every aiosqlite/sqlite3 error is raised as `StoreError` naming the file. Times
(``updated_at`` and the others) are unix seconds set by the caller, so the stores never read a clock.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, Self, TypeVar

import aiosqlite

from consumers.dedup_memory import MemoryDedupStore, MemoryTables
from consumers.dedup_sql import (
    LAYOUT,
    SCHEMA,
    SELECT_BLOCKED,
    SELECT_BLOCKING,
    SELECT_DOWNSTREAM_ID,
    SELECT_READ_TO,
    delete_prunable_states,
    delete_unneeded_ids,
    fetch_all,
    migrate,
    nothing,
    select_blocked,
    select_in,
    select_outbox,
    select_states,
    write_batch,
)
from consumers.delivery_state import (
    BLOCKED_ORDER_COLUMNS,
    BLOCKED_ORDERS_TABLE,
    DELIVERIES_TABLE,
    DELIVERY_COLUMNS,
    DOWNSTREAM_ID_COLUMNS,
    DOWNSTREAM_IDS_TABLE,
    DeliveryState,
    DeliveryStatus,
    Origin,
    OutboxEntry,
    WriteBuffer,
)
from consumers.sqlite_files import PRUNE_CHUNK, PRUNE_PAUSE, WAL_AUTOCHECKPOINT_PAGES, prepare_wal_file, space_note
from topics.errors import ConfigError, StoreError

__all__ = [
    "BLOCKED_ORDERS_TABLE",
    "BLOCKED_ORDER_COLUMNS",
    "DELIVERIES_TABLE",
    "DELIVERY_COLUMNS",
    "DOWNSTREAM_IDS_TABLE",
    "DOWNSTREAM_ID_COLUMNS",
    "DedupStore",
    "DeliveryState",
    "DeliveryStatus",
    "MemoryDedupStore",
    "MemoryTables",
    "SqliteDedupStore",
    "StateFile",
]

_T = TypeVar("_T")


class DedupStore(Protocol):
    """What the delivery engine needs from a sink's delivery-state table; see the module docstring."""

    async def open(self) -> None:
        """Make the store usable (create the file and tables if needed)."""
        ...

    async def close(self) -> None:
        """Flush the buffered writes, then release the store."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def get_many(self, keys: Mapping[str, str]) -> dict[str, DeliveryState]:
        """The states of those keys (mapped to their order numbers) that have one for that order (buffered or
        flushed); unknown keys are absent."""
        ...

    def put(self, state: DeliveryState) -> None:
        """Buffer `state` for its key, replacing any state buffered for that key before."""
        ...

    async def flush(self) -> int:
        """Write every buffered write in one transaction; return how many there were."""
        ...

    @property
    def pending_writes(self) -> int:
        """Buffered writes (states, downstream ids, blocks and unblocks) not flushed yet."""
        ...

    async def downstream_id(self, order_ref: str) -> str | None:
        """The id the downstream create returned for this order, if any."""
        ...

    def put_downstream_id(self, order_ref: str, downstream_id: str, *, origin: Origin | None = None) -> None:
        """Buffer the downstream id of an order (flushed with the states, in the same transaction). `origin`, the
        record that made the write, is for a store that shares it (`consumers.order_state`)."""
        ...

    async def blocked_orders(self, order_refs: Sequence[str]) -> set[str]:
        """Those of `order_refs` that have a dead-lettered record not yet replayed."""
        ...

    async def blocking(self, order_refs: Sequence[str]) -> dict[str, str]:
        """Those of `order_refs` that are blocked, with the value each was last blocked with (`block_order`)."""
        ...

    def block_order(self, order_ref: str, reason: str, *, origin: Origin | None = None) -> None:
        """Buffer: this order's later records go to the dead-letter topic until it is unblocked; `reason`
        replaces the value the order was blocked with before (the engine writes the order's chain)."""
        ...

    def unblock_order(self, order_ref: str, *, origin: Origin | None = None) -> None:
        """Buffer: the order's last dead letter was replayed and delivered; its records are delivered again."""
        ...

    async def prune(self, older_than: float) -> int:
        """Flush, then delete terminal rows updated before `older_than`; return how many delivery rows went."""
        ...

    async def integrity_check(self) -> str:
        """``"ok"``, or SQLite's description of what is damaged. It reads the whole file: run it at start."""
        ...


class StateFile(DedupStore, Protocol):
    """A `DedupStore` that can also keep a sink's shared state (`consumers.order_state.SharedStateStore`): how far
    it read the state topic, and the outbox of entries the topic has not acknowledged yet."""

    def put_read_to(self, topic: str, partition: int, offset: int) -> None:
        """Remember (buffered, like the other writes) that the file holds what partition `partition` of the state
        topic `topic` holds before `offset` (`consumers.order_state`)."""
        ...

    async def read_to(self, topic: str) -> dict[int, int]:
        """Per partition of the state topic `topic`, the offset `put_read_to` last said (none for a partition never
        read into this file)."""
        ...

    def put_outbox(self, entry: OutboxEntry) -> None:
        """Keep `entry` for the state topic (buffered), in place of any of its key."""
        ...

    def drop_outbox(self, key: bytes) -> None:
        """The state topic has the last entry of `key`: forget it (buffered; written before newer entries)."""
        ...

    async def outbox(self) -> list[OutboxEntry]:
        """The entries kept for the state topic, in the file (read at open: what a crash left unsent)."""
        ...


class SqliteDedupStore:
    """The production `DedupStore`: one SQLite file per sink, one connection, one instance per file.

    Use ``async with SqliteDedupStore(path) as store`` (or `open`/`close`). `synchronous` chooses the
    durability of a flush against power loss (see the module docstring); anything but "NORMAL" or "FULL" is
    a `ConfigError`.
    """

    def __init__(self, path: Path | str, *, synchronous: Literal["NORMAL", "FULL"] = "NORMAL") -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ConfigError(f"dedup store synchronous: {synchronous!r} is not 'NORMAL' or 'FULL'")
        self.path = Path(path)
        self.synchronous = synchronous
        self.prune_pause = PRUNE_PAUSE  # seconds between a prune's transactions (`prune`)
        self._db: aiosqlite.Connection | None = None
        # Reads run on the event loop's own thread, on a second, read-only connection (WAL lets it read beside
        # the writer): an index lookup in the page cache takes microseconds a key, while a hop to the writer's
        # thread and back took ~50 ms under load, mostly waiting for turns of the loop, and a fetched batch
        # waited for it before any of its records could be sent.
        self._reader: sqlite3.Connection | None = None
        self._buffer = WriteBuffer()
        # Flushes handed to the writer's thread and not yet confirmed, oldest first. A read looks at the buffer,
        # then at these (newest first), then at the file, where a confirmed flush is committed: nothing put is
        # ever out of its sight. Flushes do not wait for each other.
        self._flushing: list[WriteBuffer] = []
        self._failed_flushes = 0

    async def open(self) -> None:
        """Open (creating if needed) the file: WAL and tables first, then the one connection.

        Step 1 prepares the file with plain sqlite3 on a worker thread, so a bad path or a corrupt file fails
        there, cleanly (a failed ``aiosqlite.connect()`` leaves a worker thread reporting into a loop that may
        be closed by then). Step 2 opens the aiosqlite connection and sets its per-connection pragmas.
        """
        if self._db is not None:
            return
        # Step 1.
        try:
            await asyncio.to_thread(prepare_wal_file, self.path, SCHEMA, "dedup store", migrate, layout=LAYOUT)
        except sqlite3.Error as exc:
            raise self._error("open", exc) from exc
        # Step 2. isolation_level=None: no implicit transactions; flush and prune open theirs explicitly.
        try:
            db = await aiosqlite.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._error("open", exc) from exc
        try:
            await db.execute_fetchall(f"PRAGMA synchronous = {self.synchronous}")
            await db.execute_fetchall("PRAGMA busy_timeout = 5000")
            await db.execute_fetchall(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
            reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            reader.execute("PRAGMA query_only = ON")
        except BaseException as exc:
            await db.close()
            if isinstance(exc, sqlite3.Error):
                raise self._error("open", exc) from exc
            raise
        self._db, self._reader = db, reader

    async def close(self) -> None:
        """Flush, then close the connection (also when the flush failed: that error is raised after)."""
        if self._db is None:
            return
        try:
            await self.flush()
        finally:
            db, self._db = self._db, None
            reader, self._reader = self._reader, None
            try:
                if reader is not None:
                    reader.close()
                await db.close()
            except sqlite3.Error as exc:
                raise self._error("close", exc) from exc

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- buffered writes --------------------------------------------------------------------------------

    def put(self, state: DeliveryState) -> None:
        self._connection()
        self._buffer.states[state.key] = state

    def put_downstream_id(self, order_ref: str, downstream_id: str, *, origin: Origin | None = None) -> None:
        self._connection()
        self._buffer.downstream_ids[order_ref] = downstream_id

    def block_order(self, order_ref: str, reason: str, *, origin: Origin | None = None) -> None:
        self._connection()
        self._buffer.blocks[order_ref] = reason

    def unblock_order(self, order_ref: str, *, origin: Origin | None = None) -> None:
        self._connection()
        self._buffer.blocks[order_ref] = None

    def put_read_to(self, topic: str, partition: int, offset: int) -> None:
        self._connection()
        self._buffer.read_to[topic, partition] = offset

    def put_outbox(self, entry: OutboxEntry) -> None:
        self._connection()
        self._buffer.outbox[entry[0]] = entry

    def drop_outbox(self, key: bytes) -> None:
        self._connection()
        self._buffer.outbox.pop(key, None)
        self._buffer.sent.add(key)

    @property
    def pending_writes(self) -> int:
        return len(self._buffer) + sum(len(batch) for batch in self._flushing)

    async def flush(self) -> int:
        """Make everything put so far durable: the buffer in one transaction, in one hop to the connection's thread.

        Flushes do not wait for each other (group commit pipelines them): the thread runs them in the order they
        were called, and a flush returns once its own write and every write handed over before it are on disk.
        On error, what failed is buffered again for a later flush (except what a newer write, buffered or in a
        flush under way, replaces), and this flush, and those called while the failed one was under way, raise
        `StoreError`.
        """
        self._connection()
        batch, self._buffer = self._buffer, WriteBuffer()
        failures = self._failed_flushes
        if batch:
            self._flushing.append(batch)
            try:
                await self._on_thread(write_batch, batch)
            except BaseException as exc:
                # Not what a newer flush under way holds: if that one fails too, it puts back its own.
                self._buffer.requeue(batch, self._flushing[self._flushing.index(batch) + 1 :])
                if not isinstance(exc, asyncio.CancelledError):  # cancelled: the thread still writes it
                    self._failed_flushes += 1
                if isinstance(exc, sqlite3.Error):
                    raise self._error("flush", exc) from exc
                raise
            finally:
                self._flushing.remove(batch)
        elif self._flushing:
            await self._on_thread(nothing)  # nothing new: returns once the flushes under way are done
        if self._failed_flushes != failures:
            raise StoreError(f"dedup store {self.path}: flush failed: an earlier write failed; it is buffered again")
        return len(batch)

    def _layers(self) -> list[WriteBuffer]:
        """Writes not yet confirmed on disk, the newest first."""
        return [self._buffer, *reversed(self._flushing)]

    # --- reads ------------------------------------------------------------------------------------------

    async def get_many(self, keys: Mapping[str, str]) -> dict[str, DeliveryState]:
        # What is not yet confirmed on disk is in the buffer or a flush under way; the rest is in the file.
        found: dict[str, DeliveryState] = {}
        for layer in self._layers():
            for key, order_ref in keys.items():
                if key not in found and (state := layer.states.get(key)) is not None and state.order_ref == order_ref:
                    found[key] = state
        wanted = [(order_ref, key) for key, order_ref in keys.items() if key not in found]
        try:
            rows = select_states(self._read_connection(), wanted)
        except sqlite3.Error as exc:
            raise self._error("get_many", exc) from exc
        for row in rows:
            found.setdefault(row[0], DeliveryState(*row))
        return found

    async def downstream_id(self, order_ref: str) -> str | None:
        for layer in self._layers():
            if order_ref in layer.downstream_ids:
                return layer.downstream_ids[order_ref]
        try:
            rows = select_in(self._read_connection(), SELECT_DOWNSTREAM_ID, [order_ref])
        except sqlite3.Error as exc:
            raise self._error("downstream_id", exc) from exc
        return str(rows[0][1]) if rows else None

    async def blocked_orders(self, order_refs: Sequence[str]) -> set[str]:
        decided = {ref: self._pending_block(ref) for ref in order_refs}
        blocked = {ref for ref, is_blocked in decided.items() if is_blocked}
        wanted = [ref for ref, is_blocked in decided.items() if is_blocked is None]
        try:
            rows = select_blocked(self._read_connection(), SELECT_BLOCKED, wanted)
        except sqlite3.Error as exc:
            raise self._error("blocked_orders", exc) from exc
        blocked.update(str(row[0]) for row in rows)
        return blocked

    async def blocking(self, order_refs: Sequence[str]) -> dict[str, str]:
        result: dict[str, str] = {}
        layers = [layer for layer in self._layers() if layer.blocks]  # nearly always none: asked per fetched batch
        if not layers:
            wanted = list(order_refs)
        else:
            wanted = []
            for ref in order_refs:
                layer = next((layer for layer in layers if ref in layer.blocks), None)
                if layer is None:
                    wanted.append(ref)
                elif (reason := layer.blocks[ref]) is not None:
                    result[ref] = reason
        try:
            rows = select_blocked(self._read_connection(), SELECT_BLOCKING, wanted)
        except sqlite3.Error as exc:
            raise self._error("blocking", exc) from exc
        result.update((str(row[0]), str(row[1])) for row in rows)
        return result

    async def read_to(self, topic: str) -> dict[int, int]:
        try:
            rows = self._read_connection().execute(SELECT_READ_TO, (topic,)).fetchall()
        except sqlite3.Error as exc:
            raise self._error("read_to", exc) from exc
        found = {int(partition): int(offset) for partition, offset in rows}
        for layer in reversed(self._layers()):  # the oldest first: the newest write wins
            found.update((part, offset) for (name, part), offset in layer.read_to.items() if name == topic)
        return found

    async def outbox(self) -> list[OutboxEntry]:
        try:
            return select_outbox(self._read_connection())
        except sqlite3.Error as exc:
            raise self._error("outbox", exc) from exc

    def _pending_block(self, order_ref: str) -> bool | None:
        for layer in self._layers():
            decided = layer.blocked(order_ref)
            if decided is not None:
                return decided
        return None

    async def _on_thread(self, work: Callable[..., _T], *args: Any) -> _T:
        """`work(connection, *args)` in one hop to the connection's thread.

        Every hop costs a turn of the event loop, and with hundreds of requests under way a turn takes tens of
        milliseconds: a flush of four awaited statements held each delivered record's slot for ~200 ms (bench.py).
        aiosqlite has no public "run this on your thread" (and no types for its private one).
        """
        db = self._connection()
        result: _T = await db._execute(work, db._conn, *args)  # type: ignore[no-untyped-call]
        return result

    # --- maintenance ------------------------------------------------------------------------------------

    async def prune(self, older_than: float) -> int:
        """Delete terminal rows older than `older_than` and the downstream ids no row needs, `PRUNE_CHUNK` rows a
        transaction and `prune_pause` apart: the daemon's flushes (on this connection) and another process's
        writes (the daemon's, beside `orderbus dedup prune`) come between."""
        await self.flush()
        deleted = 0
        try:
            while True:
                chunk: int = await self._on_thread(delete_prunable_states, older_than, PRUNE_CHUNK)
                deleted += chunk
                if chunk < PRUNE_CHUNK:
                    break
                await asyncio.sleep(self.prune_pause)
            after: str | None = ""
            while after is not None:
                after = await self._on_thread(delete_unneeded_ids, after, PRUNE_CHUNK)
                if after is not None:
                    await asyncio.sleep(self.prune_pause)
        except sqlite3.Error as exc:
            raise self._error("prune", exc) from exc
        return deleted

    async def integrity_check(self) -> str:
        try:
            rows = await self._on_thread(fetch_all, "PRAGMA integrity_check")
        except sqlite3.Error as exc:
            raise self._error("integrity_check", exc) from exc
        return "\n".join(str(row[0]) for row in rows)

    # --- helpers ----------------------------------------------------------------------------------------

    def _read_connection(self) -> sqlite3.Connection:
        if self._reader is None:
            raise StoreError(f"dedup store {self.path} is not open")
        return self._reader

    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError(f"dedup store {self.path} is not open")
        return self._db

    def _error(self, operation: str, exc: sqlite3.Error) -> StoreError:
        return StoreError(f"dedup store {self.path}: {operation} failed: {exc}{space_note(self.path)}")
