"""What the SQLite idempotency store (`daemon.ingest_keys.SqliteIngestKeyStore`) runs in its own process
(`daemon.ingest_keys_process`): the table, its statements, the operations, and one batch of them written in one
transaction (`write`).

A run of claims, or of answers, is written by a few statements of many rows (`consumers.sqlite_files.row_chunks`),
not one each: a statement per row made a batch's transaction, and the claims waiting for it, slow (measured when
this ran on a thread of the daemon, where every statement also had to win the GIL back from the event loop).
"""

from __future__ import annotations

import functools
import itertools
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, cast

from consumers.sqlite_files import rebuild_table, row_chunks, transaction
from daemon.ingest_claims import Busy, Claim, Claimed, Conflict, Replay
from topics.errors import StoreError

__all__ = [
    "LAYOUT",
    "MAX_BATCH",
    "SCHEMA",
    "TABLE",
    "ClaimOp",
    "CompleteOp",
    "FlushOp",
    "Operation",
    "PruneOp",
    "ReleaseOp",
    "migrate",
    "write",
]

TABLE = "ingest_keys"

_IN_FLIGHT = "in_flight"
_DONE = "done"

# The table keeps its rowid, as the dedup store's deliveries table does (`consumers.dedup_sql`): idempotency keys are
# random as a rule (UUIDs), so a table clustered by key took each transaction's claims at random places, dirtying a
# page per claim, and the answers stored a transaction later dirtied the same pages again. With a rowid the rows are
# appended and answered near the end; only the narrow key index is written at random. With UUID keys (ingest harness,
# 128 clients, three alternating rounds) the writer's thread spent ~62 us a request clustered by key and ~37 us this
# way, and the ingest answered 4,000 -> 5,050 requests/s; keys in order cost ~18 us either way. Files of the earlier
# layout are rebuilt at open (`migrate`).
_CREATE_TABLE = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id           INTEGER PRIMARY KEY,
    key          TEXT NOT NULL UNIQUE,
    body_sha256  TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('{_IN_FLIGHT}', '{_DONE}')),
    owner        TEXT,     -- store instance holding an in-flight row; NULL once done
    claimed_at   REAL NOT NULL,
    status       INTEGER,  -- the answer, once done
    response     BLOB,
    completed_at REAL
)"""
# The table's layout, stamped in the file (`consumers.sqlite_files.prepare_wal_file`): one more with every change,
# which `migrate` brings each earlier file to. 1: the first stamped.
LAYOUT: Final = 1

SCHEMA = f"""{_CREATE_TABLE};
CREATE INDEX IF NOT EXISTS {TABLE}_completed_at ON {TABLE} (completed_at) WHERE state = '{_DONE}';
"""
_COLUMNS = ("key", "body_sha256", "state", "owner", "claimed_at", "status", "response", "completed_at")


def migrate(db: sqlite3.Connection) -> bool:
    """Rebuild a table of the earlier layout (clustered by key, ``WITHOUT ROWID``), rows in the order they were
    claimed; blocking. True if it did; a new file or one of the current layout is left as it is."""
    row = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)).fetchone()
    if row is None or "WITHOUT ROWID" not in str(row[0]).upper():
        return False
    rebuild_table(db, TABLE, _CREATE_TABLE, _COLUMNS, order_by="claimed_at")
    return True


@functools.cache
def _existing_rows(n: int) -> str:
    """The rows of `n` keys."""
    keys = ", ".join("?" * n)
    return f"SELECT key, body_sha256, state, status, response FROM {TABLE} WHERE key IN ({keys})"  # noqa: S608


@functools.cache
def _claim_rows(n: int) -> str:
    """Insert `n` in-flight rows of (key, body_sha256, owner, claimed_at) that `_claim_all` found free to take,
    or take over an in-flight row with the same body that nobody holds; a row in any other state is left as it is."""
    values = ", ".join([f"(?, ?, '{_IN_FLIGHT}', ?, ?)"] * n)
    return f"""
INSERT INTO {TABLE} (key, body_sha256, state, owner, claimed_at) VALUES {values}
ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, claimed_at = excluded.claimed_at
WHERE {TABLE}.state = '{_IN_FLIGHT}' AND {TABLE}.body_sha256 = excluded.body_sha256
"""  # noqa: S608 -- TABLE is a module constant, values are bound


@functools.cache
def _complete_rows(n: int) -> str:
    """Store the answers of `n` rows of (key, status, response, completed_at), each only on its in-flight row of
    the owner bound last."""
    values = ", ".join(["(?, ?, ?, ?)"] * n)
    return f"""
UPDATE {TABLE} SET state = '{_DONE}', owner = NULL, status = v.column2, response = v.column3, completed_at = v.column4
FROM (VALUES {values}) AS v
WHERE {TABLE}.key = v.column1 AND {TABLE}.state = '{_IN_FLIGHT}' AND {TABLE}.owner = ?
"""  # noqa: S608 -- TABLE is a module constant, values are bound


_RELEASE = f"DELETE FROM {TABLE} WHERE key = ? AND state = '{_IN_FLIGHT}' AND owner = ?"  # noqa: S608 -- constant
# A prune deletes `limit` answered rows a transaction at most (by the completed_at index; see
# `consumers.sqlite_files.PRUNE_CHUNK`). In-flight rows held by nobody are few, and go in the first one.
_PRUNE_DONE = f"""
DELETE FROM {TABLE} WHERE id IN (
    SELECT id FROM {TABLE} WHERE state = '{_DONE}' AND completed_at < :cutoff LIMIT :limit
)"""  # noqa: S608 -- TABLE is a module constant, values are bound
_PRUNE_IN_FLIGHT = f"""
DELETE FROM {TABLE} WHERE state = '{_IN_FLIGHT}' AND owner <> :owner AND claimed_at < :cutoff
"""  # noqa: S608 -- TABLE is a module constant, values are bound


# One transaction's operations at most: bounds how long the writer holds SQLite, not how much may be queued
# (that is bounded by the requests under way and those answered within the last `answer_delay`).
MAX_BATCH = 1000


# The operations are plain data (no future to settle): `write` runs in the key store's own process
# (`daemon.ingest_keys_process`), and they travel there pickled. The store keeps who waits for each. Not slotted, as
# the claims they come back as (`daemon.ingest_claims`): pickle copies an instance's __dict__ in C, but a slotted
# dataclass's state through Python (`dataclasses.fields` per instance): the parent's CPU for a claim and its answer
# fell from ~11.8 to ~9.8 us (a claim loop of 128 tasks, three runs each).


@dataclass(frozen=True)
class ClaimOp:
    key: str
    body_sha256: str
    now: float
    name: ClassVar[str] = "claim"


@dataclass(frozen=True)
class CompleteOp:
    key: str
    status: int
    body: bytes
    now: float
    name: ClassVar[str] = "complete"


@dataclass(frozen=True)
class ReleaseOp:
    key: str
    name: ClassVar[str] = "release"


@dataclass(frozen=True)
class PruneOp:
    """Delete up to `limit` answered rows older than `cutoff` (and, with `in_flight`, the rows in flight that nobody
    holds); the result is (answered rows deleted, in-flight rows deleted)."""

    cutoff: float
    limit: int
    in_flight: bool
    name: ClassVar[str] = "prune"


@dataclass(frozen=True)
class FlushOp:
    """Written after the operations queued before it, as a row written and deleted in the same transaction: it
    fails where a claim would. An empty transaction writes nothing, so on a full disk it committed while every
    claim failed, and `SqliteIngestKeyStore.recheck` took that for a healed store (/readyz said ready while every
    webhook with a key got 503)."""

    name: ClassVar[str] = "flush"


# The flush's row: no client's key (those are visible ASCII), gone when its transaction commits.
_PROBE_KEY: Final = "\x00flush"
_PROBE_WRITE = f"""
INSERT OR REPLACE INTO {TABLE} (key, body_sha256, state, claimed_at) VALUES (?, '', '{_IN_FLIGHT}', 0)
"""  # noqa: S608 -- TABLE is a module constant, values are bound
_PROBE_DELETE = f"DELETE FROM {TABLE} WHERE key = ?"  # noqa: S608 -- constant


Operation = ClaimOp | CompleteOp | ReleaseOp | PruneOp | FlushOp


def write(db: sqlite3.Connection, owner: str, batch: Sequence[Operation]) -> tuple[list[object], bool]:
    """Run `batch` in order in one transaction (blocking); on any failure, roll back. Returns per operation: a
    claim's `Claim`, else the rows it changed (an answer: see `_complete_all`); and whether the transaction changed
    a row. One that changed none (claims answered from their rows, a prune with nothing to delete) commits on a full
    disk too: it says nothing of whether the file takes writes (`SqliteIngestKeyStore.failing`)."""
    results: list[object] = []
    changes = db.total_changes
    # The keys this batch's claims took, over all its runs of claims: a key claimed in an earlier run (an answer
    # or a release of another key between the two) is taken, not a row in flight to take over.
    claimed: dict[str, str] = {}
    with transaction(db):
        for kind, run in itertools.groupby(batch, key=type):  # consecutive operations of one kind
            if kind is ClaimOp:
                results += _claim_all(db, owner, cast("list[ClaimOp]", list(run)), claimed)
            elif kind is CompleteOp:
                results += _complete_all(db, owner, cast("list[CompleteOp]", list(run)))
            else:
                results += [_run(db, owner, operation) for operation in run]
    return results, db.total_changes > changes


def _claim_all(db: sqlite3.Connection, owner: str, claims: Sequence[ClaimOp], claimed: dict[str, str]) -> list[object]:
    """Each claim's `Claim`, in order, by two statements a chunk: the rows its keys already have (none, as a
    rule), then one insert of the keys it takes: new ones, and those in flight with the same body that nobody holds.

    Nobody holds a row in flight that this batch did not claim: the store sends no claim for a key it holds (see
    `SqliteIngestKeyStore._unheld`), so such a row is another owner's that crashed, or this owner's whose answer,
    release or claim's result was lost with a failed batch. A key claimed earlier in this batch (`claimed`: key ->
    body digest, added to here) is `Busy` (or `Conflict`): two claims of one key in two runs of claims of a batch,
    with another key's answer between them, were once both `Claimed`, and the order was published twice."""
    results: list[object] = []
    for start, size in row_chunks(len(claims), 4):
        chunk = claims[start : start + size]
        rows = {row[0]: row[1:] for row in db.execute(_existing_rows(size), [c.key for c in chunk])}
        taken: list[ClaimOp] = []
        for claim in chunk:
            digest = claimed.get(claim.key)
            if digest is not None:
                results.append(Busy() if digest == claim.body_sha256 else Conflict())
                continue
            row = rows.get(claim.key)  # (body_sha256, state, status, response)
            if row is None or (row[1] == _IN_FLIGHT and row[0] == claim.body_sha256):
                taken.append(claim)
                claimed[claim.key] = claim.body_sha256
                results.append(Claimed())
            else:
                results.append(_classify(row, claim.body_sha256))
        if taken:
            values = [value for c in taken for value in (c.key, c.body_sha256, owner, c.now)]
            if db.execute(_claim_rows(len(taken)), values).rowcount != len(taken):  # unreachable: one writer
                raise StoreError("a claim found a row changed since it was read")  # rolled back
    return results


def _complete_all(db: sqlite3.Connection, owner: str, completes: Sequence[CompleteOp]) -> list[object]:
    """Store the answers; per answer, 1 if its statement changed as many rows as it had answers, else 0."""
    results: list[object] = []
    for start, size in row_chunks(len(completes), 4):
        chunk = completes[start : start + size]
        values: list[object] = [value for c in chunk for value in (c.key, c.status, c.body, c.now)]
        changed = db.execute(_complete_rows(size), [*values, owner]).rowcount
        results += [1 if changed == size else 0] * size
    return results


def _run(db: sqlite3.Connection, owner: str, operation: Operation) -> object:
    match operation:
        case ReleaseOp(key=key):
            return db.execute(_RELEASE, (key, owner)).rowcount
        case PruneOp(cutoff=cutoff, limit=limit, in_flight=in_flight):
            done = db.execute(_PRUNE_DONE, {"cutoff": cutoff, "limit": limit}).rowcount
            held = db.execute(_PRUNE_IN_FLIGHT, {"cutoff": cutoff, "owner": owner}).rowcount if in_flight else 0
            return (done, held)
        case FlushOp():
            db.execute(_PROBE_WRITE, (_PROBE_KEY,))
            db.execute(_PROBE_DELETE, (_PROBE_KEY,))
            return None
    raise AssertionError(f"unexpected operation {operation!r}")  # pragma: no cover


def _classify(row: tuple[Any, ...], body_sha256: str) -> Claim:
    """What a claim that did not take the key gets, from the key's row."""
    sha, state, status, response = row
    if sha != body_sha256:
        return Conflict()
    if state == _DONE:
        return Replay(status=int(status), body=bytes(response))
    return Busy()
