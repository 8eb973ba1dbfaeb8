"""What the SQLite stores (the dedup table, the ingest's idempotency keys) share: WAL files and transactions."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final

from topics.errors import ConfigError, StoreError

log = logging.getLogger(__name__)

# Bound values per statement: at most 999, the smallest SQLITE_MAX_VARIABLE_NUMBER a build may have.
MAX_VARIABLES: Final = 999
# Rows per statement come in multiples of this, then the rest (see `row_chunks`).
ROW_STEP: Final = 8
# A checkpoint copies the WAL's pages back into the file. The dedup stores' keys come in no order (idempotency keys),
# so a transaction dirties key-index pages all over the file, and fewer, larger checkpoints copy a page changed by
# many transactions once: 4,000 pages (~16 MB of WAL at most) instead of SQLite's 1,000 took a fifth off the CPU of
# a dedup flush (tests/bench). The ingest's key store keeps SQLite's 1,000: there a checkpoint holds up the claims
# waiting for the commit it runs in (`daemon.ingest_keys_process.CHECKPOINT_PAGES`).
WAL_AUTOCHECKPOINT_PAGES: Final = 4000
# A prune deletes `PRUNE_CHUNK` rows a transaction at most, `PRUNE_PAUSE` seconds apart. In one transaction,
# `orderbus dedup prune` beside a running daemon held a file's write lock as long as it took (15-18 s for 5 million
# delivery states), the daemon's writer gave up after its 5 s busy timeout, and the daemon stopped. A writer of
# another process, on SQLite's busy handler (it sleeps up to 100 ms between tries), finds the file unlocked for most
# of the pauses.
PRUNE_CHUNK: Final = 2000
PRUNE_PAUSE: Final = 0.1


# Below this much free space, a store's error says how much is left: on a full disk SQLite fails the open of a file
# with "disk I/O error" (its shared-memory index cannot grow), which points an operator at the hardware instead.
LOW_SPACE: Final = 64 * 1024 * 1024


def space_note(path: Path) -> str:
    """`` (its file system has N bytes free)`` when less than `LOW_SPACE` is left where `path` lives (to this user),
    else ``""``; for the message of a store's error."""
    try:
        stats = os.statvfs(path.parent)
    except OSError:
        return ""
    free = stats.f_bavail * stats.f_frsize
    return f" (its file system has {free:,} bytes free)" if free < LOW_SPACE else ""


def prepare_wal_file(
    path: Path,
    schema: str,
    store: str,
    migrate: Callable[[sqlite3.Connection], bool] | None = None,
    *,
    layout: int,
) -> None:
    """Create the file and its tables and switch it to WAL (a persistent property of the file); blocking.

    `store` names the store in the error of a file that cannot be in WAL mode. `migrate`, run before `schema`,
    brings a table of an earlier layout to the current one (returns True if it changed the file); `schema` then
    creates what is missing. The file is stamped with `layout` (SQLite's ``user_version``), and one stamped by a
    later orderbus is refused (`check_layout_version`).
    """
    _private(path)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        check_layout_version(db, path, store, layout)
        (mode,) = db.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode != "wal":
            raise StoreError(f"{store} {path}: journal mode is {mode!r}, WAL is not supported here")
        if migrate is not None and migrate(db):
            log.info("%s %s: brought to the current layout", store, path)
        db.executescript(schema)
        db.execute(f"PRAGMA user_version = {int(layout)}")


def _private(path: Path) -> None:
    """Make `path` (and its WAL and shared-memory files, which SQLite creates with the file's mode) readable by its
    owner alone, whatever the process's umask: it holds order numbers and idempotency keys, and a state directory a
    volume mount or a container makes group-readable would otherwise show them (a file of another owner is left)."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))  # an empty file is an empty database to SQLite
    except OSError:
        return  # not ours to make (a directory that cannot be written): sqlite3.connect says why, as before
    for file in (path, path.with_name(f"{path.name}-wal"), path.with_name(f"{path.name}-shm")):
        with contextlib.suppress(FileNotFoundError, PermissionError):
            os.chmod(file, 0o600)


def check_layout_version(db: sqlite3.Connection, path: Path, store: str, layout: int) -> None:
    """`ConfigError` (exit 2: a restart cannot help) for a file a later orderbus wrote, whose layout this one does
    not know: after a rollback to an earlier version, its writes would fail, or worse, succeed half."""
    (found,) = db.execute("PRAGMA user_version").fetchone()
    if found > layout:
        raise ConfigError(
            f"state_dir: {store} {path} has layout {found}, written by a later orderbus (this one reads up to "
            f"{layout}): run that version, or restore the copy of the file from before the upgrade"
        )


def rebuild_table(db: sqlite3.Connection, table: str, create: str, columns: Sequence[str], order_by: str) -> None:
    """Move `table`'s rows, in `order_by` order, into a new `table` made by `create` (a ``CREATE TABLE``), in one
    transaction; blocking. The old table's indexes go with it: the schema run after creates the new ones."""
    old = f"{table}_rebuilt_from"
    listed = ", ".join(columns)
    with transaction(db):
        db.execute(f"ALTER TABLE {table} RENAME TO {old}")
        db.execute(create)
        db.execute(f"INSERT INTO {table} ({listed}) SELECT {listed} FROM {old} ORDER BY {order_by}")  # noqa: S608
        db.execute(f"DROP TABLE {old}")


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


def row_chunks(count: int, width: int) -> Iterator[tuple[int, int]]:
    """(start, size) of the statements that write `count` rows of `width` values each.

    A statement of many rows is one step on SQLite's side (and one GIL hand-over between a store's writer thread
    and the event loop, where a row a statement was one each), but every row count is a statement text of its own,
    prepared again once the connection's statement cache (128) overflows. So a batch takes as many rows as fit in
    `MAX_VARIABLES`, then a multiple of `ROW_STEP` rows, then the rest: a few texts, at most two statements more.
    """
    most = MAX_VARIABLES // width // ROW_STEP * ROW_STEP
    start = 0
    while count - start >= most:
        yield start, most
        start += most
    rest = count - start
    for size in (rest - rest % ROW_STEP, rest % ROW_STEP):
        if size:
            yield start, size
            start += size


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection that cannot write, create or migrate the file (the daemon may have it open).

    Without a ``-wal`` file beside it (no daemon has it open), read as immutable: a WAL-mode file opened read-only
    gets a ``-wal`` and ``-shm`` created, and by root (``sudo orderbus trace``) they would be root's, which the
    daemon's user could then not open at its next start."""
    immutable = "" if path.with_name(f"{path.name}-wal").exists() else "&immutable=1"
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro{immutable}", uri=True, timeout=5.0)
    try:
        db.execute("PRAGMA query_only = ON")
        yield db
    finally:
        db.close()
