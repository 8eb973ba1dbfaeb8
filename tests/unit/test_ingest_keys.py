"""The ingest idempotency store: both implementations give the same answers; the SQLite one also persists."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from daemon import ingest_keys
from daemon.ingest_keys import (
    TABLE,
    Busy,
    Claim,
    Claimed,
    Conflict,
    IngestKeyStore,
    MemoryIngestKeyStore,
    NotClaimedError,
    Replay,
    SqliteIngestKeyStore,
    body_sha256,
)
from daemon.ingest_keys_process import CHECKPOINT_PAGES
from daemon.ingest_keys_sql import LAYOUT, MAX_BATCH, SCHEMA, ClaimOp, CompleteOp, Operation, migrate, write
from topics.errors import ConfigError, StoreError

BODY_A = body_sha256(b'{"order": "A-1"}')
BODY_B = body_sha256(b'{"order": "B-2"}')
ANSWER = b'{"status": "accepted", "order": "A-1"}'


@pytest.fixture(params=["sqlite", "memory"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[IngestKeyStore]:
    if request.param == "memory":
        yield MemoryIngestKeyStore()
        return
    async with SqliteIngestKeyStore(tmp_path / "ingest.sqlite3") as sqlite_store:
        yield sqlite_store


def test_body_sha256_is_hex_sha256_of_the_raw_body() -> None:
    assert body_sha256(b"abc") == hashlib.sha256(b"abc").hexdigest()


# --- the four answers -------------------------------------------------------------------------------------


async def test_a_new_key_is_claimed_then_busy_while_in_flight(store: IngestKeyStore) -> None:
    assert await store.claim("k", BODY_A, now=1.0) == Claimed()
    assert await store.claim("k", BODY_A, now=2.0) == Busy()


async def test_a_completed_key_replays_its_first_answer(store: IngestKeyStore) -> None:
    await store.claim("k", BODY_A, now=1.0)
    await store.complete("k", 202, ANSWER, now=2.0)
    assert await store.claim("k", BODY_A, now=3.0) == Replay(status=202, body=ANSWER)
    assert await store.claim("k", BODY_A, now=4.0) == Replay(status=202, body=ANSWER)


async def test_replayed_bytes_are_exact(store: IngestKeyStore) -> None:
    binary = bytes(range(256)) + b"\x00"
    await store.claim("k", BODY_A, now=1.0)
    await store.complete("k", 200, binary, now=1.0)
    assert await store.claim("k", BODY_A, now=2.0) == Replay(status=200, body=binary)


async def test_empty_answer_body_replays_as_empty_bytes(store: IngestKeyStore) -> None:
    await store.claim("k", BODY_A, now=1.0)
    await store.complete("k", 204, b"", now=1.0)
    assert await store.claim("k", BODY_A, now=2.0) == Replay(status=204, body=b"")


async def test_a_different_body_is_a_conflict_while_in_flight(store: IngestKeyStore) -> None:
    await store.claim("k", BODY_A, now=1.0)
    assert await store.claim("k", BODY_B, now=2.0) == Conflict()


async def test_a_different_body_is_a_conflict_once_done(store: IngestKeyStore) -> None:
    await store.claim("k", BODY_A, now=1.0)
    await store.complete("k", 202, ANSWER, now=2.0)
    assert await store.claim("k", BODY_B, now=3.0) == Conflict()


async def test_keys_are_independent(store: IngestKeyStore) -> None:
    await store.claim("k1", BODY_A, now=1.0)
    assert await store.claim("k2", BODY_A, now=1.0) == Claimed()


# --- release and complete ---------------------------------------------------------------------------------


async def test_release_lets_a_retry_claim_again_even_with_another_body(store: IngestKeyStore) -> None:
    await store.claim("k", BODY_A, now=1.0)
    await store.release("k")
    # Nothing was published, so the key carries no promise about its body.
    assert await store.claim("k", BODY_B, now=2.0) == Claimed()


async def test_release_of_an_unknown_key_is_a_no_op(store: IngestKeyStore) -> None:
    await store.release("never-claimed")
    assert await store.claim("never-claimed", BODY_A, now=1.0) == Claimed()


async def test_release_never_forgets_a_completed_answer(store: IngestKeyStore) -> None:
    await store.claim("k", BODY_A, now=1.0)
    await store.complete("k", 202, ANSWER, now=2.0)
    await store.release("k")
    assert await store.claim("k", BODY_A, now=3.0) == Replay(status=202, body=ANSWER)


async def test_complete_without_a_claim_is_refused(store: IngestKeyStore) -> None:
    with pytest.raises(NotClaimedError):
        await store.complete("k", 202, ANSWER, now=1.0)


async def test_complete_twice_is_refused_and_keeps_the_first_answer(store: IngestKeyStore) -> None:
    await store.claim("k", BODY_A, now=1.0)
    await store.complete("k", 202, ANSWER, now=2.0)
    with pytest.raises(StoreError):  # NotClaimedError is a StoreError
        await store.complete("k", 500, b"other", now=3.0)
    assert await store.claim("k", BODY_A, now=4.0) == Replay(status=202, body=ANSWER)


# --- concurrency ------------------------------------------------------------------------------------------


async def test_concurrent_claims_give_exactly_one_claim_per_key(store: IngestKeyStore) -> None:
    keys = [f"key-{i % 20}" for i in range(200)]
    results = await asyncio.gather(*(store.claim(key, BODY_A, now=1.0) for key in keys))
    claimed_keys = [key for key, result in zip(keys, results, strict=True) if result == Claimed()]
    assert sorted(claimed_keys) == sorted(set(keys))
    assert Counter(type(r).__name__ for r in results) == {"Claimed": 20, "Busy": 180}


async def test_concurrent_claims_after_completion_all_replay(store: IngestKeyStore) -> None:
    await store.claim("k", BODY_A, now=1.0)
    await store.complete("k", 202, ANSWER, now=1.0)
    results = await asyncio.gather(*(store.claim("k", BODY_A, now=2.0) for _ in range(50)))
    assert set(results) == {Replay(status=202, body=ANSWER)}


# --- prune ------------------------------------------------------------------------------------------------


async def test_prune_deletes_answers_completed_strictly_before_the_cutoff(store: IngestKeyStore) -> None:
    for key, done_at in (("k100", 100.0), ("k200", 200.0)):
        await store.claim(key, BODY_A, now=done_at - 1)
        await store.complete(key, 202, ANSWER, now=done_at)
    assert await store.prune(older_than=100.0) == 0
    assert await store.prune(older_than=100.5) == 1
    assert await store.prune(older_than=100.5) == 0
    assert await store.claim("k100", BODY_B, now=300.0) == Claimed()  # forgotten: free to use again
    assert await store.claim("k200", BODY_A, now=300.0) == Replay(status=202, body=ANSWER)
    assert await store.prune(older_than=200.000001) == 1


async def test_prune_keeps_our_own_in_flight_claims(store: IngestKeyStore) -> None:
    await store.claim("k", BODY_A, now=1.0)
    assert await store.prune(older_than=1_000.0) == 0
    assert await store.claim("k", BODY_A, now=2.0) == Busy()


# --- SQLite only: persistence, crashed owners, errors -----------------------------------------------------


# --- SQLite only: group commit, what is awaited, the writer -----------------------------------------------


def file_rows(path: Path) -> dict[str, str]:
    """key -> state, as another connection sees the file (only what is committed)."""
    with contextlib.closing(sqlite3.connect(path)) as plain:
        return dict(plain.execute(f"SELECT key, state FROM {TABLE}").fetchall())  # noqa: S608 -- constant


async def test_concurrent_claims_share_one_transaction(tmp_path: Path) -> None:
    async with SqliteIngestKeyStore(tmp_path / "ingest.sqlite3") as store:
        results = await asyncio.gather(*(store.claim(f"key-{i}", BODY_A, now=1.0) for i in range(200)))
        assert set(results) == {Claimed()}
        assert store.transactions == 1


async def test_a_claim_is_in_the_file_when_it_returns(tmp_path: Path) -> None:
    path = tmp_path / "ingest.sqlite3"
    async with SqliteIngestKeyStore(path) as store:
        assert await store.claim("k", BODY_A, now=1.0) == Claimed()
        assert file_rows(path) == {"k": "in_flight"}


async def test_complete_returns_before_the_write_and_later_claims_see_it(tmp_path: Path) -> None:
    path = tmp_path / "ingest.sqlite3"
    async with SqliteIngestKeyStore(path) as store:
        await store.claim("k", BODY_A, now=1.0)
        written = store.transactions
        await store.complete("k", 202, ANSWER, now=2.0)
        assert store.transactions == written  # only queued
        assert file_rows(path) == {"k": "in_flight"}
        assert await store.claim("k", BODY_A, now=3.0) == Replay(status=202, body=ANSWER)
        await store.flush()
        assert file_rows(path) == {"k": "done"}


async def test_answers_ride_with_the_next_claims_transaction(tmp_path: Path) -> None:
    path = tmp_path / "ingest.sqlite3"
    async with SqliteIngestKeyStore(path, answer_delay=3600) as store:
        await store.claim("k1", BODY_A, now=1.0)
        await store.complete("k1", 202, ANSWER, now=2.0)
        assert (store.transactions, file_rows(path)) == (1, {"k1": "in_flight"})
        await store.claim("k2", BODY_A, now=3.0)
        assert (store.transactions, file_rows(path)) == (2, {"k1": "done", "k2": "in_flight"})


class HandTimers:
    """`loop.call_later` replaced: each timer is recorded, and fires only when the test calls its callback."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.timers: list[tuple[float, asyncio.TimerHandle, Callable[[], object]]] = []

    def call_later(self, delay: float, callback: Callable[[], object]) -> asyncio.TimerHandle:
        handle = asyncio.TimerHandle(math.inf, callback, (), self.loop)
        self.timers.append((delay, handle, callback))
        return handle


@pytest.fixture
def hand_timers(monkeypatch: pytest.MonkeyPatch) -> Callable[[], HandTimers]:
    """Call it where the store's timers should stop running by themselves."""

    def install() -> HandTimers:
        timers = HandTimers(asyncio.get_running_loop())
        monkeypatch.setattr(timers.loop, "call_later", timers.call_later)
        return timers

    return install


async def test_a_lone_answer_is_written_after_answer_delay(
    tmp_path: Path, hand_timers: Callable[[], HandTimers]
) -> None:
    path = tmp_path / "ingest.sqlite3"
    async with SqliteIngestKeyStore(path, answer_delay=0.25, claim_delay=0) as store:
        await store.claim("k", BODY_A, now=1.0)
        timers = hand_timers()
        await store.complete("k", 202, ANSWER, now=2.0)
        [(delay, _, fire)] = timers.timers
        assert (delay, file_rows(path)) == (0.25, {"k": "in_flight"})
        writer = fire()
        assert isinstance(writer, asyncio.Task)
        await asyncio.wait([writer])
        assert (store.transactions, file_rows(path)) == (2, {"k": "done"})


async def test_claims_arriving_one_by_one_share_a_transaction_within_claim_delay(
    tmp_path: Path, hand_timers: Callable[[], HandTimers]
) -> None:
    path = tmp_path / "ingest.sqlite3"
    async with SqliteIngestKeyStore(path, answer_delay=0.25, claim_delay=0.002) as store:
        timers = hand_timers()
        first = asyncio.create_task(store.claim("k1", BODY_A, now=1.0))
        await asyncio.sleep(0)  # one turn of the loop each: the claims come one by one
        second = asyncio.create_task(store.claim("k2", BODY_A, now=1.0))
        await asyncio.sleep(0)
        [(delay, _, fire)] = timers.timers  # the second claim found the writer's start already due
        assert (delay, store.transactions, file_rows(path)) == (0.002, 0, {})
        writer = fire()
        assert isinstance(writer, asyncio.Task)
        assert [await first, await second] == [Claimed(), Claimed()]
        assert (store.transactions, file_rows(path)) == (1, {"k1": "in_flight", "k2": "in_flight"})


async def test_a_claim_brings_a_delayed_answer_forward(tmp_path: Path, hand_timers: Callable[[], HandTimers]) -> None:
    path = tmp_path / "ingest.sqlite3"
    async with SqliteIngestKeyStore(path, answer_delay=0.25, claim_delay=0.002) as store:
        first = asyncio.create_task(store.claim("k1", BODY_A, now=1.0))
        timers = hand_timers()
        await asyncio.sleep(0)
        [(_, _, start)] = timers.timers
        start()
        assert await first == Claimed()
        timers.timers.clear()
        await store.complete("k1", 202, ANSWER, now=2.0)
        claim = asyncio.create_task(store.claim("k2", BODY_A, now=3.0))
        await asyncio.sleep(0)
        [(answer_delay, answer_timer, _), (claim_delay, _, fire)] = timers.timers
        assert (answer_delay, answer_timer.cancelled(), claim_delay) == (0.25, True, 0.002)
        fire()
        assert await claim == Claimed()
        assert (store.transactions, file_rows(path)) == (2, {"k1": "done", "k2": "in_flight"})


async def test_claim_delay_zero_starts_the_writer_at_once(tmp_path: Path) -> None:
    async with SqliteIngestKeyStore(tmp_path / "ingest.sqlite3", claim_delay=0) as store:
        claim = asyncio.create_task(store.claim("k", BODY_A, now=1.0))
        await asyncio.sleep(0)  # the claim is queued and the writer started, without any timer
        assert store._delayed is None
        assert await claim == Claimed()


async def test_a_repeat_of_a_held_key_is_answered_without_sqlite(tmp_path: Path) -> None:
    async with SqliteIngestKeyStore(tmp_path / "ingest.sqlite3") as store:
        await store.claim("k", BODY_A, now=1.0)
        written = store.transactions
        assert await store.claim("k", BODY_A, now=2.0) == Busy()
        assert await store.claim("k", BODY_B, now=2.0) == Conflict()
        assert store.transactions == written


async def test_a_claim_whose_caller_is_cancelled_gives_the_key_back(tmp_path: Path) -> None:
    async with SqliteIngestKeyStore(tmp_path / "ingest.sqlite3") as store:
        abandoned = asyncio.create_task(store.claim("k", BODY_A, now=1.0))
        await asyncio.sleep(0)  # one turn of the loop: its claim is queued, not yet written
        abandoned.cancel()
        await store.flush()  # the claim was written; nobody will publish, so it is released
        assert await store.claim("k", BODY_B, now=2.0) == Claimed()


async def test_a_failed_transaction_fails_its_callers_and_the_writer_carries_on(tmp_path: Path) -> None:
    path = tmp_path / "ingest.sqlite3"
    async with SqliteIngestKeyStore(path) as store:
        await store.claim("held", BODY_A, now=1.0)
        with contextlib.closing(sqlite3.connect(path)) as vandal:
            vandal.execute(f"ALTER TABLE {TABLE} RENAME TO elsewhere")
        results = await asyncio.gather(
            store.claim("k1", BODY_A, now=2.0), store.prune(older_than=0.0), return_exceptions=True
        )
        assert [type(r) for r in results] == [StoreError, StoreError]
        assert "claim failed" in str(results[0])
        assert store.failing == f"ingest key store {path}: write failed: no such table: {TABLE}"
        with contextlib.closing(sqlite3.connect(path)) as mender:
            mender.execute(f"ALTER TABLE elsewhere RENAME TO {TABLE}")
        assert await store.claim("k1", BODY_A, now=3.0) == Claimed()
        assert store.failing is None
        await store.complete("held", 202, ANSWER, now=3.0)
        await store.flush()
    assert file_rows(path) == {"held": "done", "k1": "in_flight"}


@pytest.mark.parametrize("lost", ["release", "complete"])
async def test_a_key_whose_release_or_answer_was_lost_with_a_failed_batch_is_claimable_again(
    tmp_path: Path, lost: str
) -> None:
    # The release (publish failed: 503) or the answer (202) was dropped with its failing batch, and the row stayed in
    # flight under this store's owner: every retry with the key got 409 until a restart.
    path = tmp_path / "ingest.sqlite3"
    async with SqliteIngestKeyStore(path) as store:
        assert await store.claim("k", BODY_A, now=1.0) == Claimed()
        with contextlib.closing(sqlite3.connect(path)) as vandal:
            vandal.execute(f"ALTER TABLE {TABLE} RENAME TO elsewhere")
        if lost == "release":
            await store.release("k")
        else:
            await store.complete("k", 202, ANSWER, now=2.0)
        with pytest.raises(StoreError):
            await store.flush()  # the batch with the release or the answer fails
        with contextlib.closing(sqlite3.connect(path)) as mender:
            mender.execute(f"ALTER TABLE elsewhere RENAME TO {TABLE}")
        assert file_rows(path) == {"k": "in_flight"}

        assert await store.claim("k", BODY_B, now=3.0) == Conflict()  # another body: still a client bug
        assert await store.claim("k", BODY_A, now=3.0) == Claimed()  # the retry publishes, under the same event id
        assert await store.claim("k", BODY_A, now=3.0) == Busy()  # and holds the key as any claim does


async def test_a_claim_committed_before_its_answer_was_lost_is_claimable_again(tmp_path: Path) -> None:
    # The process died after committing a claim, before answering: the caller got a StoreError (503, "nothing was
    # published") and its retry found the row in flight under this store's owner: 409 until a restart.
    path = tmp_path / "ingest.sqlite3"
    async with SqliteIngestKeyStore(path) as store:
        await store.flush()
        insert = f"INSERT INTO {TABLE} (key, body_sha256, state, owner, claimed_at) VALUES (?, ?, 'in_flight', ?, 1)"  # noqa: S608
        with contextlib.closing(sqlite3.connect(path)) as writer, writer:
            writer.execute(insert, ("k", BODY_A, store._owner))
        assert await store.claim("k", BODY_A, now=2.0) == Claimed()


async def test_a_claim_queued_while_its_key_was_being_claimed_is_busy(tmp_path: Path) -> None:
    # The second claim was queued before the first one's batch was settled, so the key was not held yet; it is
    # written in the next batch, where a row in flight that the batch did not claim is taken over.
    async with SqliteIngestKeyStore(tmp_path / "ingest.sqlite3") as store:
        writing = asyncio.Event()
        write = store.process.write

        async def spied(owner: str, batch: list[Operation]) -> tuple[list[object], bool]:
            writing.set()
            return await write(owner, batch)

        store.process.write = spied  # type: ignore[method-assign]
        first = asyncio.create_task(store.claim("k", BODY_A, now=1.0))
        await writing.wait()  # the first claim's batch is being written
        again = asyncio.create_task(store.claim("k", BODY_A, now=1.0))
        other = asyncio.create_task(store.claim("k", BODY_B, now=1.0))
        assert await first == Claimed()
        assert await again == Busy()
        assert await other == Conflict()


async def test_a_cancelled_claims_release_does_not_delete_the_row_a_retry_took_over(tmp_path: Path) -> None:
    # A claim cancelled while its batch was written is released when it turns out Claimed; the release was queued
    # behind the retry's claim (queued meanwhile), which took the row over: the release deleted it, the answer was
    # stored nowhere, and the key was free again for another body.
    async with SqliteIngestKeyStore(tmp_path / "ingest.sqlite3") as store:
        writing, go = asyncio.Event(), asyncio.Event()
        write = store.process.write

        async def held_back(owner: str, batch: list[Operation]) -> tuple[list[object], bool]:
            if not writing.is_set():
                writing.set()
                await go.wait()
            return await write(owner, batch)

        store.process.write = held_back  # type: ignore[method-assign]
        first = asyncio.create_task(store.claim("k", BODY_A, now=1.0))
        await writing.wait()  # its batch is under way
        first.cancel()
        retry = asyncio.create_task(store.claim("k", BODY_A, now=2.0))
        await asyncio.wait([first])
        go.set()
        assert await retry == Claimed()
        await store.complete("k", 202, ANSWER, now=3.0)
        assert await store.claim("k", BODY_B, now=4.0) == Conflict()
        assert await store.claim("k", BODY_A, now=4.0) == Replay(status=202, body=ANSWER)


async def test_a_key_claimed_twice_in_one_batch_is_claimed_once_across_statement_chunks(tmp_path: Path) -> None:
    async with SqliteIngestKeyStore(tmp_path / "ingest.sqlite3") as store:
        keys = [f"k{n}" for n in range(600)]  # more claims than one statement takes
        results = await asyncio.gather(
            *(store.claim(key, BODY_A, now=1.0) for key in keys),
            store.claim("k0", BODY_A, now=1.0),
            store.claim("k1", BODY_B, now=1.0),
        )
        assert store.transactions == 1
        assert results[:600] == [Claimed()] * 600
        assert results[600:] == [Busy(), Conflict()]


async def test_operations_are_written_in_the_order_they_were_called(tmp_path: Path) -> None:
    async with SqliteIngestKeyStore(tmp_path / "ingest.sqlite3") as store:
        await store.claim("k", BODY_A, now=1.0)
        # Queued back to back, without waiting: each sees the ones before it.
        await store.release("k")
        first, second = await asyncio.gather(store.claim("k", BODY_B, now=2.0), store.claim("k", BODY_B, now=2.0))
        assert (first, second) == (Claimed(), Busy())
        await store.complete("k", 202, ANSWER, now=3.0)
        assert await store.claim("k", BODY_B, now=4.0) == Replay(status=202, body=ANSWER)


async def test_a_large_batch_of_every_kind_gives_each_claim_its_own_answer(tmp_path: Path) -> None:
    # One transaction: 300 answers, then 700 claims (written a few hundred rows a statement): crashed owners' rows
    # taken over or refused, answered keys replayed or refused, new keys claimed, and new keys repeated in the batch.
    path = tmp_path / "ingest.sqlite3"
    async with SqliteIngestKeyStore(path) as crashed:
        await asyncio.gather(*(crashed.claim(f"crashed-{i}", BODY_A, now=1.0) for i in range(200)))
    async with SqliteIngestKeyStore(path) as store:
        await asyncio.gather(*(store.claim(f"done-{i}", BODY_A, now=2.0) for i in range(300)))
        for i in range(300):
            await store.complete(f"done-{i}", 202, ANSWER, now=2.0)
        cases = [(f"crashed-{i}", BODY_A if i % 2 else BODY_B) for i in range(200)]
        cases += [(f"done-{i}", BODY_A if i % 2 else BODY_B) for i in range(200)]
        cases += [(f"new-{i}", body) for i in range(100) for body in (BODY_A, BODY_A, BODY_B)]
        before = store.transactions
        results = await asyncio.gather(*(store.claim(key, body, now=3.0) for key, body in cases))
        assert store.transactions == before + 1
    expected: list[Claim] = [Claimed() if i % 2 else Conflict() for i in range(200)]
    expected += [Replay(status=202, body=ANSWER) if i % 2 else Conflict() for i in range(200)]
    expected += [Claimed(), Busy(), Conflict()] * 100
    assert results == expected
    rows = file_rows(path)
    assert [rows[f"done-{i}"] for i in range(300)] == ["done"] * 300
    assert {rows[f"new-{i}"] for i in range(100)} == {"in_flight"}


async def test_answers_survive_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ingest.sqlite3"
    async with SqliteIngestKeyStore(path) as first:
        await first.claim("k", BODY_A, now=1.0)
        await first.complete("k", 202, ANSWER, now=2.0)  # queued, not yet written: close writes it
    async with SqliteIngestKeyStore(path) as second:
        assert await second.claim("k", BODY_A, now=3.0) == Replay(status=202, body=ANSWER)
        assert await second.claim("k", BODY_B, now=3.0) == Conflict()


async def test_a_crashed_owners_in_flight_row_is_taken_over_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ingest.sqlite3"
    async with SqliteIngestKeyStore(path) as crashed:
        assert await crashed.claim("k", BODY_A, now=1.0) == Claimed()
        # The process dies here: neither complete() nor release().
    async with SqliteIngestKeyStore(path) as restarted:
        assert await restarted.claim("k", BODY_B, now=2.0) == Conflict()  # the body rule still holds
        assert await restarted.claim("k", BODY_A, now=2.0) == Claimed()
        assert await restarted.claim("k", BODY_A, now=3.0) == Busy()
        await restarted.complete("k", 202, ANSWER, now=4.0)
        assert await restarted.claim("k", BODY_A, now=5.0) == Replay(status=202, body=ANSWER)


async def test_prune_also_drops_crashed_owners_claims_made_before_the_cutoff(tmp_path: Path) -> None:
    path = tmp_path / "ingest.sqlite3"
    async with SqliteIngestKeyStore(path) as crashed:
        await crashed.claim("k", BODY_A, now=10.0)
    async with SqliteIngestKeyStore(path) as restarted:
        assert await restarted.prune(older_than=10.0) == 0
        assert await restarted.prune(older_than=11.0) == 1
        assert await restarted.claim("k", BODY_B, now=12.0) == Claimed()


async def test_a_prune_deletes_a_chunk_a_transaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # In one transaction, `orderbus dedup prune` beside a running daemon held the file's write lock for as long as
    # the whole prune took, and the daemon's own key store gave up its claims after its 5 s busy timeout.
    monkeypatch.setattr(ingest_keys, "PRUNE_CHUNK", 3)
    path = tmp_path / "ingest.sqlite3"
    async with SqliteIngestKeyStore(path) as crashed:
        await crashed.claim("stale", BODY_A, now=10.0)  # in flight, held by nobody once this store is gone
    async with SqliteIngestKeyStore(path, claim_delay=0) as store:
        store.prune_pause = 0.0
        for n in range(10):
            assert await store.claim(f"k{n}", BODY_A, now=10.0) == Claimed()
            await store.complete(f"k{n}", 202, ANSWER, now=10.0)
        await store.flush()
        before = store.transactions
        assert await store.prune(older_than=100.0) == 11
        assert store.transactions - before == 4, "3 + 3 + 3 + 1 answered rows, the stale claim with the first"
        assert await store.claim("k0", BODY_B, now=101.0) == Claimed()


async def test_the_file_is_in_wal_mode_with_the_named_table(tmp_path: Path) -> None:
    path = tmp_path / "ingest.sqlite3"
    async with SqliteIngestKeyStore(path):
        pass
    with sqlite3.connect(path) as plain:
        assert plain.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        tables = plain.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    plain.close()
    assert (TABLE,) in tables


async def test_open_and_close_are_idempotent(tmp_path: Path) -> None:
    store = SqliteIngestKeyStore(tmp_path / "ingest.sqlite3")
    await store.open()
    await store.open()
    assert await store.claim("k", BODY_A, now=1.0) == Claimed()
    await store.close()
    await store.close()


async def test_using_a_closed_store_is_a_store_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "ingest.sqlite3"
    store = SqliteIngestKeyStore(path)
    with pytest.raises(StoreError, match="not open") as exc:
        await store.claim("k", BODY_A, now=1.0)
    assert str(path) in str(exc.value)


async def test_a_corrupt_file_is_a_store_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "ingest.sqlite3"
    path.write_bytes(b"this is not a database, just bytes " * 200)
    with pytest.raises(StoreError) as exc:
        await SqliteIngestKeyStore(path).open()
    assert str(path) in str(exc.value)
    assert isinstance(exc.value.__cause__, sqlite3.Error)


@pytest.mark.parametrize("where", ["missing-dir/ingest.sqlite3", "a-directory"])
async def test_an_unopenable_path_is_a_store_error_naming_the_path(tmp_path: Path, where: str) -> None:
    (tmp_path / "a-directory").mkdir()
    path = tmp_path / where
    with pytest.raises(StoreError) as exc:
        await SqliteIngestKeyStore(path).open()
    assert str(path) in str(exc.value)


async def test_a_failing_statement_is_a_store_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "ingest.sqlite3"
    async with SqliteIngestKeyStore(path) as store:
        with sqlite3.connect(path) as vandal:
            vandal.execute(f"DROP TABLE {TABLE}")
        vandal.close()
        with pytest.raises(StoreError, match="claim failed") as exc:
            await store.claim("k", BODY_A, now=1.0)
        assert str(path) in str(exc.value)


# The layout before the table kept its rowid: clustered by key.
_CLUSTERED_SCHEMA = f"""
CREATE TABLE {TABLE} (
    key          TEXT PRIMARY KEY,
    body_sha256  TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('in_flight', 'done')),
    owner        TEXT,
    claimed_at   REAL NOT NULL,
    status       INTEGER,
    response     BLOB,
    completed_at REAL
) WITHOUT ROWID;
CREATE INDEX {TABLE}_completed_at ON {TABLE} (completed_at) WHERE state = 'done';
"""


async def test_a_file_of_the_clustered_layout_is_rebuilt_at_open_and_keeps_every_answer(tmp_path: Path) -> None:
    path = tmp_path / "ingest.sqlite3"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as old:
        old.execute("PRAGMA journal_mode = WAL")
        old.executescript(_CLUSTERED_SCHEMA)
        old.execute(
            f"INSERT INTO {TABLE} VALUES (?, ?, 'done', NULL, 1.0, 202, ?, 2.0)",  # noqa: S608 -- constant
            ("answered", BODY_A, ANSWER),
        )
        old.execute(
            f"INSERT INTO {TABLE} VALUES (?, ?, 'in_flight', 'crashed-owner', 3.0, NULL, NULL, NULL)",  # noqa: S608
            ("orphaned", BODY_A),
        )
    async with SqliteIngestKeyStore(path) as store:
        assert await store.claim("answered", BODY_A, now=5.0) == Replay(status=202, body=ANSWER)
        assert await store.claim("answered", BODY_B, now=5.0) == Conflict()
        assert await store.claim("orphaned", BODY_A, now=5.0) == Claimed()  # taken over, as before
        assert await store.claim("new", BODY_A, now=5.0) == Claimed()
        assert await store.prune(older_than=2.5) == 1  # the completed_at index is the new table's
    with contextlib.closing(sqlite3.connect(path)) as plain:
        (sql,) = plain.execute("SELECT sql FROM sqlite_master WHERE name = ?", (TABLE,)).fetchone()
        columns = [row[1] for row in plain.execute(f"PRAGMA table_info({TABLE})")]
        tables = {name for (name,) in plain.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        indexes = {name for (name,) in plain.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "WITHOUT ROWID" not in sql.upper()
    assert columns[0] == "id"
    assert tables == {TABLE}
    assert f"{TABLE}_completed_at" in indexes
    assert file_rows(path) == {"orphaned": "in_flight", "new": "in_flight"}


async def test_a_file_of_the_current_layout_is_not_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "ingest.sqlite3"
    async with SqliteIngestKeyStore(path) as store:
        await store.claim("k", BODY_A, now=1.0)
    with contextlib.closing(sqlite3.connect(path)) as plain:
        (before,) = plain.execute("SELECT rowid FROM ingest_keys WHERE key = 'k'").fetchone()
        assert not migrate(plain)
        (after,) = plain.execute("SELECT rowid FROM ingest_keys WHERE key = 'k'").fetchone()
    assert before == after


async def test_a_key_store_file_of_a_later_layout_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "ingest.sqlite3"
    async with SqliteIngestKeyStore(path):
        pass
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (LAYOUT,)
        db.execute(f"PRAGMA user_version = {LAYOUT + 1}")
    with pytest.raises(ConfigError, match=rf"ingest key store {path} has layout {LAYOUT + 1}, written by a later"):
        async with SqliteIngestKeyStore(path):
            pass


async def test_the_connection_checkpoints_the_wal_in_small_steps(tmp_path: Path) -> None:
    async with SqliteIngestKeyStore(tmp_path / "ingest.sqlite3") as store:
        pages = await store.process.pragma("wal_autocheckpoint")
    assert pages == CHECKPOINT_PAGES == 1000  # SQLite's default, said explicitly


def test_two_claims_of_one_key_in_one_batch_take_it_once_also_with_other_operations_between(tmp_path: Path) -> None:
    # A batch is written in runs of one kind: [claim k, answer j, claim k] is two runs of claims. The second claim of
    # k found the row the first had just inserted, in flight with the same body and "not claimed in this batch",
    # took it over, and both requests published the order (seen under 1,000 concurrent posts of 400 keys).
    with contextlib.closing(sqlite3.connect(tmp_path / "keys.sqlite3", isolation_level=None)) as db:
        db.executescript(SCHEMA)
        assert write(db, "owner", [ClaimOp("j", BODY_B, 1.0)]) == ([Claimed()], True)
        results = write(
            db,
            "owner",
            [ClaimOp("k", BODY_A, 2.0), CompleteOp("j", 202, ANSWER, 2.0), ClaimOp("k", BODY_A, 2.0)],
        )
    assert results == ([Claimed(), 1, Busy()], True)


async def test_a_claim_queued_behind_a_full_batch_does_not_take_over_its_keys_row(tmp_path: Path) -> None:
    # A retry of "k" queued while k's first claim is being written, more than MAX_BATCH operations behind it,
    # reaches the file batches later, after the holder's release: it found k's row in flight, held by nobody, took
    # it over, and the release written next deleted it (found by a randomized stress test of the store).
    async with SqliteIngestKeyStore(tmp_path / "keys.sqlite3", claim_delay=0.002) as store:
        first = asyncio.create_task(store.claim("k", BODY_A, now=1.0))
        fill = [asyncio.create_task(store.claim(f"f{i}", BODY_A, now=1.0)) for i in range(2 * MAX_BATCH - 1)]
        retry = asyncio.create_task(store.claim("k", BODY_A, now=2.0))
        assert await first == Claimed()
        await store.release("k")  # the publish failed, while the retry waits two batches behind
        assert await retry == Busy(), "k was held when the retry was sent"
        await store.flush()
        assert await store.claim("k", BODY_A, now=3.0) == Claimed(), "released: a later retry takes it"
        await store.complete("k", 202, ANSWER, now=3.0)
        assert await store.claim("k", BODY_B, now=4.0) == Conflict()
        assert await store.claim("k", BODY_A, now=4.0) == Replay(status=202, body=ANSWER)
        await asyncio.gather(*fill)


async def test_a_claim_cancelled_in_the_turn_it_was_settled_gives_its_key_back(tmp_path: Path) -> None:
    async with SqliteIngestKeyStore(tmp_path / "keys.sqlite3", claim_delay=0) as store:
        task = asyncio.create_task(store.claim("k", BODY_A, now=1.0))
        settle = store._settle

        def settle_then_cancel(batch: Any, results: Any) -> None:
            settle(batch, results)
            task.cancel()  # the client went away in the loop turn the batch's answer arrived

        store._settle = settle_then_cancel  # type: ignore[method-assign]
        with pytest.raises(asyncio.CancelledError):
            await task
        store._settle = settle  # type: ignore[method-assign]
        await store.flush()
        assert await store.claim("k", BODY_A, now=2.0) == Claimed(), "not Busy until a restart"


async def test_with_no_answer_delay_an_answer_queued_during_the_last_batch_is_written(tmp_path: Path) -> None:
    async with SqliteIngestKeyStore(tmp_path / "keys.sqlite3", claim_delay=0, answer_delay=0) as store:
        assert await store.claim("k", BODY_A, now=1.0) == Claimed()
        other = asyncio.create_task(store.claim("o", BODY_A, now=1.0))
        while store._writer is None or store._writer.done():  # noqa: ASYNC110 -- until the writer runs
            await asyncio.sleep(0)
        await asyncio.sleep(0)  # it has taken "o"'s claim and sent its batch
        answered = asyncio.Event()
        settle = store._settle

        def settle_and_see(batch: Any, results: Any) -> None:
            settle(batch, results)
            if any(operation.name == "complete" for operation, _ in batch):
                answered.set()

        store._settle = settle_and_see  # type: ignore[method-assign]
        await store.complete("k", 202, ANSWER, now=2.0)  # queued while that batch is written
        await other
        async with asyncio.timeout(5):  # without another operation: before, it waited for one for ever
            await answered.wait()
        assert file_rows(tmp_path / "keys.sqlite3")["k"] == "done"
