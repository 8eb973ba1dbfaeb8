"""The ingest idempotency store: one answer per ``Idempotency-Key``, so a retry never publishes twice.

For each key the store remembers the SHA-256 of the request body and, once the order is published, the answer
that was given. A request first *claims* its key:

- `Claimed`  -- the key is new (or its earlier holder crashed): publish, then `complete` or `release` it;
- `Replay`   -- the same body was answered before: send that answer again, publish nothing;
- `Conflict` -- the key was used with a different body: a client bug, never publish;
- `Busy`     -- the same key is being handled right now by this process: the client should retry later.

A claimed row is *in flight* and carries the owner token of the store instance that claimed it (random per
instance). The instance knows which of its keys a request holds (below); any other row in flight is held by
nobody: another owner's that crashed, or this owner's whose answer, release or claim result was lost with a
failed batch. Such a row would otherwise block its key (409) forever, or until a restart, so a claim with the
same body takes it over. The order may then be published twice: that is Kafka's at-least-once, and the same
key and body make the same event id, which the consumers' dedup absorbs. The consequence is that **one store
instance owns a file**: two live processes on one file would steal each other's in-flight rows.

`SqliteIngestKeyStore` is the production store: one file, WAL, ``synchronous=NORMAL`` (a power cut may lose
the last answers but never corrupts the file; a lost answer only means a retry is published again, which dedup
absorbs). Because one instance owns the file, it needs no lock:

1. It keeps the keys it holds in flight in memory, so a repeat of one is `Busy` (or `Conflict`) at once.
2. Every other operation is queued to one writer task, which runs all the operations queued meanwhile in one
   transaction, in the order they were called (group commit: one round trip to the store's process per batch,
   not two per request; the process holds the file's connection, see `daemon.ingest_keys_process`). A claim
   therefore sees every `complete` and `release` called before it. An idle writer starts `claim_delay` (2 ms)
   after the first claim, so that claims arriving one by one (a moderate, steady rate) still share
   transactions: started at once, it wrote one transaction per request at ~1,700 requests/s, and the daemon
   spent ~490 us of CPU per request instead of ~400 (measured with the connection on a thread). Under load the
   writer is busy and the delay never applies: what queues meanwhile is the next batch.
3. `claim` returns once its row is committed: the body's digest is in the file before anything is published,
   so after a crash the key still refuses another body.
4. `complete` and `release` return once queued, not written: later claims see them (step 2). They ride with
   the next claim's transaction, or are written on their own after `answer_delay` (0.05 s) if no claim comes:
   under load that halves the transactions. A crash before that loses the answer (or the release) only: the
   row stays in flight with the dead owner, a retry with the same body takes it over and publishes again under
   the same event id, which the consumers' dedup absorbs -- the window the step between the broker's ack and
   storing the answer always had, at most `answer_delay` plus one transaction longer. `close` writes the queue.

The table, its statements and the writing of one batch are in `daemon.ingest_keys_sql`; what a claim gets is in
`daemon.ingest_claims` (re-exported here).

`MemoryIngestKeyStore` is its twin for the HTTP handler's unit tests. Times are unix seconds passed in by the
caller (``now``), so the stores never read a clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Protocol, Self, cast

from consumers.sqlite_files import PRUNE_CHUNK, PRUNE_PAUSE, prepare_wal_file, space_note
from daemon.ingest_claims import Busy, Claim, Claimed, Conflict, Replay
from daemon.ingest_keys_process import KeyStoreProcess
from daemon.ingest_keys_sql import (
    LAYOUT,
    MAX_BATCH,
    SCHEMA,
    TABLE,
    ClaimOp,
    CompleteOp,
    FlushOp,
    Operation,
    PruneOp,
    ReleaseOp,
    migrate,
)
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

log = logging.getLogger(__name__)


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
        """Store the answer for a key we claimed; later claims with the same body get a `Replay` of it.

        It may be written after this returns (the SQLite store writes it with the next claim, or within its
        `answer_delay`); a crash before that only loses the answer, see the module docstring.
        """
        ...

    async def release(self, key: str) -> None:
        """Forget our in-flight claim (publishing failed) so a retry can claim it; no-op if not held."""
        ...

    async def prune(self, older_than: float) -> int:
        """Delete answers completed before `older_than` (and crashed owners' claims made before it)."""
        ...


class SqliteIngestKeyStore:
    """The production `IngestKeyStore`: one SQLite file, one connection, one instance per file, no lock.

    Use ``async with SqliteIngestKeyStore(path) as store`` (or `open`/`close`). Every sqlite3 error (the file's,
    or its process's) is raised as `StoreError` naming the file. The module docstring says what is written when.
    """

    def __init__(self, path: Path | str, *, answer_delay: float = 0.05, claim_delay: float = 0.002) -> None:
        """`answer_delay`: how long a queued `complete` or `release` may wait for a claim to ride with;
        `claim_delay`: how long an idle writer waits after a claim (or `prune`, `flush`) for others to share its
        transaction (0: it starts at once)."""
        self.path = Path(path)
        self.transactions = 0  # written batches, for tests and benchmarks: how well operations share them
        self.failing: str | None = None  # why the last batch failed, until one is written again (`orderbus status`)
        self._recheck: asyncio.Task[None] | None = None
        self._answer_delay = answer_delay
        self._claim_delay = claim_delay
        self.prune_pause = PRUNE_PAUSE  # seconds between a prune's transactions (`prune`)
        self._owner = secrets.token_hex(8)
        self._process: KeyStoreProcess | None = None
        self._held: dict[str, str] = {}  # key -> body digest, for every in-flight row of ours
        self._closing: set[str] = set()  # held keys whose answer or release is queued, not yet written
        self._queue: list[Queued] = []
        self._awaited = 0  # operations in the queue that a caller awaits (claim, prune, flush)
        self._writer: asyncio.Task[None] | None = None
        self._delayed: asyncio.TimerHandle | None = None  # the writer's start, due at loop time `_delayed_due`
        self._delayed_due = 0.0

    async def open(self) -> None:
        """Prepare the file (WAL, the table; a file of an earlier layout is rebuilt, see
        `daemon.ingest_keys_sql.migrate`) on a worker thread, then start the process that holds its connection
        (`daemon.ingest_keys_process`). A bad path or a corrupt file fails in the first step, as `StoreError`."""
        if self._process is not None:
            return
        try:
            await asyncio.to_thread(prepare_wal_file, self.path, SCHEMA, "ingest key store", migrate, layout=LAYOUT)
        except sqlite3.Error as exc:
            raise self._error("open", exc) from exc
        process = KeyStoreProcess(self.path)
        try:
            await process.start()
        except sqlite3.Error as exc:
            raise self._error("open", exc) from exc
        self._process = process

    async def close(self) -> None:
        """Write what is queued, then stop the process; in-flight rows stay and the next instance may take
        them over."""
        if self._process is None:
            return
        try:
            while self._queue or (self._writer is not None and not self._writer.done()):
                await asyncio.wait([self._start_writer()])  # everything queued, awaited or not
        finally:
            if self._delayed is not None:
                self._delayed.cancel()
            process, self._process = self._process, None
            self._held.clear()
            self._closing.clear()
            await process.stop()

    @property
    def process(self) -> KeyStoreProcess:
        """The process holding the connection (`StoreError` if not open)."""
        return self._connection()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def claim(self, key: str, body_sha256: str, now: float) -> Claim:
        self._connection()
        held = self._held.get(key)
        if held is not None and key not in self._closing:  # a closing key's claim is queued behind its answer
            return Busy() if held == body_sha256 else Conflict()
        result: asyncio.Future[Claim] = asyncio.get_running_loop().create_future()
        self._enqueue(ClaimOp(key, body_sha256, now), result)
        try:
            return await result
        except asyncio.CancelledError:
            # Cancelled in the loop turn its batch was settled: the key was taken, and nobody will publish or
            # answer (a cancellation before the settle is `_settle`'s to undo).
            if result.done() and not result.cancelled() and result.result() == Claimed():
                self._give_up(key)
            raise

    # A key stays held until its answer or release is written (`_settle`), or has failed (`_fail`). Given back at
    # once, a claim of it queued *before* the answer or release (behind more than `MAX_BATCH` operations, so
    # that it reached the file batches after the claim that took the key) found the row in flight and held by
    # nobody, and took it over (`daemon.ingest_keys_sql._claim_all`): a second publish, and the release that
    # followed deleted the new holder's row (a randomized stress test of the store found it). Such a claim is
    # `Busy` (`_unheld`); one queued after the answer goes to the file behind it and gets `Replay`, as before.

    async def complete(self, key: str, status: int, body: bytes, now: float) -> None:
        self._connection()
        if key not in self._held or key in self._closing:
            raise NotClaimedError(f"ingest key store {self.path}: complete() for a key not claimed by this store")
        self._closing.add(key)
        self._enqueue(CompleteOp(key, status, bytes(body), now))

    async def release(self, key: str) -> None:
        self._connection()
        self._give_up(key)

    def _give_up(self, key: str) -> None:
        """Queue the release of a key this store holds (once)."""
        if key in self._held and key not in self._closing:
            self._closing.add(key)
            self._enqueue(ReleaseOp(key))

    async def prune(self, older_than: float) -> int:
        """Delete answered rows older than `older_than` and the rows in flight that nobody holds, `PRUNE_CHUNK`
        rows a transaction and `prune_pause` apart (see `daemon.ingest_keys_sql.PruneOp`); the number deleted."""
        deleted, first = 0, True
        while True:
            self._connection()
            result: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
            self._enqueue(PruneOp(older_than, PRUNE_CHUNK, in_flight=first), result)
            done, held = await result
            deleted, first = deleted + done + held, False
            if done < PRUNE_CHUNK:
                return deleted
            await asyncio.sleep(self.prune_pause)

    def recheck(self) -> None:
        """While `failing`, write a flush (one at a time), which writes a row as a claim does: written, it clears
        `failing`. A store that healed says so without waiting for a webhook with a key, which a load balancer that
        reads /readyz would not send."""
        if self.failing is None or (self._recheck is not None and not self._recheck.done()):
            return
        self._recheck = asyncio.create_task(self._flush_quietly(), name="ingest-keys-recheck")

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(StoreError):  # `failing` says why
            await self.flush()

    async def flush(self) -> None:
        """Return once every operation queued before this call is written (or has failed); its transaction writes
        a row (and deletes it), so it fails where a claim would (see `daemon.ingest_keys_sql.FlushOp`)."""
        self._connection()
        result: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(FlushOp(), result)
        await result

    # --- the writer -------------------------------------------------------------------------------------

    def _enqueue(self, operation: Operation, waiter: asyncio.Future[Any] | None = None) -> None:
        """Queue `operation` (and who awaits its outcome); start the writer within `claim_delay` if someone
        awaits it, else `answer_delay`."""
        self._queue.append(Queued(operation, waiter))
        if waiter is not None:
            self._awaited += 1
        if self._writer is not None and not self._writer.done():
            return  # it takes the queue before it stops
        self._start_writer_within(self._claim_delay if self._awaited else self._answer_delay)

    def _start_writer_within(self, delay: float) -> None:
        """Start the writer in `delay` seconds, or at once for 0; a start due sooner already stays as it is."""
        loop = asyncio.get_running_loop()
        if delay <= 0:
            if self._writer is not None and not self._writer.done() and asyncio.current_task() is self._writer:
                loop.call_soon(self._start_writer)  # from the ending writer: once it has ended, not never
            else:
                self._start_writer()
            return
        due = loop.time() + delay
        if self._delayed is not None:
            if self._delayed_due <= due:
                return
            self._delayed.cancel()
        self._delayed = loop.call_later(delay, self._start_writer)
        self._delayed_due = due

    def _start_writer(self) -> asyncio.Task[None]:
        if self._delayed is not None:
            self._delayed.cancel()
            self._delayed = None
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_while_queued(), name="ingest-keys-writer")
        return self._writer

    async def _write_while_queued(self) -> None:
        """Write the queue, a batch (one transaction) at a time, until nothing queued is awaited any more.

        What is left then (answers and releases queued during the last transaction) waits for the next claim,
        or `answer_delay`.
        """
        first = True
        while self._queue and (self._awaited or first):
            first = False  # a delayed start writes what is queued, awaited or not
            batch = self._queue[:MAX_BATCH]
            del self._queue[:MAX_BATCH]
            self._awaited -= sum(1 for queued in batch if queued.waiter is not None)
            batch = self._unheld(batch)
            if not batch:
                continue
            try:
                results, wrote = await self._connection().write(self._owner, [queued.operation for queued in batch])
            except Exception as exc:
                self._fail(batch, exc)
                continue
            except BaseException:
                for queued in (*batch, *self._queue):
                    if queued.waiter is not None:
                        queued.waiter.cancel()
                raise
            self.transactions += 1
            if wrote:  # a batch that changed no row commits on a full disk too
                self.failing = None
            self._settle(batch, results)
        if self._queue:
            self._start_writer_within(self._answer_delay)

    def _unheld(self, batch: list[Queued]) -> list[Queued]:
        """`batch` without the claims of keys held now, which are answered here (`Busy`, or `Conflict`).

        A claim is queued only for a key not held, but one queued while an earlier claim of its key was being
        written finds the key held once that batch is settled. It must not reach the file: a row in flight that
        this batch did not claim is taken over there (`daemon.ingest_keys_sql._claim_all`)."""
        held = self._held
        if not held:
            return batch
        kept: list[Queued] = []
        closed: set[str] = set()  # keys whose answer or release comes earlier in this batch: their rows are done
        for queued in batch:
            operation, waiter = queued
            if isinstance(operation, (CompleteOp, ReleaseOp)):
                closed.add(operation.key)
            elif (
                isinstance(operation, ClaimOp)
                and operation.key not in closed
                and (digest := held.get(operation.key)) is not None
            ):
                if waiter is not None and not waiter.done():
                    waiter.set_result(Busy() if digest == operation.body_sha256 else Conflict())
                continue
            kept.append(queued)
        return kept

    def _settle(self, batch: Sequence[Queued], results: Sequence[object]) -> None:
        for (operation, waiter), outcome in zip(batch, results, strict=True):
            match operation:
                case ClaimOp() if waiter is not None and waiter.cancelled():
                    if outcome == Claimed():
                        # Nobody will publish: give the key back, first thing. Queued behind a retry's claim of the
                        # key (queued meanwhile), the release would delete the row that claim has just taken over.
                        self._queue.insert(0, Queued(ReleaseOp(operation.key), None))
                case ClaimOp():
                    if outcome == Claimed():
                        self._held[operation.key] = operation.body_sha256
                    if waiter is not None:
                        waiter.set_result(cast(Claim, outcome))
                case CompleteOp() | ReleaseOp():
                    self._give_back(operation.key)
                    if isinstance(operation, CompleteOp) and outcome != 1:  # a bug: only held keys, each once
                        log.error("ingest key store %s: an answer was stored for a key not held", self.path)
                case PruneOp() | FlushOp() if waiter is not None and not waiter.done():
                    waiter.set_result(outcome)

    def _fail(self, batch: Sequence[Queued], exc: Exception) -> None:
        """Fail the batch's callers with `exc` (a sqlite3 error as `StoreError`); `failing` says why until the next
        batch is written."""
        note = space_note(self.path) if isinstance(exc, sqlite3.Error) else ""  # once: the file system is asked
        self.failing = str(self._error("write", exc, note) if isinstance(exc, sqlite3.Error) else exc)
        unwritten = 0
        for operation, waiter in batch:
            if isinstance(operation, (CompleteOp, ReleaseOp)):
                self._give_back(operation.key)
            error = self._error(operation.name, exc, note) if isinstance(exc, sqlite3.Error) else exc
            if waiter is None:
                unwritten += 1
            elif not waiter.done():
                waiter.set_exception(error)
        if unwritten:
            # Their rows stay in flight, held by nobody: a retry with the same body takes its row over (see `_unheld`).
            log.error("ingest key store %s: %d answers or releases not stored: %s", self.path, unwritten, exc)

    def _give_back(self, key: str) -> None:
        """`key`'s answer or release was written, or failed: no request of this store holds it any more."""
        if key in self._closing:
            self._closing.discard(key)
            self._held.pop(key, None)

    def _connection(self) -> KeyStoreProcess:
        if self._process is None:
            raise StoreError(f"ingest key store {self.path} is not open")
        return self._process

    def _error(self, operation: str, exc: sqlite3.Error, note: str | None = None) -> StoreError:
        """`exc` as a `StoreError` naming the file, and its free space when low (`note`: already asked)."""
        note = space_note(self.path) if note is None else note
        return StoreError(f"ingest key store {self.path}: {operation} failed: {exc}{note}")


class Queued(NamedTuple):
    """An operation in the writer's queue, and the future of the caller awaiting its outcome, if any."""

    operation: Operation
    waiter: asyncio.Future[Any] | None


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
