"""Reading dead letters for operators (`daemon.dlq`), without a broker."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from consumers.deadletter import DeadLetter, Reason, read_headers
from daemon.dlq import (
    DeadLetterView,
    Replay,
    Selection,
    SelectionError,
    _view,
    choose,
    distinct,
    parse_position,
    with_states,
)
from topics.errors import ConfigError


def view(offset: int, source: tuple[str, int, int], *, reason: Reason = "rejected") -> DeadLetterView:
    topic, partition, consumed_at = source
    letter = DeadLetter("crm", reason, "bad-request", topic, partition, consumed_at, b"SO-1", b"{}")
    headers = letter.record_headers()
    return DeadLetterView(0, offset, 1_800_000_000_000 + offset, b"SO-1", b"{}", headers, read_headers(headers))


def test_a_dead_letter_written_again_after_a_crash_is_listed_once() -> None:
    # Regression (chaos run): a sink killed between the broker's ack of a dead letter and recording the record as
    # dead wrote it again after the restart; `dlq list` showed it twice and `dlq replay` sent it twice.
    first, copy = view(10, ("orders", 3, 500)), view(11, ("orders", 3, 500))
    other = view(12, ("orders", 3, 501))
    assert distinct([first, copy, other]) == [first, other]


def test_a_record_dead_lettered_again_after_its_replay_is_kept() -> None:
    first = view(10, ("orders", 3, 500))
    again = view(20, ("orders.replay.crm", 0, 7), reason="retries-exhausted")
    assert distinct([first, again]) == [first, again]


@pytest.mark.parametrize("text", ["abc", "0:", ":5", "0:x", "0:-1", "0:1:2", "0 :5", "٣:5", ""])
def test_a_position_must_be_partition_colon_offset(text: str) -> None:
    with pytest.raises(ValueError, match="is not PARTITION:OFFSET"):
        parse_position(text)
    with pytest.raises(ConfigError, match=r"--position: .* is not PARTITION:OFFSET"):
        Selection(positions=(text,))


def test_a_position_is_read_as_dlq_list_prints_it() -> None:
    assert parse_position("01:007") == "1:7"
    assert Selection(positions=("01:007",)).positions == ("1:7",)


def test_a_reason_must_be_one_of_the_dead_letter_reasons() -> None:
    with pytest.raises(ConfigError, match=r"unknown reason 'rejectd'; the reasons are invalid, rejected, retries-exh"):
        Selection(reason="rejectd")


def test_a_position_that_holds_no_dead_letter_replays_nothing() -> None:
    letters = [view(10, ("orders", 3, 500)), view(11, ("orders", 3, 501))]
    with pytest.raises(SelectionError, match=r"no dead letter at 0:99999, 7:1 in sink crm .* nothing was replayed"):
        choose(letters, "crm", Selection(positions=("0:10", "0:99999", "7:1")))
    assert choose(letters, "crm", Selection(positions=("0:11",))) == letters[1:]


@pytest.mark.parametrize(
    ("selection", "named"),
    [
        (Selection(order="NOPE"), r"--order NOPE among the open ones \(--again: those replayed before too\)"),
        (Selection(reason="retries-exhausted", again=True), "--reason retries-exhausted"),
        (Selection(positions=("0:10",), reason="invalid"), "--position 0:10 --reason invalid"),
        (Selection(everything=True), r"--all among the open ones \(--again: those replayed before too\)"),
    ],
)
def test_a_selection_that_matches_nothing_names_itself(selection: Selection, named: str) -> None:
    letters = [view(10, ("orders", 3, 500))] if not selection.everything else []
    with pytest.raises(SelectionError, match=f"no dead letter of sink crm matches {named}; nothing was replayed"):
        choose(letters, "crm", selection)


@pytest.mark.parametrize("history", [b"not json", b"[" * 100_000 + b"]" * 100_000, b'{"a": 1}', b"[1, 2]"])
def test_a_replayed_record_whose_history_header_is_unreadable_is_dead_lettered_with_a_note(history: bytes) -> None:
    # The history header came back through the replay topic mangled: reading it raised, and the lane's error
    # stopped the sink (with the record to come again after the restart, and again).
    first = DeadLetter("crm", "rejected", "bad-request", "orders", 3, 500, b"SO-1", b"{}").record_headers()
    mangled = [*first, ("orderbus.dlq.history", history)]
    again = DeadLetter("crm", "rejected", "bad-request", "orders.replay.crm", 0, 7, b"SO-1", b"{}", mangled)
    entries = json.loads(read_headers(again.record_headers())["history"])
    assert entries[0] == {"detail": "an earlier history header could not be read"}
    assert entries[-1]["reason"] == "rejected"


def test_a_dead_letters_headers_are_kept_for_its_replay_unchanged_a_null_value_too() -> None:
    headers = [("trace", None), ("empty", b""), ("orderbus.dlq.reason", b"invalid")]
    record = SimpleNamespace(offset=7, timestamp=1_800_000_000_000, key=b"SO-1", value=b"{}", headers=headers)
    letter = _view(0, record)
    assert letter.headers == headers
    assert letter.meta == {"reason": "invalid"}


def test_each_dead_letter_says_whether_it_was_replayed_and_what_became_of_it() -> None:
    # Regression (walkthrough): `dlq list` could not tell a dead letter replayed and delivered from an open one,
    # and `dlq replay --all` sent every one again each time.
    never = view(10, ("orders", 3, 500))
    delivered = view(11, ("orders", 3, 501))
    waiting = view(12, ("orders", 4, 9))
    failed = view(13, ("orders", 5, 70))
    again = view(14, ("orders.replay.crm", 1, 3), reason="retries-exhausted")  # failed's replay, dead again
    sent = [
        Replay(0, 0, ("orders", "3", "501")),
        Replay(0, 1, ("orders", "3", "501")),  # replayed twice: the latest counts
        Replay(2, 5, ("orders", "4", "9")),
        Replay(1, 3, ("orders", "5", "70")),
    ]
    done = {0: 2, 1: 4, 2: 5}  # the sink has read partition 2 up to offset 5, not the record at 5
    stated = with_states([never, delivered, waiting, failed, again], "orders.replay.crm", sent, done)
    assert [letter.state for letter in stated] == [
        "open",
        "replayed",
        "replay-pending",
        "failed-again@0:14",
        "open",
    ]
    assert stated[3].line().endswith("state=failed-again@0:14")
    assert choose(stated, "crm", Selection(everything=True)) == [stated[0], stated[4]]
    assert choose(stated, "crm", Selection(everything=True, again=True)) == stated
    assert choose(stated, "crm", Selection(positions=("0:11",))) == [stated[1]]  # named: taken whatever its state


def test_records_without_dead_letter_headers_are_never_taken_for_each_others_replays() -> None:
    # Review: every record without the orderbus.dlq.* headers has the same (empty) source; one replayed copy of such
    # a record marked all of them replayed.
    foreign = [DeadLetterView(0, offset, 1_800_000_000_000, b"SO-9", b"{}", [], {}) for offset in (1, 2)]
    stated = with_states(foreign, "orders.replay.crm", [Replay(0, 0, ("", "", ""))], {0: 1})
    assert [letter.state for letter in stated] == ["open", "open"]


@pytest.mark.parametrize(
    ("key", "value", "order"),
    [
        (None, b'{"order": {"order_number": "SO-7"}}', "SO-7"),  # sent without a key
        (b"WRONG", b'{"order": {"order_number": "SO-7"}}', "SO-7"),  # keyed otherwise: dead-lettered as invalid
        (b"SO-8", b"not json", "SO-8"),
        (b"SO-8", b'{"order": ["SO-9"]}', "SO-8"),
        (None, None, "-"),
    ],
)
def test_a_dead_letter_is_listed_under_its_events_order_number(
    key: bytes | None, value: bytes | None, order: str
) -> None:
    # Review: a record sent without a key was listed as order=- and `dlq list --order` could not find it.
    letter = DeadLetterView(0, 1, 1_800_000_000_000, key, value, [], {})
    assert letter.order == order
    assert Selection(order=order).matches(letter)
