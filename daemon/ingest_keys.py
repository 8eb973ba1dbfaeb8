"""The ingest idempotency store: one answer per ``Idempotency-Key``, so a retry never publishes twice.

For each key the store remembers the SHA-256 of the request body and, once the order is published, the answer
that was given. A request first *claims* its key:

- `Claimed`  -- the key is new (or its earlier holder crashed): publish, then `complete` or `release` it;
- `Replay`   -- the same body was answered before: send that answer again, publish nothing;
- `Conflict` -- the key was used with a different body: a client bug, never publish;
- `Busy`     -- the same key is being handled right now by this process: the client should retry later.

A claimed row is *in flight* and carries the owner token of the store instance that claimed it (random per
instance). After a crash the row would otherwise block its key forever, so a claim with the same body that
finds an in-flight row of another owner takes it over. The order may then be published twice, by the dead
process and now: that is Kafka's at-least-once, which the consumers' dedup absorbs. The consequence is that
**one store instance owns a file**: two live processes on one file would steal each other's in-flight rows.

`SqliteIngestKeyStore` is the production store: one file, WAL, ``synchronous=NORMAL`` (a power cut may lose
the last answers but never corrupts the file; a lost answer only means a retry is published again, which dedup
absorbs). `MemoryIngestKeyStore` is its twin for the HTTP handler's unit tests. Times are unix seconds passed
in by the caller (``now``), so the stores never read a clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

import aiosqlite

from topics.errors import StoreError

__all__ = [
    "TABLE",
    "Busy",
    "Claim",
    "Claimed",
    "Conflict",
    "IngestKeyStore",
    "MemoryIngestKeyStore",
    "NotClaimedError",
    "Replay",
    "SqliteIngestKeyStore",
    "body_sha256",
]

TABLE = "ingest_keys"

_IN_FLIGHT = "in_flight"
_DONE = "done"


@dataclass(frozen=True, slots=True)
class Claimed:
    """The key is ours: publish, then `complete` (or `release` if publishing failed)."""


@dataclass(frozen=True, slots=True)
class Replay:
    """The same body was answered before; answer exactly this again and publish nothing."""

    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Conflict:
    """The key was first used with a different body."""


@dataclass(frozen=True, slots=True)
class Busy:
    """The same key is in flight in this process (a concurrent duplicate); nothing is known yet."""


Claim = Claimed | Replay | Conflict | Busy


class NotClaimedError(StoreError):
    """`complete` was called for a key this store instance does not hold in flight (a caller bug)."""


def body_sha256(body: bytes) -> str:
    """The digest `claim` expects: hex SHA-256 of the raw request body, so every caller hashes alike."""
    return hashlib.sha256(body).hexdigest()


class IngestKeyStore(Protocol):
    """What the ingest handler needs; see the module docstring for the meaning of each `Claim`.

    Only the request that got `Claimed` may call `complete` or `release`: the owner of a row is the store
    instance, not the request, so a `Busy` duplicate that released the key would drop the claim of the request
    still publishing.
    """

    async def claim(self, key: str, body_sha256: str, now: float) -> Claim:
        """Atomically take `key` for this request, or say why not."""
        ...

    async def complete(self, key: str, status: int, body: bytes, now: float) -> None:
        """Store the answer for a key we claimed; later claims with the same body get a `Replay` of it."""
        ...

    async def release(self, key: str) -> None:
        """Forget our in-flight claim (publishing failed) so a retry can claim it; no-op if not held."""
        ...

    async def prune(self, older_than: float) -> int:
        """Delete answers completed before `older_than` (and crashed owners' claims made before it)."""
        ...


# --- SQLite -----------------------------------------------------------------------------------------------

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    key          TEXT PRIMARY KEY,
    body_sha256  TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('{_IN_FLIGHT}', '{_DONE}')),
    owner        TEXT,     -- store instance holding an in-flight row; NULL once done
    claimed_at   REAL NOT NULL,
    status       INTEGER,  -- the answer, once done
    response     BLOB,
    completed_at REAL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS {TABLE}_completed_at ON {TABLE} (completed_at) WHERE state = '{_DONE}';
"""

# Inserts a new in-flight row, or takes over another owner's in-flight row for the same body; RETURNING yields
# a row only when one of those happened. Anything else (done, ours, other body) is left for _CLASSIFY.
_CLAIM = f"""
INSERT INTO {TABLE} (key, body_sha256, state, owner, claimed_at)
VALUES (:key, :sha, '{_IN_FLIGHT}', :owner, :now)
ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, claimed_at = excluded.claimed_at
WHERE {TABLE}.state = '{_IN_FLIGHT}' AND {TABLE}.owner <> excluded.owner
  AND {TABLE}.body_sha256 = excluded.body_sha256
RETURNING key
"""  # noqa: S608 -- TABLE is a module constant, values are bound
_CLASSIFY = f"SELECT body_sha256, state, status, response FROM {TABLE} WHERE key = ?"  # noqa: S608 -- constant
_COMPLETE = f"""
UPDATE {TABLE} SET state = '{_DONE}', owner = NULL, status = ?, response = ?, completed_at = ?
WHERE key = ? AND state = '{_IN_FLIGHT}' AND owner = ?
"""  # noqa: S608 -- TABLE is a module constant, values are bound
_RELEASE = f"DELETE FROM {TABLE} WHERE key = ? AND state = '{_IN_FLIGHT}' AND owner = ?"  # noqa: S608 -- constant
_PRUNE = f"""
DELETE FROM {TABLE}
WHERE (state = '{_DONE}' AND completed_at < :cutoff)
   OR (state = '{_IN_FLIGHT}' AND owner <> :owner AND claimed_at < :cutoff)
"""  # noqa: S608 -- TABLE is a module constant, values are bound


class SqliteIngestKeyStore:
    """The production `IngestKeyStore`: one SQLite file, one connection, one instance per file.

    Use ``async with SqliteIngestKeyStore(path) as store`` (or `open`/`close`). Every aiosqlite/sqlite3 error
    is raised as `StoreError` naming the file.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._owner = secrets.token_hex(8)
        self._db: aiosqlite.Connection | None = None
        # The claim is an upsert plus, when it did not take the key, a SELECT; no other coroutine of ours may
        # write between the two, or a Busy could be reported for a key released in the meantime.
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        """Open (creating if needed) the file: WAL, the table, then the one connection.

        Step 1 prepares the file with plain sqlite3 on a worker thread, so a bad path or a corrupt file fails
        there, cleanly: a failed ``aiosqlite.connect()`` returns before its worker thread has stopped, and
        that thread then reports into an event loop that may be closed by then (a traceback at exit).
        Step 2 opens the aiosqlite connection and sets its per-connection pragmas.
        """
        if self._db is not None:
            return
        # Step 1.
        try:
            await asyncio.to_thread(_prepare_file, self.path)
        except sqlite3.Error as exc:
            raise self._error("open", exc) from exc
        # Step 2. isolation_level=None: autocommit; each statement is its own transaction, none is left open.
        try:
            db = await aiosqlite.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._error("open", exc) from exc
        try:
            await db.execute_fetchall("PRAGMA synchronous = NORMAL")
            await db.execute_fetchall("PRAGMA busy_timeout = 5000")
        except BaseException as exc:
            await db.close()
            if isinstance(exc, sqlite3.Error):
                raise self._error("open", exc) from exc
            raise
        self._db = db

    async def close(self) -> None:
        """Close the connection; in-flight rows stay and the next instance may take them over."""
        db, self._db = self._db, None
        if db is None:
            return
        try:
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

    async def claim(self, key: str, body_sha256: str, now: float) -> Claim:
        db = self._connection()
        async with self._lock:
            try:
                params = {"key": key, "sha": body_sha256, "owner": self._owner, "now": now}
                if list(await db.execute_fetchall(_CLAIM, params)):
                    return Claimed()
                rows = list(await db.execute_fetchall(_CLASSIFY, (key,)))
            except sqlite3.Error as exc:
                raise self._error("claim", exc) from exc
        if not rows:  # unreachable while one instance owns the file; see the module docstring
            raise StoreError(f"ingest key store {self.path}: claim found neither a new nor an existing row")
        sha, state, status, response = rows[0]
        if sha != body_sha256:
            return Conflict()
        if state == _DONE:
            return Replay(status=int(status), body=bytes(response))
        return Busy()

    async def complete(self, key: str, status: int, body: bytes, now: float) -> None:
        db = self._connection()
        async with self._lock:
            try:
                async with db.execute(_COMPLETE, (status, body, now, key, self._owner)) as cursor:
                    updated = cursor.rowcount
            except sqlite3.Error as exc:
                raise self._error("complete", exc) from exc
        if updated != 1:
            raise NotClaimedError(f"ingest key store {self.path}: complete() for a key not claimed by this store")

    async def release(self, key: str) -> None:
        db = self._connection()
        async with self._lock:
            try:
                await db.execute_fetchall(_RELEASE, (key, self._owner))
            except sqlite3.Error as exc:
                raise self._error("release", exc) from exc

    async def prune(self, older_than: float) -> int:
        db = self._connection()
        async with self._lock:
            try:
                async with db.execute(_PRUNE, {"cutoff": older_than, "owner": self._owner}) as cursor:
                    return cursor.rowcount
            except sqlite3.Error as exc:
                raise self._error("prune", exc) from exc

    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError(f"ingest key store {self.path} is not open")
        return self._db

    def _error(self, operation: str, exc: sqlite3.Error) -> StoreError:
        return StoreError(f"ingest key store {self.path}: {operation} failed: {exc}")


def _prepare_file(path: Path) -> None:
    """Create the file and table and switch it to WAL (a persistent property of the file); blocking."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        (mode,) = db.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode != "wal":
            raise StoreError(f"ingest key store {path}: journal mode is {mode!r}, WAL is not supported here")
        db.executescript(_SCHEMA)


# --- memory -----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    body_sha256: str
    claimed_at: float
    answer: Replay | None = None  # None while in flight
    completed_at: float = 0.0


class MemoryIngestKeyStore:
    """The in-memory twin of `SqliteIngestKeyStore` for unit tests: same results, nothing survives the object.

    Every method runs without awaiting anything, so each is atomic on the event loop without a lock. Its rows
    all belong to one owner, so no in-flight row is ever taken over.
    """

    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def claim(self, key: str, body_sha256: str, now: float) -> Claim:
        entry = self.entries.get(key)
        if entry is None:
            self.entries[key] = _Entry(body_sha256, claimed_at=now)
            return Claimed()
        if entry.body_sha256 != body_sha256:
            return Conflict()
        return entry.answer if entry.answer is not None else Busy()

    async def complete(self, key: str, status: int, body: bytes, now: float) -> None:
        entry = self.entries.get(key)
        if entry is None or entry.answer is not None:
            raise NotClaimedError("memory ingest key store: complete() for a key not claimed by this store")
        entry.answer = Replay(status=status, body=bytes(body))
        entry.completed_at = now

    async def release(self, key: str) -> None:
        entry = self.entries.get(key)
        if entry is not None and entry.answer is None:
            del self.entries[key]

    async def prune(self, older_than: float) -> int:
        old = [k for k, e in self.entries.items() if e.answer is not None and e.completed_at < older_than]
        for key in old:
            del self.entries[key]
        return len(old)
