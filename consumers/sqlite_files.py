"""What the SQLite stores (the dedup table, the ingest's idempotency keys) share: WAL files and transactions."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from topics.errors import StoreError


def prepare_wal_file(path: Path, schema: str, store: str) -> None:
    """Create the file and its tables and switch it to WAL (a persistent property of the file); blocking.

    `store` names the store in the error of a file that cannot be in WAL mode.
    """
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        (mode,) = db.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode != "wal":
            raise StoreError(f"{store} {path}: journal mode is {mode!r}, WAL is not supported here")
        db.executescript(schema)


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT on the connection's thread; on any failure, roll back and re-raise."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            # The original error is the one worth raising; a failed rollback is undone by SQLite anyway.
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise
