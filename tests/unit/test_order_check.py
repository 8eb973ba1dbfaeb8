"""``orderbus webhook check``: the contract's verdict on a body, offline, in the words of the ingest's 400."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import pytest

from daemon import cli
from daemon.order_check import check
from topics.codec import encode
from topics.samples import sample_event, sample_order, sample_submission

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "order.json"


def example(**order_changes: Any) -> bytes:
    document = json.loads(EXAMPLE.read_bytes())
    document["order"].update(order_changes)
    return json.dumps(document).encode()


def test_the_example_body_is_valid_and_summed_up() -> None:
    valid, lines = check(EXAMPLE.read_bytes())
    assert valid
    assert lines == [
        "valid webhook body: order.created of order SO-2026-101414, event_id derived by the ingest",
        "  send it as it is: Content-Type: application/json, uncompressed, signed or with an Idempotency-Key",
        "  without event_id or occurred_at, only that key makes a retry the same event: send one",
        "  2 lines; net 12.44 + tax 1.94 = gross 14.38 EUR",
    ]


def test_a_body_larger_than_the_ingest_takes_is_refused_as_the_ingest_would() -> None:
    body = EXAMPLE.read_bytes() + b" " * 1_048_576
    assert check(body) == (
        False,
        [
            f"invalid webhook body (the ingest answers 413): {len(body)} bytes, more than the 1048576 it takes"
            " (ingest.max_body_bytes)"
        ],
    )
    assert check(body, max_body_bytes=4 * 1_048_576)[0]
    record = encode(sample_event(random.Random(4))).value + b" " * 1_048_576
    assert check(record, record=True)[0], "a record's size is the topic's business, not the ingest's limit"


def test_every_problem_is_named_by_its_field_as_the_400_names_it() -> None:
    valid, lines = check(example(net_total="12.45", currency="EURO"))
    assert not valid
    assert lines == [
        "invalid webhook body (the ingest answers 400): 1 problem",
        "  order.currency: is not an active ISO 4217 currency code (upper case, e.g. EUR, USD, JPY)",
    ]
    valid, lines = check(example(net_total="12.45", gross_total="14.39"))
    assert lines[0] == "invalid webhook body (the ingest answers 400): 1 problem"
    assert lines[1:] == ["  order.net_total: expected 12.44 (sum of line_items net_amount), got 12.45"]


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (b"", "  body: is empty; expected a JSON object"),
        (b"{", "  body: is not valid JSON: EOF while parsing an object at line 1 column 1"),
        (b"\xff", "  body: is not valid UTF-8 (at byte 0)"),
    ],
)
def test_a_body_that_is_not_json_says_so(body: bytes, said: str) -> None:
    assert check(body) == (False, ["invalid webhook body (the ingest answers 400): 1 problem", said])


def test_a_submission_with_its_own_event_id_discounts_and_shipping() -> None:
    submission = sample_submission(random.Random(3), order_number="SO-CHECK-1")
    order = sample_order(random.Random(3), order_number="SO-CHECK-1", charges=True)
    assert order.shipping is not None
    assert any(line.discount_amount for line in order.line_items)
    body = submission.model_copy(update={"order": order}).model_dump_json().encode()
    valid, lines = check(body)
    assert valid
    assert lines[0] == f"valid webhook body: order.created of order SO-CHECK-1, event_id {submission.event_id}"
    assert lines[1].startswith("  send it as it is")
    assert "discounted" in lines[2]  # its own event_id: no word about keys
    assert lines[3].startswith(f"  shipping ({order.shipping.method}): net {order.shipping.net_amount}")


def test_a_record_value_is_checked_as_the_sinks_decode_it() -> None:
    event = sample_event(random.Random(4), order_number="SO-CHECK-2")
    valid, lines = check(encode(event).value, record=True)
    assert valid
    assert lines[:2] == [
        f"valid record value: order.created of order SO-CHECK-2, event_id {event.event_id}, source shop-eu",
        "  key the record by the order number, 'SO-CHECK-2', with Kafka's murmur2 partitioner",
    ]
    # A webhook body is not a record value: the envelope's fields are missing.
    valid, lines = check(EXAMPLE.read_bytes(), record=True)
    assert not valid
    assert lines[0] == "invalid record value (every sink dead-letters it as invalid): 4 problems"
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["schema_version", "event_id", "occurred_at", "source"]


def test_the_command_exits_0_for_a_valid_body_1_for_an_invalid_one_and_2_for_no_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli.main(["webhook", "check", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out.startswith("valid webhook body: order.created of order SO-2026-101414")
    bad = tmp_path / "bad.json"
    bad.write_bytes(example(paid="yes"))
    assert cli.main(["webhook", "check", str(bad)]) == 1
    assert "order.paid: " in capsys.readouterr().out
    assert cli.main(["webhook", "check", str(tmp_path / "missing.json")]) == 2
    assert f"cannot read {tmp_path / 'missing.json'}: No such file or directory" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(EXAMPLE.read_bytes())))
    assert cli.main(["webhook", "check", "-"]) == 0


def test_webhook_sign_reads_its_body_as_check_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ["--config", str(EXAMPLE.parents[1] / "dev" / "orderbus.toml")]
    assert cli.main(["webhook", "sign", *config, str(tmp_path / "missing.json")]) == 2  # was a traceback
    assert "cannot read" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(EXAMPLE.read_bytes())))
    assert cli.main(["webhook", "sign", *config, "-"]) == 0
    assert capsys.readouterr().out.count("webhook-") == 3


def test_messages_never_echo_the_bodys_personal_data() -> None:
    valid, lines = check(example(customer={"name": "Erika Beispiel", "email": "erika at example"}))
    assert not valid
    text = "\n".join(lines)
    assert "order.customer.email" in text
    assert "Erika" not in text
    assert "erika at example" not in text
