"""Kafka record encoding: round trips, and poison bytes that become `ContractError`, never a crash."""

from __future__ import annotations

import importlib
import json
import random
from decimal import Decimal

import pytest
from pydantic import ValidationError

from topics import ContractError, FieldError, decode, encode, field_errors, parse_submission
from topics.envelope import OrderEvent
from topics.samples import sample_event, sample_order, sample_submission


def test_every_name_of_the_package_is_its_module_s_and_an_unknown_one_is_an_attribute_error() -> None:
    import topics

    homes = [importlib.import_module(f"topics.{name}") for name in ("codec", "currency", "envelope", "errors", "order")]
    for name in topics.__all__:
        assert any(getattr(topics, name) is getattr(home, name, None) for home in homes), name
    assert set(topics.__all__) <= set(dir(topics))
    with pytest.raises(AttributeError, match="has no attribute 'Decoder'"):
        topics.Decoder  # noqa: B018


def event_json(seed: int = 1) -> dict[str, object]:
    return json.loads(sample_event(random.Random(seed)).model_dump_json())  # type: ignore[no-any-return]


def decode_errors(value: bytes | None) -> list[FieldError]:
    with pytest.raises(ContractError) as caught:
        decode(value)
    return list(caught.value.errors)


def submission_errors(body: bytes) -> list[FieldError]:
    with pytest.raises(ContractError) as caught:
        parse_submission(body)
    return list(caught.value.errors)


# --- encode -------------------------------------------------------------------------------------------------


def test_encode_keys_by_order_number_and_labels_the_record() -> None:
    event = sample_event(random.Random(1), order_number="SO-2026-000001")
    record = encode(event)
    assert record.key == b"SO-2026-000001"
    assert record.headers == [
        ("content-type", b"application/json"),
        ("event-id", str(event.event_id).encode()),
        ("event-type", b"order.created"),
        ("schema-version", b"1"),
    ]


def test_encode_writes_compact_json_with_money_as_strings() -> None:
    record = encode(sample_event(random.Random(1)))
    assert record.value.startswith(b'{"schema_version":1,"event_id":"')
    body = json.loads(record.value)
    assert json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode() == record.value
    assert isinstance(body["order"]["gross_total"], str)
    assert isinstance(body["order"]["line_items"][0]["unit_price"], str)


@pytest.mark.parametrize("currency", ["EUR", "JPY", "KWD", "CLF"])
def test_a_sample_round_trips_through_encode_and_decode(currency: str) -> None:
    for seed in range(20):
        event = sample_event(random.Random(seed), currency=currency)
        assert decode(encode(event).value) == event


@pytest.mark.parametrize("currency", ["EUR", "JPY", "KWD"])
def test_discounts_and_shipping_charges_round_trip_through_encode_and_decode(currency: str) -> None:
    events = [
        sample_event(random.Random(seed), currency=currency).model_copy(
            update={"order": sample_order(random.Random(seed), currency=currency, charges=True)}
        )
        for seed in range(20)
    ]
    assert any(event.order.shipping is not None for event in events)
    assert any(line.discount_amount for event in events for line in event.order.line_items)
    for event in events:
        value = encode(event).value
        assert decode(value) == event
        document = json.loads(value)
        assert ("shipping" in document["order"]) == (event.order.shipping is not None)
        for line, written in zip(event.order.line_items, document["order"]["line_items"], strict=True):
            assert ("discount_amount" in written) == bool(line.discount_amount)


def test_non_ascii_text_survives_as_utf8() -> None:
    body = event_json()
    body["order"]["billing_address"]["line1"] = "Musterstraße 1, Saint-Modèle"  # type: ignore[index]
    event = decode(json.dumps(body, ensure_ascii=False).encode())
    assert "Musterstraße".encode() in encode(event).value
    assert decode(encode(event).value) == event


def test_money_stays_exact_through_decode() -> None:
    body = event_json()
    order = body["order"]
    line = order["line_items"][0]  # type: ignore[index]
    line.update(quantity=1, unit_price="0.1", net_amount="0.1", tax_rate="0", tax_amount="0")
    second = {**line, "sku": "X-2", "unit_price": "0.2", "net_amount": "0.2"}
    order.update(line_items=[line, second], net_total="0.3", tax_total="0", gross_total="0.3")  # type: ignore[attr-defined]
    event = decode(json.dumps(body).encode())
    amounts = [item.net_amount for item in event.order.line_items]
    assert amounts == [Decimal("0.1"), Decimal("0.2")]
    assert sum(amounts) == event.order.net_total == Decimal("0.3")


# --- decode: poison -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "is missing (null); expected a JSON object"),
        (b"", "is empty; expected a JSON object"),
        (b"\xff", "is not valid UTF-8 (at byte 0)"),
        (b'{"order": "\xe9"}', "is not valid UTF-8 (at byte 11)"),
        (b"[]", "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b'"order"', "must be a JSON object"),
        (b"42", "must be a JSON object"),
        (b"{", "is not valid JSON: EOF while parsing an object at line 1 column 1"),
        (b"{'a': 1}", "is not valid JSON: key must be a string at line 1 column 2"),
        (b"NaN", "must be a JSON object"),
    ],
)
def test_poison_values_are_contract_errors(value: bytes | None, message: str) -> None:
    assert decode_errors(value) == [FieldError("value", message)]


@pytest.mark.parametrize(
    "value",
    [b"[" * 100_000, b'{"a":' * 100_000, b'{"order": ' + b"[" * 5_000 + b"]" * 5_000 + b"}", b"1" * 10_000],
    ids=["deep-arrays", "deep-objects", "deep-in-field", "huge-number"],
)
def test_huge_nesting_and_numbers_are_contract_errors(value: bytes) -> None:
    [error] = decode_errors(value)
    assert error.loc == "value"
    assert error.message.startswith("is not valid JSON")


def test_contract_violations_are_located_inside_the_envelope() -> None:
    body = event_json()
    body["order"]["line_items"][0]["unit_price"] = 12.5  # type: ignore[index]
    body["order"]["currency"] = "XYZ"  # type: ignore[index]
    body["unexpected"] = True
    errors = {error.loc: error.message for error in decode_errors(json.dumps(body).encode())}
    assert set(errors) == {"order.line_items.0.unit_price", "order.currency", "unexpected"}
    assert "send it as a JSON string" in errors["order.line_items.0.unit_price"]


def test_decode_does_not_chain_the_pydantic_error() -> None:
    # The ValidationError's text holds input values; a chained traceback would put them in a log.
    with pytest.raises(ContractError) as caught:
        decode(b'{"schema_version": 1}')
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


# --- parse_submission ---------------------------------------------------------------------------------------


def test_a_sample_submission_parses() -> None:
    submission = sample_submission(random.Random(5))
    assert parse_submission(submission.model_dump_json().encode()) == submission


def test_a_minimal_submission_gets_defaults() -> None:
    order = event_json()["order"]
    submission = parse_submission(json.dumps({"order": order}).encode())
    assert (submission.event_type, submission.event_id, submission.occurred_at) == (
        "order.created",
        None,
        None,
    )


def test_a_byte_order_mark_an_unknown_version_and_a_bad_source_are_said_plainly() -> None:
    # Review (sender): "expected value at line 1 column 1", "Input should be 1", and the source's bare regex.
    submission = sample_submission(random.Random(3)).model_dump_json().encode()
    with pytest.raises(ContractError) as bom:
        parse_submission(b"\xef\xbb\xbf" + submission)
    assert list(bom.value.errors) == [FieldError("body", "starts with a byte order mark (BOM); send UTF-8 without one")]
    event = json.loads(encode(sample_event(random.Random(3))).value)
    with pytest.raises(ContractError) as versioned:
        decode(json.dumps({**event, "schema_version": 2, "source": "Shop EU"}).encode())
    assert sorted(versioned.value.errors, key=lambda error: error.loc) == [
        FieldError("schema_version", "must be 1: this orderbus reads version 1 of the contract only"),
        FieldError(
            "source", "must be 1-32 characters: lower-case letters, digits or '-', starting with a letter (shop-eu)"
        ),
    ]


def test_control_characters_in_free_text_are_refused_by_field_and_line_breaks_are_not() -> None:
    # Review (sender): a NUL in a name was accepted and sent on, for a downstream's database to refuse (dead letter).
    document = json.loads(sample_submission(random.Random(4)).model_dump_json())
    document["order"]["customer"]["name"] = "Jane\u0000Doe"
    document["order"]["line_items"][0]["name"] = "Chocolate\u001b[31m"
    document["order"]["shipping_address"]["line1"] = "Main St 1\nBack door\tleft"
    with pytest.raises(ContractError) as caught:
        parse_submission(json.dumps(document).encode())
    rule = "must not contain control characters (NUL, escape, backspace, ...); tabs and line breaks are fine"
    assert sorted(caught.value.errors, key=lambda error: error.loc) == [
        FieldError("order.customer.name", rule),
        FieldError("order.line_items.0.name", rule),
    ]


def test_a_json_syntax_error_names_body_line_and_column() -> None:
    body = b'{\n  "order": {\n    "currency": "EUR",,\n  }\n}'
    [error] = submission_errors(body)
    assert error.loc == "body"
    assert error.message.startswith("is not valid JSON:")
    assert "line 3 column" in error.message


def test_submission_errors_are_located_without_prefix() -> None:
    order = event_json()["order"]
    order["net_total"] = "-1"  # type: ignore[index]
    errors = submission_errors(json.dumps({"event_type": "order.shipped", "order": order}).encode())
    assert {e.loc: e.message for e in errors} == {
        "event_type": "Input should be 'order.created', 'order.updated' or 'order.cancelled'",
        "order.net_total": "must not be negative",
    }


@pytest.mark.parametrize(("body", "loc"), [(b"", "body"), (b"\xfe", "body"), (b"[1]", "body"), (b"{}", "order")])
def test_submission_poison_is_a_contract_error(body: bytes, loc: str) -> None:
    assert [error.loc for error in submission_errors(body)] == [loc]


# --- field_errors -------------------------------------------------------------------------------------------


def test_field_errors_prefixes_locs() -> None:
    with pytest.raises(ValidationError) as caught:
        OrderEvent.model_validate_json("[]")
    assert field_errors(caught.value) == [FieldError("body", "must be a JSON object")]
    assert field_errors(caught.value, "payload") == [FieldError("payload", "must be a JSON object")]
    assert field_errors(caught.value, root="value") == [FieldError("value", "must be a JSON object")]

    with pytest.raises(ValidationError) as caught:
        OrderEvent.model_validate_json('{"schema_version": 1, "event_id": "00000000-0000-4000-8000-000000000001"}')
    locs = [error.loc for error in field_errors(caught.value, "body")]
    assert locs == ["body.event_type", "body.occurred_at", "body.source", "body.order"]
