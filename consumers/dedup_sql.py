"""What the SQLite dedup store (`consumers.dedup.SqliteDedupStore`) runs: the tables, their statements, a flush
written on the writer connection's thread (`write_batch`), and the lookups on the read-only connection (`select_in`).
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from consumers.delivery_state import (
    BLOCKED_ORDERS_TABLE,
    DELIVERIES_TABLE,
    DELIVERY_COLUMNS,
    DOWNSTREAM_ID_COLUMNS,
    DOWNSTREAM_IDS_TABLE,
    STATE_OUTBOX_TABLE,
    STATE_READS_TABLE,
    DeliveryState,
    OutboxEntry,
    WriteBuffer,
)
from consumers.sqlite_files import check_layout_version, rebuild_table, row_chunks, transaction
from topics.errors import StoreError

__all__ = [
    "LAYOUT",
    "SCHEMA",
    "SELECT_BLOCKED",
    "SELECT_BLOCKING",
    "SELECT_DELIVERED_SINCE",
    "SELECT_DOWNSTREAM_ID",
    "SELECT_OUTBOX",
    "SELECT_READ_TO",
    "check_layout",
    "delete_prunable_states",
    "delete_unneeded_ids",
    "fetch_all",
    "migrate",
    "nothing",
    "select_blocked",
    "select_in",
    "select_outbox",
    "select_states",
    "write_batch",
]

# The deliveries table keeps its rowid, unlike the two small ones: idempotency keys are random (UUIDs), so a
# table clustered by key takes each flush's rows at random places, dirtying a page per row; with a rowid the
# rows are appended. A 5,000-row flush into a 200,000-row table took 160 ms clustered by key and 70 ms this way
# (on the dev VM). Its unique index is on (order number, key), not on the key alone: an index over random keys
# still took a page of its own per row, written to the WAL and checkpointed again (a 130-row flush into a growing
# table: 14 -> 21 us a row, against 5 us with keys in order), while order numbers come in order (a shop counts them
# up), so new orders' rows land on the index's last pages (6.7 us a row, flat). An event's duplicates carry its
# order number (the record key), so every lookup names both (`select_states`). Files of the earlier layout, unique
# by key, are rebuilt at open (`migrate`), and files without `event_type` gain it (`NULL` in their rows).
_CREATE_DELIVERIES = f"""
CREATE TABLE IF NOT EXISTS {DELIVERIES_TABLE} (
    key              TEXT NOT NULL,
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
    updated_at       REAL NOT NULL,
    event_type       TEXT
)"""
# The tables' layout, stamped in the file (`consumers.sqlite_files.prepare_wal_file`): one more with every change,
# which `migrate` brings each earlier file to. 1: the first stamped (unique by order and key, with `event_type`).
LAYOUT: Final = 1

SCHEMA = f"""
{_CREATE_DELIVERIES};
CREATE UNIQUE INDEX IF NOT EXISTS {DELIVERIES_TABLE}_order_key ON {DELIVERIES_TABLE} (order_ref, key);
-- No index on order_ref alone: (order_ref, key) serves the hourly prune's NOT IN. Earlier files had one.
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
-- Per partition of the sink's state topic, the offset after the last entry the file took (`consumers.order_state`).
-- A table added without a new layout: a file an earlier version opens keeps working there (it reads from the topic's
-- beginning, as that version did).
CREATE TABLE IF NOT EXISTS {STATE_READS_TABLE} (
    topic     TEXT NOT NULL,
    partition INTEGER NOT NULL,
    read_to   INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
) WITHOUT ROWID;
-- The entries for the state topic not yet acknowledged by its brokers (`consumers.order_state`): written with the
-- ids and blocks they share, deleted once the topic has them, sent again after a crash.
CREATE TABLE IF NOT EXISTS {STATE_OUTBOX_TABLE} (
    key           BLOB PRIMARY KEY,
    partition     INTEGER NOT NULL,
    value         BLOB,
    source_topic  TEXT NOT NULL,
    source_offset INTEGER NOT NULL
) WITHOUT ROWID;
"""


def migrate(db: sqlite3.Connection) -> bool:
    """Bring a deliveries table of an earlier layout to the current one; blocking. Unique by key (its primary key):
    rebuilt, rows in the order they were written; without `event_type`: the column added (``NULL`` in its rows,
    at once: SQLite changes only the schema). True if it changed the file; a new file is left as it is."""
    columns = _columns(db)
    if not columns:
        return False
    indexes = db.execute(f"PRAGMA index_list({DELIVERIES_TABLE})").fetchall()  # (seq, name, unique, origin, partial)
    if any(origin == "pk" for _, _, _, origin, _ in indexes):
        kept = [column for column in DELIVERY_COLUMNS if column in columns]
        rebuild_table(db, DELIVERIES_TABLE, _CREATE_DELIVERIES, kept, order_by="rowid")
        return True
    if "event_type" not in columns:
        db.execute(f"ALTER TABLE {DELIVERIES_TABLE} ADD COLUMN event_type TEXT")
        return True
    return False


def check_layout(db: sqlite3.Connection) -> None:
    """`StoreError` if the file's deliveries table predates the current layout: a read-only reader (`orderbus
    trace`, `orderbus reconcile`) cannot bring it up to date, the daemon does at its start (`migrate`)."""
    (_, _, file) = db.execute("PRAGMA database_list").fetchone()
    check_layout_version(db, Path(file), "dedup store", LAYOUT)
    columns = _columns(db)
    if columns and not set(DELIVERY_COLUMNS) <= columns:
        raise StoreError(
            "the file is of an earlier orderbus version, which the daemon brings up to date when it starts: "
            "restart it (or, for a sink it does not run, `orderbus dedup prune`, which opens it to write), then run "
            "this again"
        )


def _columns(db: sqlite3.Connection) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({DELIVERIES_TABLE})")}  # (cid, name, type, ...)


# A flush writes many rows per statement (``VALUES (...), (...), ...``) rather than an executemany of one row each:
# sqlite3 releases the GIL around every step, and beside a busy event loop each re-acquisition waits for the
# loop's thread to give the GIL up (up to the 5 ms switch interval), so per-row steps made a flush of ~130 rows
# take ~150 ms instead of ~2 ms (tests/bench/bench.py, CPU-bound scenario).
def _upsert_states(rows: int) -> str:
    values = ", ".join([f"({', '.join('?' * len(DELIVERY_COLUMNS))})"] * rows)
    updates = ", ".join(f"{c} = excluded.{c}" for c in DELIVERY_COLUMNS[1:])
    return f"""
INSERT INTO {DELIVERIES_TABLE} ({", ".join(DELIVERY_COLUMNS)}) VALUES {values}
ON CONFLICT (order_ref, key) DO UPDATE SET {updates}
"""  # noqa: S608 -- table and column names are module constants, values are bound


def _upsert_outbox(rows: int) -> str:
    return f"""
INSERT INTO {STATE_OUTBOX_TABLE} (key, partition, value, source_topic, source_offset)
VALUES {", ".join(["(?, ?, ?, ?, ?)"] * rows)}
ON CONFLICT (key) DO UPDATE SET partition = excluded.partition, value = excluded.value,
    source_topic = excluded.source_topic, source_offset = excluded.source_offset
"""  # noqa: S608 -- table name is a module constant, values are bound


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
_UPSERT_READ_TO = f"""
INSERT INTO {STATE_READS_TABLE} (topic, partition, read_to) VALUES (?, ?, ?)
ON CONFLICT (topic, partition) DO UPDATE SET read_to = excluded.read_to
"""  # noqa: S608 -- table name is a module constant, values are bound
SELECT_READ_TO = f"SELECT partition, read_to FROM {STATE_READS_TABLE} WHERE topic = ?"  # noqa: S608 -- constant
_DELETE_SENT = f"DELETE FROM {STATE_OUTBOX_TABLE} WHERE key IN "  # noqa: S608 -- constant
SELECT_OUTBOX = f"SELECT key, partition, value, source_topic, source_offset FROM {STATE_OUTBOX_TABLE}"  # noqa: S608
SELECT_DOWNSTREAM_ID = f"SELECT order_ref, downstream_id FROM {DOWNSTREAM_IDS_TABLE} WHERE order_ref IN "  # noqa: S608
# Per order with an event the downstream accepted (or had) since ?: its latest such time and its downstream id, if
# known; the oldest first (`orderbus reconcile`).
SELECT_DELIVERED_SINCE = f"""
SELECT d.order_ref, MAX(d.updated_at), i.downstream_id, d.event_type FROM {DELIVERIES_TABLE} AS d
LEFT JOIN {DOWNSTREAM_IDS_TABLE} AS i ON i.order_ref = d.order_ref
WHERE d.status IN ('done', 'duplicate') AND d.updated_at >= ?
GROUP BY d.order_ref ORDER BY MAX(d.updated_at), d.order_ref
"""  # noqa: S608 -- table names are module constants, values are bound
# A prune's statements take `limit` rows a transaction (`consumers.sqlite_files.PRUNE_CHUNK`).
_PRUNE_STATES = f"""
DELETE FROM {DELIVERIES_TABLE} WHERE rowid IN (
    SELECT rowid FROM {DELIVERIES_TABLE} WHERE status <> 'in_flight' AND updated_at < ? LIMIT ?
)"""  # noqa: S608 -- table name is a module constant, values are bound
# The next order refs of the ids table, from after a given one: a chunk to prune, in order.
_NEXT_ID_REFS = f"""
SELECT order_ref FROM {DOWNSTREAM_IDS_TABLE} WHERE order_ref > ? ORDER BY order_ref LIMIT ?
"""  # noqa: S608 -- table name is a module constant, values are bound
# A blocked order keeps its id: its dead letters (kept longer than delivery rows) may be replayed after its rows
# are pruned, and an update or cancel replayed then must still address the downstream object.
_PRUNE_DOWNSTREAM_IDS = f"""
DELETE FROM {DOWNSTREAM_IDS_TABLE} WHERE order_ref > ? AND order_ref <= ?
AND order_ref NOT IN (SELECT order_ref FROM {DELIVERIES_TABLE})
AND order_ref NOT IN (SELECT order_ref FROM {BLOCKED_ORDERS_TABLE})
"""  # noqa: S608 -- table names are module constants, values are bound

# Statements of many rows take only a few row counts (`consumers.sqlite_files.row_chunks`), so that a
# connection's statement cache (128 statements) holds every one: any row count made a new statement text on most
# flushes, and preparing an 83-row upsert (340 us) cost as much as running it.
# A lookup pads its keys with NULLs (which match nothing) to a multiple of `_KEY_STEP`, up to `_MOST_KEYS` a query.
_KEY_STEP: Final = 16
_MOST_KEYS: Final = 512
# The rows of (order_ref, key) pairs: a join with the pairs, so each is one probe of the unique index (a row-value
# ``(order_ref, key) IN (VALUES ...)`` scans the table); ``CROSS JOIN`` keeps the pairs the outer loop.
_MOST_PAIRS: Final = 496  # two bound values a pair, within MAX_VARIABLES
_D_COLUMNS: Final = ", ".join(f"d.{c}" for c in DELIVERY_COLUMNS)
SELECT_BLOCKED = f"SELECT order_ref FROM {BLOCKED_ORDERS_TABLE} WHERE order_ref IN "  # noqa: S608 -- constant
SELECT_BLOCKING = f"SELECT order_ref, reason FROM {BLOCKED_ORDERS_TABLE} WHERE order_ref IN "  # noqa: S608 -- constant
_ANY_BLOCKED = f"SELECT EXISTS (SELECT 1 FROM {BLOCKED_ORDERS_TABLE})"  # noqa: S608 -- constant


@functools.cache
def _select_pairs(n: int) -> str:
    pairs = ", ".join(["(?, ?)"] * n)
    return (
        f"SELECT {_D_COLUMNS} FROM (VALUES {pairs}) AS w CROSS JOIN {DELIVERIES_TABLE} AS d "  # noqa: S608 -- constants
        "ON d.order_ref = w.column1 AND d.key = w.column2"
    )


def select_states(db: sqlite3.Connection, pairs: Sequence[tuple[str, str]]) -> list[Any]:
    """The delivery rows of (order_ref, key) `pairs` that have one, `_MOST_PAIRS` a query, padded with pairs of
    NULLs (which match nothing) to a multiple of `_KEY_STEP` (on the read-only connection)."""
    rows: list[Any] = []
    for start in range(0, len(pairs), _MOST_PAIRS):
        chunk = pairs[start : start + _MOST_PAIRS]
        padded = len(chunk) + -len(chunk) % _KEY_STEP
        values: list[str | None] = [value for pair in chunk for value in pair]
        values += [None] * (2 * (padded - len(chunk)))
        rows.extend(db.execute(_select_pairs(padded), values).fetchall())
    return rows


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
        s.event_type,
    )


def _insert_many(db: sqlite3.Connection, sql: Callable[[int], str], values: list[Any], width: int) -> None:
    """Rows of `width` values, laid end to end in `values`, by multi-row statements (see `_upsert_states`)."""
    for start, size in row_chunks(len(values) // width, width):
        db.execute(_statement(sql, size), values[start * width : (start + size) * width])


def nothing(db: sqlite3.Connection) -> None:
    """A hop that does nothing: it returns once every hop queued before it is done."""


def fetch_all(db: sqlite3.Connection, sql: str) -> list[Any]:
    return db.execute(sql).fetchall()


def delete_prunable_states(db: sqlite3.Connection, older_than: float, limit: int) -> int:
    """Delete at most `limit` terminal rows updated before `older_than`, in one transaction; the number deleted."""
    with transaction(db):
        deleted: int = db.execute(_PRUNE_STATES, (older_than, limit)).rowcount
    return deleted


def delete_unneeded_ids(db: sqlite3.Connection, after: str, limit: int) -> str | None:
    """Of the next `limit` downstream ids after order ref `after`, delete those no row needs, in one transaction;
    the last order ref looked at, or None once it looked at the last one."""
    with transaction(db):
        refs = db.execute(_NEXT_ID_REFS, (after, limit)).fetchall()
        if not refs:
            return None
        last: str = refs[-1][0]
        db.execute(_PRUNE_DOWNSTREAM_IDS, (after, last))
    return last if len(refs) == limit else None


def _delete_in(db: sqlite3.Connection, delete: str, keys: Sequence[bytes]) -> None:
    """``delete IN (keys)``, in the chunks `select_in` asks by."""
    for chunk in _padded(keys):
        db.execute(delete + _in(len(chunk)), chunk)


def select_outbox(db: sqlite3.Connection) -> list[OutboxEntry]:
    return [
        (bytes(key), int(partition), None if value is None else bytes(value), topic, offset)
        for key, partition, value, topic, offset in db.execute(SELECT_OUTBOX)
    ]


def select_in(db: sqlite3.Connection, select: str, keys: Sequence[str]) -> list[Any]:
    """Rows of ``select IN (keys)``, `_MOST_KEYS` keys a query, padded (on the read-only connection)."""
    rows: list[Any] = []
    for chunk in _padded(keys):
        rows.extend(db.execute(select + _in(len(chunk)), chunk).fetchall())
    return rows


def _padded(keys: Sequence[str] | Sequence[bytes]) -> Iterator[list[str | bytes | None]]:
    """`keys` in chunks of `_MOST_KEYS`, each padded with NULLs (which match nothing) to a multiple of `_KEY_STEP`."""
    for start in range(0, len(keys), _MOST_KEYS):
        chunk: list[str | bytes | None] = list(keys[start : start + _MOST_KEYS])
        yield chunk + [None] * (-len(chunk) % _KEY_STEP)


def select_blocked(db: sqlite3.Connection, select: str, order_refs: Sequence[str]) -> list[Any]:
    """`select_in` of the blocked orders, asked only if there is any: the table is nearly always empty, and the
    lookup of a fetched batch's orders (up to 1,000) cost ~100 us of the event loop for nothing."""
    if not order_refs or db.execute(_ANY_BLOCKED).fetchone()[0] == 0:
        return []
    return select_in(db, select, order_refs)


@functools.cache
def _statement(sql: Callable[[int], str], rows: int) -> str:
    return sql(rows)


def write_batch(db: sqlite3.Connection, batch: WriteBuffer) -> None:
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
        if batch.read_to:
            db.executemany(_UPSERT_READ_TO, [(topic, part, offset) for (topic, part), offset in batch.read_to.items()])
        if batch.sent:  # before the new ones: a key sent and written again in one batch keeps its new entry
            _delete_in(db, _DELETE_SENT, list(batch.sent))
        if batch.outbox:
            entries = [value for entry in batch.outbox.values() for value in entry]
            _insert_many(db, _upsert_outbox, entries, 5)
