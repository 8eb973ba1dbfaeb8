"""Reading dead letters for operators (`daemon.dlq`), without a broker."""

from __future__ import annotations

from consumers.deadletter import DeadLetter, Reason, read_headers
from daemon.dlq import DeadLetterView, distinct


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
