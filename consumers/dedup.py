"""The per-sink delivery-state table: what happened to each event, keyed by its idempotency key.

Kafka redelivers; this table turns that into exactly-once *effect* per sink (brief, invariant 1). Before a
record is sent, the engine looks its idempotency key up (`get_many`, one query per fetched batch); a key already
``done``, ``duplicate`` or ``dead`` is skipped. Each sink has its own SQLite file, so sinks never share a lock.

Three tables, all in one file (names below, as module constants):

- `DELIVERIES_TABLE`: one `DeliveryState` per idempotency key (``in_flight`` while attempts run, then a
  terminal status). Its columns are `DELIVERY_COLUMNS`, in the order of `DeliveryState`'s fields.
- `DOWNSTREAM_IDS_TABLE`: per order, the id the downstream create returned; the order's later updates and
  cancels address the downstream object by it.
- `BLOCKED_ORDERS_TABLE`: orders with a dead-lettered record. Until a replay unblocks the order, its later
  records follow the dead one to the dead-letter topic, so a replay re-applies them in order (invariant 8).

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
downstream id is kept as long as its order has any delivery row left, so ids of orders with activity at or
after the cutoff (or in flight) stay; retention must outlast the time an order can still change. Blocked
orders are never pruned: only a replay unblocks them. `prune` flushes first, so it sees buffered writes.

`SqliteDedupStore` is the production store (one instance per file); `MemoryDedupStore`
is its twin for unit tests, with the same answers, whose `crash()` drops the buffer as a killed process would.
Every aiosqlite/sqlite3 error is raised as `StoreError` naming the file. Times (``updated_at`` and the others)
are unix seconds set by the caller, so the stores never read a clock.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Protocol, Self, TypeVar

import aiosqlite

from consumers.sqlite_files import prepare_wal_file, row_chunks, transaction
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
]

_T = TypeVar("_T")

DeliveryStatus = Literal["in_flight", "done", "duplicate", "dead"]

DELIVERIES_TABLE: Final = "deliveries"
DELIVERY_COLUMNS: Final = (
    "key",
    "event_id",
    "order_ref",
    "status",
    "attempts",
    "last_status",
    "first_attempt_at",
    "last_attempt_at",
    "downstream_id",
    "reply_digest",
    "reason",
    "updated_at",
)
DOWNSTREAM_IDS_TABLE: Final = "downstream_ids"
DOWNSTREAM_ID_COLUMNS: Final = ("order_ref", "downstream_id")
BLOCKED_ORDERS_TABLE: Final = "blocked_orders"
BLOCKED_ORDER_COLUMNS: Final = ("order_ref", "reason")


@dataclass(frozen=True, slots=True)
class DeliveryState:
    """What happened to one event in one sink; the fields are the table's columns, in this order.

    `order_ref` is the order number, a business reference (not personal data), so it may be stored and
    logged. `last_status` is the last HTTP status seen; the ``*_at`` fields are unix seconds.
    """

    key: str
    event_id: str
    order_ref: str
    status: DeliveryStatus
    attempts: int
    last_status: int | None
    first_attempt_at: float | None
    last_attempt_at: float | None
    downstream_id: str | None
    reply_digest: str | None
    reason: str | None
    updated_at: float


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

    async def get_many(self, keys: Sequence[str]) -> dict[str, DeliveryState]:
        """The states of those keys that have one (buffered or flushed); unknown keys are absent."""
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

    def put_downstream_id(self, order_ref: str, downstream_id: str) -> None:
        """Buffer the downstream id of an order (flushed with the states, in the same transaction)."""
        ...

    async def blocked_orders(self, order_refs: Sequence[str]) -> set[str]:
        """Those of `order_refs` that have a dead-lettered record not yet replayed."""
        ...

    async def blocking(self, order_refs: Sequence[str]) -> dict[str, str]:
        """Those of `order_refs` that are blocked, with the reason each was blocked for."""
        ...

    def block_order(self, order_ref: str, reason: str) -> None:
        """Buffer: this order's later records go to the dead-letter topic until it is unblocked."""
        ...

    def unblock_order(self, order_ref: str) -> None:
        """Buffer: the order was replayed; its records are delivered again."""
        ...

    async def prune(self, older_than: float) -> int:
        """Flush, then delete terminal rows updated before `older_than`; return how many delivery rows went."""
        ...

    async def integrity_check(self) -> str:
        """``"ok"``, or SQLite's description of what is damaged. It reads the whole file: run it at start."""
        ...


@dataclass(slots=True)
class _Buffer:
    """Writes not yet flushed, one per key/order (later writes replace earlier ones).

    In `blocks`, a reason means "block" and None means "unblock". A flush takes the whole buffer and leaves an
    empty one; if its write fails, `requeue` puts back what no later write has replaced.
    """

    states: dict[str, DeliveryState] = field(default_factory=dict)
    downstream_ids: dict[str, str] = field(default_factory=dict)
    blocks: dict[str, str | None] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.states) + len(self.downstream_ids) + len(self.blocks)

    def requeue(self, failed: _Buffer) -> None:
        for mine, theirs in (
            (self.states, failed.states),
            (self.downstream_ids, failed.downstream_ids),
            (self.blocks, failed.blocks),
        ):
            for key, value in theirs.items():
                mine.setdefault(key, value)  # type: ignore[arg-type]  # each pair of dicts has one value type

    def blocked(self, order_ref: str) -> bool | None:
        """True/False if the buffer decides whether `order_ref` is blocked, None if the tables do."""
        if order_ref not in self.blocks:
            return None
        return self.blocks[order_ref] is not None


# --- SQLite -----------------------------------------------------------------------------------------------

# The deliveries table keeps its rowid, unlike the two small ones: idempotency keys are random (UUIDs), so a
# table clustered by key takes each flush's rows at random places, dirtying a page per row; with a rowid the
# rows are appended and only the narrow key index is written at random. A 5,000-row flush into a 200,000-row
# table took 160 ms clustered by key and 70 ms this way (on the dev VM).
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {DELIVERIES_TABLE} (
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
-- No index on order_ref: with order numbers in no particular order it doubled the cost of every flush (a
-- random page per row), for one query an hour (prune, which builds its own set of the orders). Earlier files had it.
DROP INDEX IF EXISTS {DELIVERIES_TABLE}_order_ref;
CREATE INDEX IF NOT EXISTS {DELIVERIES_TABLE}_prunable ON {DELIVERIES_TABLE} (updated_at)
    WHERE status <> 'in_flight';
CREATE TABLE IF NOT EXISTS {DOWNSTREAM_IDS_TABLE} (
    order_ref     TEXT PRIMARY KEY,
    downstream_id TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS {BLOCKED_ORDERS_TABLE} (
    order_ref TEXT PRIMARY KEY,
    reason    TEXT NOT NULL
) WITHOUT ROWID;
"""


# A flush writes many rows per statement (``VALUES (...), (...), ...``) rather than an executemany of one row each:
# sqlite3 releases the GIL around every step, and beside a busy event loop each re-acquisition waits for the
# loop's thread to give the GIL up (up to the 5 ms switch interval), so per-row steps made a flush of ~130 rows
# take ~150 ms instead of ~2 ms (tests/bench/bench.py, CPU-bound scenario).
def _upsert_states(rows: int) -> str:
    values = ", ".join([f"({', '.join('?' * len(DELIVERY_COLUMNS))})"] * rows)
    updates = ", ".join(f"{c} = excluded.{c}" for c in DELIVERY_COLUMNS[1:])
    return f"""
INSERT INTO {DELIVERIES_TABLE} ({", ".join(DELIVERY_COLUMNS)}) VALUES {values}
ON CONFLICT (key) DO UPDATE SET {updates}
"""  # noqa: S608 -- table and column names are module constants, values are bound


def _upsert_downstream_ids(rows: int) -> str:
    return f"""
INSERT INTO {DOWNSTREAM_IDS_TABLE} (order_ref, downstream_id) VALUES {", ".join(["(?, ?)"] * rows)}
ON CONFLICT (order_ref) DO UPDATE SET downstream_id = excluded.downstream_id
"""  # noqa: S608 -- table name is a module constant, values are bound


_UPSERT_BLOCK = f"""
INSERT INTO {BLOCKED_ORDERS_TABLE} (order_ref, reason) VALUES (?, ?)
ON CONFLICT (order_ref) DO UPDATE SET reason = excluded.reason
"""  # noqa: S608 -- table name is a module constant, values are bound
_DELETE_BLOCK = f"DELETE FROM {BLOCKED_ORDERS_TABLE} WHERE order_ref = ?"  # noqa: S608 -- constant
_SELECT_DOWNSTREAM_ID = f"SELECT order_ref, downstream_id FROM {DOWNSTREAM_IDS_TABLE} WHERE order_ref IN "  # noqa: S608
_PRUNE_STATES = f"""
DELETE FROM {DELIVERIES_TABLE} WHERE status <> 'in_flight' AND updated_at < ?
"""  # noqa: S608 -- table name is a module constant, values are bound
_PRUNE_DOWNSTREAM_IDS = f"""
DELETE FROM {DOWNSTREAM_IDS_TABLE} WHERE order_ref NOT IN (SELECT order_ref FROM {DELIVERIES_TABLE})
"""  # noqa: S608 -- table names are module constants

# A checkpoint copies the WAL's pages back into the file; the idempotency keys come in no order, so a flush dirties
# index pages all over the file, and fewer, larger checkpoints copy a page changed by many flushes once: 4,000
# pages (~16 MB of WAL at most) instead of SQLite's 1,000 took a fifth off the CPU of a flush (tests/bench).
_WAL_AUTOCHECKPOINT_PAGES: Final = 4000

# Statements of many rows take only a few row counts (`consumers.sqlite_files.row_chunks`), so that a
# connection's statement cache (128 statements) holds every one: any row count made a new statement text on most
# flushes, and preparing an 83-row upsert (340 us) cost as much as running it.
# A lookup pads its keys with NULLs (which match nothing) to a multiple of `_KEY_STEP`, up to `_MOST_KEYS` a query.
_KEY_STEP: Final = 16
_MOST_KEYS: Final = 512
_SELECT_STATES = f"SELECT {', '.join(DELIVERY_COLUMNS)} FROM {DELIVERIES_TABLE} WHERE key IN "  # noqa: S608 -- constant
_SELECT_BLOCKED = f"SELECT order_ref FROM {BLOCKED_ORDERS_TABLE} WHERE order_ref IN "  # noqa: S608 -- constant
_SELECT_BLOCKING = f"SELECT order_ref, reason FROM {BLOCKED_ORDERS_TABLE} WHERE order_ref IN "  # noqa: S608 -- constant
_ANY_BLOCKED = f"SELECT EXISTS (SELECT 1 FROM {BLOCKED_ORDERS_TABLE})"  # noqa: S608 -- constant


@functools.cache
def _in(n: int) -> str:
    """The ``(?, ?, ...)`` of an IN query for `n` bound values."""
    return f"({', '.join('?' * n)})"


def _row(s: DeliveryState) -> tuple[Any, ...]:
    """`s` as a row in `DELIVERY_COLUMNS` order (spelled out: `dataclasses.astuple` deep-copies, slowly)."""
    return (
        s.key,
        s.event_id,
        s.order_ref,
        s.status,
        s.attempts,
        s.last_status,
        s.first_attempt_at,
        s.last_attempt_at,
        s.downstream_id,
        s.reply_digest,
        s.reason,
        s.updated_at,
    )


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
        self._db: aiosqlite.Connection | None = None
        # Reads run on the event loop's own thread, on a second, read-only connection (WAL lets it read beside
        # the writer): an index lookup in the page cache takes microseconds a key, while a hop to the writer's
        # thread and back took ~50 ms under load, mostly waiting for turns of the loop, and a fetched batch
        # waited for it before any of its records could be sent.
        self._reader: sqlite3.Connection | None = None
        self._buffer = _Buffer()
        # Flushes handed to the writer's thread and not yet confirmed, oldest first. A read looks at the buffer,
        # then at these (newest first), then at the file, where a confirmed flush is committed: nothing put is
        # ever out of its sight. Flushes do not wait for each other.
        self._flushing: list[_Buffer] = []
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
            await asyncio.to_thread(prepare_wal_file, self.path, _SCHEMA, "dedup store")
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
            await db.execute_fetchall(f"PRAGMA wal_autocheckpoint = {_WAL_AUTOCHECKPOINT_PAGES}")
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

    def put_downstream_id(self, order_ref: str, downstream_id: str) -> None:
        self._connection()
        self._buffer.downstream_ids[order_ref] = downstream_id

    def block_order(self, order_ref: str, reason: str) -> None:
        self._connection()
        self._buffer.blocks[order_ref] = reason

    def unblock_order(self, order_ref: str) -> None:
        self._connection()
        self._buffer.blocks[order_ref] = None

    @property
    def pending_writes(self) -> int:
        return len(self._buffer) + sum(len(batch) for batch in self._flushing)

    async def flush(self) -> int:
        """Make everything put so far durable: the buffer in one transaction, in one hop to the connection's thread.

        Flushes do not wait for each other (group commit pipelines them): the thread runs them in the order they
        were called, and a flush returns once its own write and every write handed over before it are on disk.
        On error, what failed is buffered again for a later flush, and this flush, and those called while the
        failed one was under way, raise `StoreError`.
        """
        self._connection()
        batch, self._buffer = self._buffer, _Buffer()
        failures = self._failed_flushes
        if batch:
            self._flushing.append(batch)
            try:
                await self._on_thread(_write, batch)
            except BaseException as exc:
                self._buffer.requeue(batch)
                if not isinstance(exc, asyncio.CancelledError):  # cancelled: the thread still writes it
                    self._failed_flushes += 1
                if isinstance(exc, sqlite3.Error):
                    raise self._error("flush", exc) from exc
                raise
            finally:
                self._flushing.remove(batch)
        elif self._flushing:
            await self._on_thread(_nothing)  # nothing new: returns once the flushes under way are done
        if self._failed_flushes != failures:
            raise StoreError(f"dedup store {self.path}: flush failed: an earlier write failed; it is buffered again")
        return len(batch)

    def _layers(self) -> list[_Buffer]:
        """Writes not yet confirmed on disk, the newest first."""
        return [self._buffer, *reversed(self._flushing)]

    # --- reads ------------------------------------------------------------------------------------------

    async def get_many(self, keys: Sequence[str]) -> dict[str, DeliveryState]:
        # What is not yet confirmed on disk is in the buffer or a flush under way; the rest is in the file.
        found: dict[str, DeliveryState] = {}
        for layer in self._layers():
            for key in keys:
                if key not in found and key in layer.states:
                    found[key] = layer.states[key]
        wanted = list(dict.fromkeys(k for k in keys if k not in found))
        try:
            rows = _select_in(self._read_connection(), _SELECT_STATES, wanted)
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
            rows = _select_in(self._read_connection(), _SELECT_DOWNSTREAM_ID, [order_ref])
        except sqlite3.Error as exc:
            raise self._error("downstream_id", exc) from exc
        return str(rows[0][1]) if rows else None

    async def blocked_orders(self, order_refs: Sequence[str]) -> set[str]:
        decided = {ref: self._pending_block(ref) for ref in order_refs}
        blocked = {ref for ref, is_blocked in decided.items() if is_blocked}
        wanted = [ref for ref, is_blocked in decided.items() if is_blocked is None]
        try:
            rows = _select_blocked(self._read_connection(), _SELECT_BLOCKED, wanted)
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
            rows = _select_blocked(self._read_connection(), _SELECT_BLOCKING, wanted)
        except sqlite3.Error as exc:
            raise self._error("blocking", exc) from exc
        result.update((str(row[0]), str(row[1])) for row in rows)
        return result

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
        await self.flush()
        try:
            deleted: int = await self._on_thread(_prune, older_than)
        except sqlite3.Error as exc:
            raise self._error("prune", exc) from exc
        return deleted

    async def integrity_check(self) -> str:
        try:
            rows = await self._on_thread(_fetch_all, "PRAGMA integrity_check")
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
        return StoreError(f"dedup store {self.path}: {operation} failed: {exc}")


def _insert_many(db: sqlite3.Connection, sql: Callable[[int], str], values: list[Any], width: int) -> None:
    """Rows of `width` values, laid end to end in `values`, by multi-row statements (see `_upsert_states`)."""
    for start, size in row_chunks(len(values) // width, width):
        db.execute(_statement(sql, size), values[start * width : (start + size) * width])


def _nothing(db: sqlite3.Connection) -> None:
    """A hop that does nothing: it returns once every hop queued before it is done."""


def _fetch_all(db: sqlite3.Connection, sql: str) -> list[Any]:
    return db.execute(sql).fetchall()


def _prune(db: sqlite3.Connection, older_than: float) -> int:
    """Delete terminal rows updated before `older_than`, and downstream ids no row needs, in one transaction."""
    with transaction(db):
        deleted: int = db.execute(_PRUNE_STATES, (older_than,)).rowcount
        db.execute(_PRUNE_DOWNSTREAM_IDS)
    return deleted


def _select_in(db: sqlite3.Connection, select: str, keys: Sequence[str]) -> list[Any]:
    """Rows of ``select IN (keys)``, `_MOST_KEYS` keys a query, padded (on the read-only connection)."""
    rows: list[Any] = []
    for start in range(0, len(keys), _MOST_KEYS):
        chunk: list[str | None] = list(keys[start : start + _MOST_KEYS])
        chunk += [None] * (-len(chunk) % _KEY_STEP)
        rows.extend(db.execute(select + _in(len(chunk)), chunk).fetchall())
    return rows


def _select_blocked(db: sqlite3.Connection, select: str, order_refs: Sequence[str]) -> list[Any]:
    """`_select_in` of the blocked orders, asked only if there is any: the table is nearly always empty, and the
    lookup of a fetched batch's orders (up to 1,000) cost ~100 us of the event loop for nothing."""
    if not order_refs or db.execute(_ANY_BLOCKED).fetchone()[0] == 0:
        return []
    return _select_in(db, select, order_refs)


@functools.cache
def _statement(sql: Callable[[int], str], rows: int) -> str:
    return sql(rows)


def _write(db: sqlite3.Connection, batch: _Buffer) -> None:
    """Write `batch` in one transaction, on the connection's thread (blocking); on any failure, roll back."""
    with transaction(db):
        if batch.states:
            states = [value for s in batch.states.values() for value in _row(s)]
            _insert_many(db, _upsert_states, states, len(DELIVERY_COLUMNS))
        if batch.downstream_ids:
            ids = [value for pair in batch.downstream_ids.items() for value in pair]
            _insert_many(db, _upsert_downstream_ids, ids, len(DOWNSTREAM_ID_COLUMNS))
        blocks = [(ref, reason) for ref, reason in batch.blocks.items() if reason is not None]
        if blocks:
            db.executemany(_UPSERT_BLOCK, blocks)
        unblocks = [(ref,) for ref, reason in batch.blocks.items() if reason is None]
        if unblocks:
            db.executemany(_DELETE_BLOCK, unblocks)


# --- memory -----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class MemoryTables:
    """The "file" of a `MemoryDedupStore`: what a flush made durable. Share one between two stores to
    model a restart (the second store sees only what the first flushed)."""

    deliveries: dict[str, DeliveryState] = field(default_factory=dict)
    downstream_ids: dict[str, str] = field(default_factory=dict)
    blocked_orders: dict[str, str] = field(default_factory=dict)


class MemoryDedupStore:
    """The in-memory twin of `SqliteDedupStore` for unit tests: the same answers, and a `crash()`.

    Every method runs without awaiting anything, so each is atomic on the event loop without a lock. It needs
    no `open` (it has no file), but supports the same lifecycle; `close` flushes.
    """

    def __init__(self, tables: MemoryTables | None = None) -> None:
        self.tables = MemoryTables() if tables is None else tables
        self._buffer = _Buffer()

    def crash(self) -> None:
        """Drop every unflushed write, as a killed process would; the flushed tables stay."""
        self._buffer = _Buffer()

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        await self.flush()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def put(self, state: DeliveryState) -> None:
        self._buffer.states[state.key] = state

    def put_downstream_id(self, order_ref: str, downstream_id: str) -> None:
        self._buffer.downstream_ids[order_ref] = downstream_id

    def block_order(self, order_ref: str, reason: str) -> None:
        self._buffer.blocks[order_ref] = reason

    def unblock_order(self, order_ref: str) -> None:
        self._buffer.blocks[order_ref] = None

    @property
    def pending_writes(self) -> int:
        return len(self._buffer)

    async def flush(self) -> int:
        written = len(self._buffer)
        self.tables.deliveries.update(self._buffer.states)
        self.tables.downstream_ids.update(self._buffer.downstream_ids)
        for order_ref, reason in self._buffer.blocks.items():
            if reason is None:
                self.tables.blocked_orders.pop(order_ref, None)
            else:
                self.tables.blocked_orders[order_ref] = reason
        self._buffer = _Buffer()
        return written

    async def get_many(self, keys: Sequence[str]) -> dict[str, DeliveryState]:
        found: dict[str, DeliveryState] = {}
        for key in keys:
            if key in self._buffer.states:
                found[key] = self._buffer.states[key]
            elif key in self.tables.deliveries:
                found[key] = self.tables.deliveries[key]
        return found

    async def downstream_id(self, order_ref: str) -> str | None:
        if order_ref in self._buffer.downstream_ids:
            return self._buffer.downstream_ids[order_ref]
        return self.tables.downstream_ids.get(order_ref)

    async def blocked_orders(self, order_refs: Sequence[str]) -> set[str]:
        blocked: set[str] = set()
        for order_ref in order_refs:
            decided = self._buffer.blocked(order_ref)
            if decided or (decided is None and order_ref in self.tables.blocked_orders):
                blocked.add(order_ref)
        return blocked

    async def blocking(self, order_refs: Sequence[str]) -> dict[str, str]:
        result: dict[str, str] = {}
        for order_ref in order_refs:
            if order_ref in self._buffer.blocks:
                reason = self._buffer.blocks[order_ref]
                if reason is not None:
                    result[order_ref] = reason
            elif order_ref in self.tables.blocked_orders:
                result[order_ref] = self.tables.blocked_orders[order_ref]
        return result

    async def prune(self, older_than: float) -> int:
        await self.flush()
        deliveries = self.tables.deliveries
        old = [k for k, s in deliveries.items() if s.status != "in_flight" and s.updated_at < older_than]
        for key in old:
            del deliveries[key]
        live_orders = {s.order_ref for s in deliveries.values()}
        for order_ref in [ref for ref in self.tables.downstream_ids if ref not in live_orders]:
            del self.tables.downstream_ids[order_ref]
        return len(old)

    async def integrity_check(self) -> str:
        return "ok"
