"""`orderbus trace`'s report (`daemon.trace.explain`) and its reading of a real delivery-state file."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

from consumers.blocks import encode_chain
from consumers.deadletter import DeadLetter, Reason, read_headers
from consumers.dedup import SqliteDedupStore
from consumers.delivery_state import DeliveryState, DeliveryStatus
from consumers.work import KEY_MISMATCH, RESEND_OF, idempotency_key
from daemon.dlq import DeadLetterView
from daemon.trace import (
    Found,
    Resend,
    SinkRecord,
    TracedEvent,
    _event,
    _local_states,
    _of_order,
    explain,
    key_partition,
    resends,
)
from topics.codec import encode
from topics.errors import StoreError
from topics.samples import sample_event

ORDER = "SO-2026-000042"
CREATED = TracedEvent(3, 57, 1_800_000_000_000, "order.created", "e-1", "webhook")
UPDATED = TracedEvent(3, 90, 1_800_000_060_000, "order.updated", "e-2", "webhook")


def found(*events: TracedEvent, by_key: bool = True) -> Found:
    return Found(ORDER, "orders", list(events), {3: (0, 120)}, by_key=by_key)


def state(event_id: str, status: DeliveryStatus, *, attempts: int = 1, last_status: int | None = 201) -> DeliveryState:
    key = idempotency_key("crm", event_id)
    return DeliveryState(key, event_id, ORDER, status, attempts, last_status, 1.8e9, 1.8e9, None, None, None, 1.8e9)


def letter(
    where: tuple[int, int], source: tuple[str, int, int], *, reason: Reason = "rejected", state: str = "open"
) -> DeadLetterView:
    topic, partition, offset = source
    dead = DeadLetter("crm", reason, "bad-request", topic, partition, offset, ORDER.encode(), b"{}", http_status=400)
    headers = dead.record_headers()
    value = json.dumps({"order": {"order_number": ORDER}}).encode()
    return DeadLetterView(*where, 1_800_000_000_000, ORDER.encode(), value, headers, read_headers(headers), state)


def crm(**fields: object) -> SinkRecord:
    record = SinkRecord("crm", {3: 120}, [], Path("state/dedup-crm.sqlite"), {})
    return dataclasses.replace(record, **fields)  # type: ignore[arg-type]


def verdicts(lines: list[str]) -> list[str]:
    return [line.split("crm", 1)[1].strip() for line in lines if line.startswith(" " * 12 + "crm")]


def test_a_delivered_event_names_the_downstream_id_and_its_attempts() -> None:
    lines = explain(found(CREATED), [crm(states={"e-1": state("e-1", "done", attempts=2)}, downstream_id="C-7")])
    assert lines[0] == f"order {ORDER}: 1 event(s) in orders (partition 3 offsets 0..119)"
    assert lines[1].split() == ["3@57", "2027-01-15T08:00:00+00:00", "order.created", "event_id=e-1", "source=webhook"]
    assert verdicts(lines) == ["delivered, its id there now C-7: 2 attempts, 2027-01-15T08:00:00+00:00"]
    duplicate = explain(found(CREATED), [crm(states={"e-1": state("e-1", "duplicate")})])
    assert verdicts(duplicate) == ["delivered (the downstream already had it): 1 attempt, 2027-01-15T08:00:00+00:00"]


def test_a_dead_lettered_order_is_blocked_and_the_replay_command_is_given() -> None:
    letters = [
        letter((0, 17), ("orders", 3, 57)),
        letter((0, 18), ("orders", 3, 90), reason="dead-lettered-predecessor"),
    ]
    chain = [idempotency_key("crm", "e-1"), idempotency_key("crm", "e-2")]
    sink = crm(letters=letters, states={"e-1": state("e-1", "dead", last_status=400)}, blocked=chain)
    lines = explain(found(CREATED, UPDATED), [sink])
    assert verdicts(lines) == [
        "dead-lettered: dlq 0:17 (rejected, HTTP 400), state=open",
        "dead-lettered: dlq 0:18 (dead-lettered-predecessor, HTTP 400), state=open",
    ]
    assert lines[-1] == (
        "crm: the order is blocked (2 of its events wait in the dead letters; its new events follow them until they "
        f"are replayed): orderbus dlq replay --sink crm --order {ORDER}"
    )


def test_a_replay_that_failed_again_and_then_delivered_is_followed_to_the_end() -> None:
    letters = [
        letter((0, 17), ("orders", 3, 57), state="failed-again@1:4"),
        letter((1, 4), ("orders.replay.crm", 0, 2), state="replayed"),
    ]
    lines = explain(found(CREATED), [crm(letters=letters, states={"e-1": state("e-1", "done", attempts=3)})])
    assert verdicts(lines) == [
        "dead-lettered: dlq 0:17 (rejected, HTTP 400), state=failed-again@1:4; replayed, dead-lettered again: "
        "dlq 1:4 (rejected, HTTP 400), state=replayed; delivered: 3 attempts, 2027-01-15T08:00:00+00:00"
    ]


def test_what_is_not_delivered_yet_says_how_far_its_group_is() -> None:
    in_flight = state("e-1", "in_flight", attempts=4, last_status=503)
    sink = crm(committed={3: 50}, states={"e-1": in_flight})
    assert verdicts(explain(found(CREATED, UPDATED), [sink])) == [
        "being delivered: 4 attempts so far, last answer HTTP 503",
        "not delivered yet: its group is at offset 50 of partition 3, 40 record(s) before this one",
    ]
    unread = crm(committed={}, states={})
    assert verdicts(explain(found(CREATED), [unread])) == [
        "not read yet: its group has committed nothing on partition 3"
    ]


def test_a_handled_event_without_a_state_here_says_why_that_can_be() -> None:
    lines = explain(found(CREATED), [crm(states={})])
    assert verdicts(lines) == [
        "handled: its group committed past it (no delivery state here: pruned after dedup_retention_hours, or "
        "kept by an instance on another host)"
    ]
    gone = explain(found(CREATED), [crm(states={"e-1": dataclasses.replace(state("e-1", "dead"), reason="rejected")})])
    assert verdicts(gone) == ["dead-lettered (rejected); the dead letter is no longer on its topic (retention)"]


def test_without_the_sinks_file_the_report_says_so_and_uses_kafka_alone() -> None:
    lines = explain(found(CREATED), [crm(states=None)])
    assert verdicts(lines)[0].startswith("handled: its group committed past it")
    assert lines[-1] == "crm: no delivery-state file here (state/dedup-crm.sqlite); states from Kafka only"


def test_an_order_not_found_points_at_the_other_partitions_only_when_one_was_searched() -> None:
    assert explain(found(), [crm()]) == [
        f"no record of order {ORDER} in orders (partition 3 offsets 0..119)",
        "  searched its key's partition only: a record without a key, or from a producer that does not partition "
        "by murmur2 (librdkafka's default does not), is elsewhere: --all-partitions",
    ]
    everywhere = Found(ORDER, "orders", [], {0: (5, 5), 1: (0, 3)}, by_key=False)
    assert explain(everywhere, [crm()]) == [
        f"no record of order {ORDER} in orders (partition 0 no records, partition 1 offsets 0..2)"
    ]


def test_an_invalid_record_is_shown_with_its_first_contract_error() -> None:
    invalid = TracedEvent(3, 60, 1_800_000_000_000, "invalid", "", "value is not valid JSON: EOF")
    letters = [letter((0, 3), ("orders", 3, 60), reason="invalid")]
    lines = explain(found(invalid), [crm(letters=letters)])
    assert lines[1].endswith("invalid value is not valid JSON: EOF")
    assert verdicts(lines) == ["dead-lettered: dlq 0:3 (invalid, HTTP 400), state=open"]


def test_the_key_partition_is_javas_murmur2() -> None:
    # Kafka's own test vectors (UtilsTest.testMurmur2): the signed 32-bit hashes Java computes.
    assert key_partition("21", 12) == (-973932308 & 0x7FFFFFFF) % 12
    assert key_partition("foobar", 7) == (-790332482 & 0x7FFFFFFF) % 7


def files(directory: Path) -> dict[str, int]:
    """The files in `directory`, with when each was last written."""
    return {file.name: file.stat().st_mtime_ns for file in directory.iterdir()}


async def test_the_states_are_read_from_a_real_file_without_writing_to_it(tmp_path: Path) -> None:
    path = tmp_path / "dedup-crm.sqlite"
    async with SqliteDedupStore(path) as store:
        store.put(state("e-1", "done"))
        store.put(state("other", "done"))
        store.put_downstream_id(ORDER, "C-7")
        store.block_order(ORDER, encode_chain([idempotency_key("crm", "e-2")]))
        await store.flush()
    before = files(tmp_path)

    record = _local_states("crm", {3: 120}, [], path, ORDER, [CREATED, UPDATED])

    assert record.states is not None
    assert set(record.states) == {"e-1"}
    assert record.states["e-1"].status == "done"
    assert record.downstream_id == "C-7"
    assert record.blocked == [idempotency_key("crm", "e-2")]
    assert files(tmp_path) == before
    missing = _local_states("crm", {}, [], tmp_path / "dedup-shipping.sqlite", ORDER, [CREATED])
    assert missing.states is None
    assert set(files(tmp_path)) == set(before)


async def test_a_file_of_an_earlier_version_asks_for_the_daemons_restart(tmp_path: Path) -> None:
    path = tmp_path / "dedup-crm.sqlite"
    async with SqliteDedupStore(path) as store:
        store.put(state("e-1", "done"))
        await store.flush()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("ALTER TABLE deliveries DROP COLUMN event_type")  # as an earlier orderbus wrote it
    with pytest.raises(StoreError, match=r"dedup-crm\.sqlite: the file is of an earlier orderbus version.*restart"):
        _local_states("crm", {3: 120}, [], path, ORDER, [CREATED])


async def test_the_states_of_a_file_the_daemon_has_open_are_read_as_they_change(tmp_path: Path) -> None:
    path = tmp_path / "dedup-crm.sqlite"
    async with SqliteDedupStore(path) as store:
        store.put(state("e-1", "in_flight", last_status=None))
        await store.flush()
        first = _local_states("crm", {}, [], path, ORDER, [CREATED])
        store.put(state("e-1", "done"))
        await store.flush()
        then = _local_states("crm", {}, [], path, ORDER, [CREATED])
    assert first.states is not None
    assert first.states["e-1"].status == "in_flight"
    assert then.states is not None
    assert then.states["e-1"].status == "done"


def test_a_record_is_the_orders_by_its_key_or_without_one_by_its_values_order_number() -> None:
    value = json.dumps({"order": {"order_number": ORDER}}).encode()
    longer = json.dumps({"order": {"order_number": ORDER + "1"}}).encode()  # holds ORDER's bytes, another order
    key = ORDER.encode()
    cases = [
        (key, b"not even JSON", True),  # the key decides; a bad value is shown as invalid
        (b"SO-OTHER", value, False),
        (None, value, True),
        (b"", value, True),  # an empty key is no key to the sinks either
        (None, longer, False),
        (None, b"{" + key, False),
        (None, None, False),
    ]
    for record_key, record_value, expected in cases:
        assert _of_order(SimpleNamespace(key=record_key, value=record_value), key, ORDER) is expected, record_key


def test_a_search_stopped_by_a_batch_the_client_cannot_read_says_so() -> None:
    stopped = dataclasses.replace(found(CREATED), unreadable="UnicodeDecodeError: 'utf-8' codec can't decode")
    lines = explain(stopped, [crm(states={"e-1": state("e-1", "done")})])
    assert lines[1] == (
        "  the search stopped at a batch the Kafka client cannot read (UnicodeDecodeError: 'utf-8' codec can't "
        "decode): later records are not shown (`orderbus status` names where a sink holds it)"
    )
    assert explain(dataclasses.replace(stopped, events=[]), [crm()])[1].startswith("  the search stopped")


def test_a_record_keyed_by_the_order_whose_value_names_another_is_shown_as_the_sinks_see_it() -> None:
    other = encode(sample_event(random.Random(5), order_number="SO-OTHER"))
    record = SimpleNamespace(partition=3, offset=9, timestamp=1_800_000_000_000, key=ORDER.encode(), value=other.value)
    event = _event(record)
    assert (event.event_type, event.event_id) == ("invalid", "")
    assert event.detail == f"key {KEY_MISMATCH}"


def test_a_row_in_flight_on_this_host_for_a_record_its_group_committed_past_is_not_taken_for_under_way() -> None:
    # Review: a partition moved to another instance left this host's row `in_flight`; it read "being delivered".
    stale = state("e-1", "in_flight", attempts=2, last_status=503)
    assert verdicts(explain(found(CREATED), [crm(committed={3: 120}, states={"e-1": stale})])) == [
        "handled: its group committed past it (this host last tried it: 2 attempts, 2027-01-15T08:00:00+00:00; "
        "another instance finished it)"
    ]


def test_a_resent_create_is_shown_per_sink_with_what_became_of_it() -> None:
    resend = Resend(1, 4, 1_800_000_120_000, "e-9", "e-2")
    head = "crm: resent 2027-01-15T08:02:00+00:00 as event_id=e-9 (of e-2; replay topic 1@4): "
    delivered = crm(resends=[resend], states={"e-9": state("e-9", "done")}, downstream_id="C-12")
    assert explain(found(CREATED, UPDATED), [delivered])[-1] == (
        head + "delivered, its id there now C-12: 1 attempt, 2027-01-15T08:00:00+00:00"
    )
    dead = dataclasses.replace(state("e-9", "dead"), reason="rejected")
    assert explain(found(CREATED), [crm(resends=[resend], states={"e-9": dead})])[-1] == (
        head + "dead-lettered (rejected): orderbus dlq list --sink crm"
    )
    elsewhere = head + "not delivered from this host yet (another instance may hold the order's partition)"
    assert explain(found(CREATED), [crm(resends=[resend])])[-1] == elsewhere
    without_file = explain(found(CREATED), [crm(resends=[resend], states=None)])
    assert without_file[-2:] == [
        elsewhere,
        "crm: no delivery-state file here (state/dedup-crm.sqlite); states from Kafka only",
    ]


def test_an_orders_resends_are_found_among_the_replay_topics_records_by_their_header() -> None:
    def record(key: bytes, offset: int, headers: list[tuple[str, bytes]]) -> SimpleNamespace:
        return SimpleNamespace(
            key=key, value=b"{}", offset=offset, timestamp=1_800_000_000_000 + offset, headers=headers
        )

    resent = [(RESEND_OF, b"e-2"), ("event-id", b"e-9")]
    replayed = [
        (1, record(ORDER.encode(), 3, [("orderbus.dlq.reason", b"rejected")])),  # a replayed dead letter
        (1, record(ORDER.encode(), 4, resent)),
        (2, record(b"SO-2026-000043", 0, resent)),  # another order's
    ]
    assert resends(replayed) == {
        ORDER: [Resend(1, 4, 1_800_000_000_004, "e-9", "e-2")],
        "SO-2026-000043": [Resend(2, 0, 1_800_000_000_000, "e-9", "e-2")],
    }
