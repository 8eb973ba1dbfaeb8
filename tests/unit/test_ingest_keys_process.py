"""The key store's own process: what it answers, and what the store does when it dies or is told to stop.

The child's loop is tested on in-memory pipes; the rest with real child processes and real files.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from consumers.sqlite_files import prepare_wal_file
from daemon.ingest_keys import Claimed, Replay, SqliteIngestKeyStore, body_sha256
from daemon.ingest_keys_process import _serve
from daemon.ingest_keys_sql import LAYOUT, SCHEMA, TABLE, ClaimOp, migrate
from topics.errors import StoreError

BODY = body_sha256(b'{"order": "A-1"}')
ANSWER = b'{"status": "accepted"}'
LENGTH = struct.Struct(">I")


def frames(*requests: object) -> io.BytesIO:
    out = io.BytesIO()
    for request in requests:
        frame = pickle.dumps(request)
        out.write(LENGTH.pack(len(frame)) + frame)
    out.seek(0)
    return out


def answers(out: io.BytesIO) -> list[tuple[str, object]]:
    out.seek(0)
    found = []
    while head := out.read(LENGTH.size):
        (length,) = LENGTH.unpack(head)
        found.append(pickle.loads(out.read(length)))  # noqa: S301 -- what the test wrote
    return found


def test_the_child_answers_each_request_and_carries_on_after_a_failing_one(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite3"
    prepare_wal_file(path, SCHEMA, "ingest key store", migrate, layout=LAYOUT)
    db = sqlite3.connect(path, isolation_level=None)
    requests = frames(
        ("write", "owner-1", [ClaimOp("k1", BODY, 1.0)]),
        ("pragma", "journal_mode"),
        ("pragma", "journal_mode; DROP TABLE ingest_keys"),
        ("reboot",),
    )
    out = io.BytesIO()
    _serve(db, requests, out)
    db.execute(f"ALTER TABLE {TABLE} RENAME TO elsewhere")
    _serve(db, frames(("write", "owner-1", [ClaimOp("k2", BODY, 2.0)])), after := io.BytesIO())
    db.close()
    got = answers(out)
    assert got[:2] == [("ok", ([Claimed()], True)), ("ok", "wal")]
    assert [kind for kind, _ in got[2:]] == ["failed", "failed"]
    assert "unknown request" in str(got[3][1])
    [(kind, message)] = answers(after)
    assert kind == "sqlite-error"
    assert "no such table" in str(message)


async def test_a_killed_process_fails_the_batch_under_way_and_the_next_starts_another(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite3"
    async with SqliteIngestKeyStore(path, claim_delay=0) as store:
        assert await store.claim("held", BODY, now=1.0) == Claimed()
        first = store.process.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert store.failing is None
        with pytest.raises(StoreError, match="process exited"):
            await store.claim("k1", BODY, now=2.0)
        assert store.failing is not None
        assert "process exited" in store.failing  # what `orderbus status` shows until a batch is written again
        # A new process, and the rows are still this store's: the held key's answer is stored.
        assert await store.claim("k1", BODY, now=3.0) == Claimed()
        assert store.failing is None
        assert store.process.pid not in (None, first)
        await store.complete("held", 202, ANSWER, now=3.0)
        assert await store.claim("held", BODY, now=4.0) == Replay(status=202, body=ANSWER)


async def test_a_recheck_clears_failing_once_the_store_writes_again(tmp_path: Path) -> None:
    # /readyz asks for it: with no webhook routed to a not-ready instance, nothing else would write a batch
    async with SqliteIngestKeyStore(tmp_path / "keys.sqlite3", claim_delay=0) as store:
        assert await store.claim("k0", BODY, now=1.0) == Claimed()
        pid = store.process.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(StoreError, match="process exited"):
            await store.claim("k1", BODY, now=2.0)
        assert store.failing is not None
        store.recheck()
        store.recheck()  # one at a time
        await store.flush()
        assert store.failing is None
        store.recheck()  # nothing to do once it writes


async def test_a_recheck_clears_failing_only_once_a_row_can_be_written_again(tmp_path: Path) -> None:
    # On a full disk an empty transaction commits (it writes nothing) while every claim fails: the recheck's empty
    # batch cleared `failing`, and /readyz said ready while every webhook with a key got 503. Here a trigger makes
    # every row written fail as the full disk did, and an empty transaction still commits.
    path = tmp_path / "keys.sqlite3"
    async with SqliteIngestKeyStore(path, claim_delay=0) as store:
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute(f"CREATE TRIGGER full BEFORE INSERT ON {TABLE} BEGIN SELECT RAISE(ABORT, 'disk is full'); END")
            db.commit()
            with pytest.raises(StoreError, match="disk is full"):
                await store.claim("k1", BODY, now=1.0)
            assert await store.process.write("owner", []) == ([], False)  # what the recheck wrote before: it commits
            with pytest.raises(StoreError, match="disk is full"):
                await store.flush()  # what the recheck writes now
            assert store.failing is not None
            assert "disk is full" in store.failing
            db.execute("DROP TRIGGER full")
            db.commit()
        store.recheck()
        await store.flush()
        assert store.failing is None
        assert await store.claim("k1", BODY, now=2.0) == Claimed()
        assert await store.process.write("owner", [ClaimOp("\x00flush", BODY, 3.0)]) == ([Claimed()], True), (
            "no row left"
        )


async def test_only_a_batch_that_writes_a_row_clears_failing(tmp_path: Path) -> None:
    # Batches that commit without writing, on a full disk too, said the store wrote again: the hourly prune with
    # nothing to delete, and a retried webhook's claim answered from its row (Replay). /readyz then said ready.
    path = tmp_path / "keys.sqlite3"
    async with SqliteIngestKeyStore(path, claim_delay=0) as store:
        store.prune_pause = 0
        assert await store.claim("answered", BODY, now=1.0) == Claimed()
        await store.complete("answered", 202, ANSWER, now=1.0)
        await store.flush()
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute(f"CREATE TRIGGER full BEFORE INSERT ON {TABLE} BEGIN SELECT RAISE(ABORT, 'disk is full'); END")
            db.commit()
            with pytest.raises(StoreError, match="disk is full"):
                await store.claim("k1", BODY, now=2.0)
            assert await store.prune(older_than=0.5) == 0
            assert await store.claim("answered", BODY, now=3.0) == Replay(status=202, body=ANSWER)
            assert store.failing is not None
            assert "disk is full" in store.failing
            db.execute("DROP TRIGGER full")
            db.commit()
        assert await store.prune(older_than=10.0) == 1, "the answered key's row"
        assert store.failing is None, "a prune that deleted a row wrote"


async def test_a_hung_process_is_killed_its_batch_fails_and_the_next_starts_another(tmp_path: Path) -> None:
    # A child that stops answering (a stalled disk, a stopped process) held every keyed webhook waiting for good.
    async with SqliteIngestKeyStore(tmp_path / "keys.sqlite3", claim_delay=0) as store:
        assert await store.claim("held", BODY, now=1.0) == Claimed()
        hung = store.process.pid
        assert hung is not None
        store.process.call_timeout = 0.05  # it never answers: how long it is given does not change the outcome
        os.kill(hung, signal.SIGSTOP)
        with pytest.raises(StoreError, match=r"did not answer in 0\.05 s and was killed"):
            await store.claim("k1", BODY, now=2.0)
        with pytest.raises(ProcessLookupError):
            os.kill(hung, 0)  # killed, and reaped
        assert await store.claim("k1", BODY, now=3.0) == Claimed()
        assert store.process.pid not in (None, hung)


async def test_the_process_ignores_stop_signals_and_exits_when_the_store_closes(tmp_path: Path) -> None:
    # systemd's SIGTERM (and a terminal's SIGINT) reach every process of the service: the daemon's shutdown
    # still writes the store's queue through its process, so only the store stops it.
    store = SqliteIngestKeyStore(tmp_path / "keys.sqlite3", answer_delay=60.0, claim_delay=0)
    await store.open()
    pid = store.process.pid
    assert pid is not None
    await store.claim("k", BODY, now=1.0)
    await store.complete("k", 202, ANSWER, now=2.0)  # queued, for `answer_delay`
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGINT)  # both pending in the child before close() writes to it
    await store.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone, and reaped
    async with SqliteIngestKeyStore(tmp_path / "keys.sqlite3") as again:
        assert await again.claim("k", BODY, now=3.0) == Replay(status=202, body=ANSWER)


async def test_a_file_that_is_not_a_database_fails_open_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite3"
    path.write_bytes(b"not a database, " * 512)
    with pytest.raises(StoreError, match=r"keys\.sqlite3"):
        await SqliteIngestKeyStore(path).open()


async def test_a_process_that_cannot_start_fails_open_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.executable", str(tmp_path / "no-python"))
    with pytest.raises(StoreError, match="cannot start its process"):
        await SqliteIngestKeyStore(tmp_path / "keys.sqlite3").open()


async def test_a_process_that_ends_at_start_fails_open_with_its_exit_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.executable", shutil.which("false"))
    with pytest.raises(StoreError, match=r"process exited \(code 1\)"):
        await SqliteIngestKeyStore(tmp_path / "keys.sqlite3").open()


def test_the_child_loads_neither_pydantic_nor_the_order_models() -> None:
    # It needs `topics.errors` only; the package's names load on first use, so it starts in a third of the time.
    code = "import sys, daemon.ingest_keys_process; print(sorted(m for m in sys.modules if m.startswith(LOADED)))"
    code = code.replace("LOADED", repr(("pydantic", "topics.")))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['topics.errors']"
