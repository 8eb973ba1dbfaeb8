"""The ingest key store's SQLite connection, in a process of its own: the event loop never waits for SQLite's GIL.

`daemon.ingest_keys.SqliteIngestKeyStore` writes its batches through a `KeyStoreProcess`: a child Python process
(``python -m daemon.ingest_keys_process FILE``) that owns the file's one connection and runs
`daemon.ingest_keys_sql.write` for each batch it is sent. On a thread of the daemon, as before, every statement
let go of the GIL while SQLite worked and then waited up to the switch interval to take it back from the busy
event loop, and every such hand-over cost the loop a forced switch: a transaction took ~2.3 ms for ~0.9 ms of
work, and claims waited for it. In its own process it runs at once. Ingest harness, 128 clients, alternating
10 s runs against the thread (two sets of three pairs): a claim's wait ~9 -> ~7 ms, the daemon's own CPU ~190 ->
~155 us a request (the child ~35 us on top), the rate +13 % in one set and +2 % in the other.

The two talk over the child's stdin and stdout: frames of a 4-byte length and a pickle (both ends are this
module, one program), one request and its answer at a time. The child:

- is told nothing but the file; the parent prepares the file (creates, migrates) before starting it;
- ignores SIGINT and SIGTERM: a Ctrl-C or systemd's stop signal reaches the whole process group, and the
  daemon's shutdown still writes the store's queue through it. It stops when its stdin closes: at `close`, or
  when the daemon dies (a kill -9 included), finishing the transaction at hand first;
- answers every request; a failing batch is rolled back and answered with its error, which the parent raises
  again as `sqlite3.Error` or `StoreError`, so the store fails that batch's callers and carries on.

If the child dies (killed, out of memory), or does not answer a batch within `CALL_TIMEOUT` (then it is killed),
the batch under way fails with a `StoreError` and the next one starts a new child. Rows are owned by the store,
not by the child (the owner token is sent with each batch), so claims in flight stay the store's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import sqlite3
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Final, cast

from daemon.ingest_keys_sql import Operation, write
from topics.errors import StoreError

__all__ = ["KeyStoreProcess", "main"]

log = logging.getLogger(__name__)

_LENGTH: Final = struct.Struct(">I")
# A checkpoint runs inside the commit that crosses this many WAL pages, and the claims of the next batch wait for it:
# the dedup stores' 4,000 (`consumers.sqlite_files`) made it the ingest's latency tail. SQLite's default of 1,000:
# at a paced 2,800 webhooks/s the p99 fell from ~27 to ~18 ms (medians of six alternating pairs; 13.6-21.7 against
# 20.0-53.7 ms); at full load the rate fell 1-4 % (two pairs) and the child's CPU rose from 0.18 to 0.20 cores.
CHECKPOINT_PAGES: Final = 1000
STOP_TIMEOUT: Final = 10.0  # seconds a child may take to finish its transaction and exit before it is killed
# Seconds a child may take to answer a batch before it is taken for hung (a stalled disk, a stopped process) and
# killed: far above any transaction (~1 ms; a checkpoint, tens of ms; SQLite's busy timeout, 5 s), and short enough
# that the webhooks waiting for their claims get a 503 they can retry instead of hanging with them.
CALL_TIMEOUT: Final = 30.0

# Answers: (kind, value). "ok" carries the result; the others a message.
_OK: Final = "ok"
_SQLITE_ERROR: Final = "sqlite-error"
_STORE_ERROR: Final = "store-error"
_FAILED: Final = "failed"


class KeyStoreProcess:
    """The parent's end: start the child, send it batches (one at a time), stop it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.call_timeout = CALL_TIMEOUT
        self._child: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        """The child's process id while one runs (for tests and diagnostics)."""
        return None if self._child is None or self._child.returncode is not None else self._child.pid

    async def start(self) -> None:
        """Start the child and wait until its connection is open; `StoreError` if it cannot start or open the file."""
        try:
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                __name__,
                str(self.path),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
        except OSError as exc:  # no such interpreter, no process or file descriptor left
            raise StoreError(f"ingest key store {self.path}: cannot start its process: {exc}") from exc
        self._child = child
        try:
            await self._answer(child)
        except BaseException:
            await self._abandon()
            raise

    async def write(self, owner: str, batch: list[Operation]) -> tuple[list[object], bool]:
        """Run `write` on the child's connection (per operation its result, and whether a row changed); a child
        that died is started again first."""
        return cast(tuple[list[object], bool], await self._call(("write", owner, batch)))

    async def pragma(self, name: str) -> object:
        """The value of ``PRAGMA name`` on the child's connection (for tests and diagnostics)."""
        return await self._call(("pragma", name))

    async def stop(self) -> None:
        """Close the child's stdin and wait for it to exit (killed after `STOP_TIMEOUT`)."""
        child, self._child = self._child, None
        if child is None:
            return
        assert child.stdin is not None
        child.stdin.close()
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await child.wait()
        except TimeoutError:
            log.error("ingest key store %s: its process did not exit in %.0f s; killed", self.path, STOP_TIMEOUT)
            child.kill()
            await child.wait()

    async def _call(self, request: tuple[Any, ...]) -> object:
        child = self._child
        if child is None or child.returncode is not None:
            await self.start()
            child = self._child
            assert child is not None
        assert child.stdin is not None
        frame = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            async with asyncio.timeout(self.call_timeout):
                try:
                    child.stdin.write(_LENGTH.pack(len(frame)) + frame)
                    await child.stdin.drain()
                except ConnectionError as exc:  # it had died: the answer would be the end of its stdout
                    raise await self._exited(child) from exc
                return await self._answer(child)
        except (sqlite3.Error, StoreError):
            raise  # the child's answer, or its end: the next batch starts another
        except TimeoutError:
            await self._abandon()
            message = f"its process did not answer in {self.call_timeout:g} s and was killed"
            log.error("ingest key store %s: %s; the next batch starts another", self.path, message)
            raise StoreError(f"ingest key store {self.path}: {message}") from None
        except BaseException:
            # Cancelled between a request and its answer: the next answer on the pipe would be this one's.
            await self._abandon()
            raise

    async def _answer(self, child: asyncio.subprocess.Process) -> object:
        """The child's next answer, raised again if it is an error; `StoreError` if the child ended instead."""
        assert child.stdout is not None
        try:
            (length,) = _LENGTH.unpack(await child.stdout.readexactly(_LENGTH.size))
            frame = await child.stdout.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise await self._exited(child) from exc
        kind, value = pickle.loads(frame)  # noqa: S301 -- our own child
        if kind == _OK:
            return value
        if kind == _SQLITE_ERROR:
            raise sqlite3.Error(value)
        if kind == _STORE_ERROR:
            raise StoreError(value)
        raise StoreError(f"ingest key store {self.path}: its process failed: {value}")

    async def _exited(self, child: asyncio.subprocess.Process) -> StoreError:
        """The error for a child that ended (killed, out of memory, or failing at start), once it is reaped."""
        code = await child.wait()
        if self._child is child:
            self._child = None
        log.error("ingest key store %s: its process exited (code %s); the next batch starts another", self.path, code)
        return StoreError(f"ingest key store {self.path}: its process exited (code {code})")

    async def _abandon(self) -> None:
        child, self._child = self._child, None
        if child is not None and child.returncode is None:
            child.kill()
            with contextlib.suppress(ProcessLookupError):
                await child.wait()


# --- the child ----------------------------------------------------------------------------------------------------


def _send(out: IO[bytes], kind: str, value: object) -> None:
    frame = pickle.dumps((kind, value), protocol=pickle.HIGHEST_PROTOCOL)
    out.write(_LENGTH.pack(len(frame)) + frame)
    out.flush()


def _receive(into: IO[bytes]) -> Any:
    head = into.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None  # the parent closed the pipe, or died
    (length,) = _LENGTH.unpack(head)
    return pickle.loads(into.read(length))  # noqa: S301 -- our own parent


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; `write` opens one per batch.
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA busy_timeout = 5000")
        db.execute(f"PRAGMA wal_autocheckpoint = {CHECKPOINT_PAGES}")
    except BaseException:
        db.close()
        raise
    return db


def _serve(db: sqlite3.Connection, into: IO[bytes], out: IO[bytes]) -> None:
    while (request := _receive(into)) is not None:
        try:
            match request:
                case ("write", str(owner), list(batch)):
                    result: object = write(db, owner, batch)
                case ("pragma", str(name)) if name.isidentifier():
                    result = db.execute(f"PRAGMA {name}").fetchone()[0]
                case _:
                    raise ValueError(f"unknown request {request[:1]!r}")
        except sqlite3.Error as exc:
            _send(out, _SQLITE_ERROR, str(exc))
        except StoreError as exc:
            _send(out, _STORE_ERROR, str(exc))
        except Exception as exc:  # a bug: said, not fatal; the parent fails the batch's callers
            _send(out, _FAILED, repr(exc))
        else:
            _send(out, _OK, result)


def main(argv: Sequence[str] = sys.argv) -> int:
    """``python -m daemon.ingest_keys_process FILE``: serve the parent on stdin/stdout until stdin closes."""
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.SIG_IGN)
    # The protocol owns stdout: keep it, and send whatever else writes to fd 1 to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    into = sys.stdin.buffer
    try:
        db = _connect(Path(argv[1]))
    except sqlite3.Error as exc:
        _send(out, _SQLITE_ERROR, str(exc))
        return 1
    with contextlib.closing(db):
        _send(out, _OK, None)
        _serve(db, into, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
